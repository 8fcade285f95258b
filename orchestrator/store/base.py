"""What the orchestrator needs from durable storage: the SagaStore protocol and its rows."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from pydantic import ValidationError

from messages.contract.codec import Wire
from messages.contract.models import SagaStatus
from messages.errors import UnreadableSagaError
from orchestrator.engine import SagaState

log = logging.getLogger(__name__)

# In a shared store, an orchestrator that has not renewed its lease for this long is taken
# for dead, and its outbox rows are published by another.
LEASE_S = 15.0


@dataclass(frozen=True)
class OutboxMessage:
    """A message the orchestrator decided to send, kept until the broker confirms it."""

    exchange: str
    routing_key: str
    wire: Wire
    mandatory: bool = True
    traceparent: str | None = None  # W3C trace context of the saga
    id: int | None = None  # set once stored


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas to list; every field left empty matches all of them.

    ``input`` matches fields of the saga's input exactly (``customer_id``, ``sku``);
    ``reason`` is a case-insensitive part of the saga's reason (``declined``).
    """

    status: SagaStatus | None = None
    since: datetime | None = None  # started at or after
    stuck_before: datetime | None = None  # waiting for one reply since this time or earlier
    reason: str | None = None
    input: tuple[tuple[str, str], ...] = ()


def order_fields(**fields: str | None) -> tuple[tuple[str, str], ...]:
    """SagaFilter.input from the fields given a value: order_fields(sku="item-1", ...)."""
    return tuple((name, value) for name, value in fields.items() if value)


@dataclass(frozen=True)
class SagaStats:
    """Counts and durations over every saga in the store."""

    by_status: dict[str, int]
    by_outcome: dict[str, int]  # "STATUS reason" of finished sagas
    durations_s: list[float]  # of finished sagas, sorted
    oldest_running: SagaState | None


class SagaStore(Protocol):
    """What the orchestrator runtime and CLI need from durable storage.

    ``shared`` says whether other orchestrators may write the same store at the same time
    (PostgreSQL): then nothing may be trusted from memory without a version check, and
    each orchestrator holds a lease on the outbox rows it wrote (``heartbeat``); rows whose
    writer's lease ran out are taken over by a live one (``claim_orphans``).
    """

    shared: bool

    def get(self, saga_id: UUID) -> SagaState | None: ...

    def commit(self, state: SagaState, outbox: Sequence[OutboxMessage]) -> SagaState:
        """Save ``state`` and queue ``outbox`` in one transaction; return the stored state.

        A state with version 0 is new; otherwise the stored version must still be
        ``state.version`` (else ConcurrentUpdateError). The stored state has version + 1.
        """
        ...

    def commit_many(
        self,
        changes: Sequence[tuple[SagaState, Sequence[OutboxMessage]]],
        published: Sequence[int] = (),
    ) -> list[list[OutboxMessage]]:
        """Commit several (state, outbox) changes in one transaction: all or none.

        ``published`` outbox rows (confirmed by the broker) are deleted in the same go.
        Returns each change's outbox as stored (with ids). May be called from a thread of
        its own (the writer) while other methods are called from the event loop.
        """
        ...

    def due(self, now: datetime, limit: int) -> list[SagaState]:
        """Sagas whose deadline has passed; unreadable ones are quarantined, not returned."""
        ...

    def quarantine(self, saga_id: UUID, why: str) -> None:
        """Set a saga aside that cannot be read or decided: QUARANTINED, no deadline."""
        ...

    def quarantined(self, limit: int) -> list[tuple[str, str, datetime]]:
        """(saga id, why, when) of quarantined sagas, newest first."""
        ...

    def stuck(self, now: datetime, after_s: float) -> int:
        """How many sagas have waited ``after_s`` or longer for one command's reply."""
        ...

    def outbox(self, limit: int, after: int = 0) -> list[OutboxMessage]: ...

    def prune(self, ended_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` sagas that ended before ``ended_before``; return how many.

        Quarantined sagas are kept: someone has to look at them first.
        """
        ...

    def outbox_done(self, ids: Iterable[int]) -> None: ...

    def heartbeat(self) -> None:
        """Renew this writer's lease on the outbox rows it wrote (a no-op when not shared)."""
        ...

    def claim_orphans(self, limit: int) -> list[OutboxMessage]:
        """Take over up to ``limit`` outbox rows no live writer holds, to publish them.

        At start these are what an earlier run left unpublished; in a shared store, also the
        rows of an orchestrator that stopped renewing its lease.
        """
        ...

    def outbox_depth(self) -> int: ...

    def outbox_holds(self, message_id: str) -> bool:
        """Whether a message is still waiting in the outbox (not yet confirmed)."""
        ...

    def sagas(self, where: SagaFilter, limit: int, offset: int = 0) -> list[SagaState]:
        """Sagas ``where`` matches, newest first, skipping ``offset`` of them."""
        ...

    def finished_per_minute(self, since: datetime) -> list[tuple[str, int, int]]: ...

    def stats(self) -> SagaStats: ...

    def counts(self) -> dict[str, int]:
        """Sagas by status."""
        ...

    def close(self) -> None: ...


class SqlStore(ABC):
    """What both stores do alike over their own SQL: read a saga back, commit one change."""

    readonly: bool  # a reader (the CLI) reports an unreadable saga; only a writer sets it aside

    @abstractmethod
    def commit_many(
        self,
        changes: Sequence[tuple[SagaState, Sequence[OutboxMessage]]],
        published: Sequence[int] = (),
    ) -> list[list[OutboxMessage]]: ...

    @abstractmethod
    def quarantine(self, saga_id: UUID, why: str) -> None: ...

    # How this dialect writes a parameter, a field of the input in the saga's JSON, and the
    # minute (since the epoch) a saga was last updated in.
    MARK: str
    INPUT_FIELD: str
    MINUTE: str

    @abstractmethod
    def _select(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        """Rows of a read-only query, on the reading connection."""

    def sagas(self, where: SagaFilter, limit: int, offset: int = 0) -> list[SagaState]:
        p = self.MARK
        sql = [f"status != {p}"]  # quarantined ones cannot be read: see quarantined()
        args: list[object] = [SagaStatus.QUARANTINED.value]
        if where.status is not None:
            sql.append(f"status = {p}")
            args.append(where.status.value)
        if where.since is not None:
            sql.append(f"created_at >= {p}")
            args.append(where.since.timestamp())
        if where.stuck_before is not None:
            sql.append(f"waiting_since <= {p}")
            args.append(where.stuck_before.timestamp())
        if where.reason:
            # Its own % and _ are characters to find, not wildcards.
            sql.append(f"lower(reason) LIKE {p} ESCAPE '!'")
            text = where.reason.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
            args.append(f"%{text}%")
        for field, value in where.input:
            sql.append(f"{self.INPUT_FIELD} = {p}")
            args.extend((field, value))
        rows = self._select(
            f"SELECT saga_id, state FROM sagas WHERE {' AND '.join(sql)}"
            # saga_id breaks ties, so that no saga is on two pages or on none
            f" ORDER BY created_at DESC, saga_id DESC LIMIT {p} OFFSET {p}",
            (*args, limit, offset),
        )
        listed = []
        for saga_id, blob in rows:
            try:
                listed.append(load(saga_id, blob))
            except UnreadableSagaError as exc:  # quarantined when an orchestrator meets it
                log.warning("%s", exc)
        return listed

    def finished_per_minute(self, since: datetime) -> list[tuple[str, int, int]]:
        """(status, minute since the epoch, sagas) of sagas that ended at or after ``since``."""
        p = self.MARK
        finished = [s.value for s in SagaStatus if s.finished]
        rows = self._select(
            f"SELECT status, {self.MINUTE}, count(*) FROM sagas"
            f" WHERE status IN ({', '.join([p] * len(finished))}) AND updated_at >= {p}"
            " GROUP BY 1, 2",
            (*finished, since.timestamp()),
        )
        return [(str(status), int(minute), int(count)) for status, minute, count in rows]

    def commit(self, state: SagaState, outbox: Sequence[OutboxMessage]) -> SagaState:
        self.commit_many([(state, outbox)])
        return state.model_copy(update={"version": state.version + 1})

    def loaded(self, saga_id: UUID, row: Sequence[Any] | None) -> SagaState | None:
        """The saga in a (state, status) row; None when there is no row."""
        if row is None:
            return None
        if row[1] == SagaStatus.QUARANTINED:
            raise UnreadableSagaError(f"saga {saga_id} is quarantined")
        try:
            return load(saga_id, row[0])
        except UnreadableSagaError as exc:
            if not self.readonly:
                self.quarantine(saga_id, str(exc))
            raise


OUTBOX_COLUMNS = (
    "id, saga_id, exchange, routing_key, mandatory, traceparent, type, message_id,"
    " content_type, timestamp, body"
)


def outbox_row(row: Sequence[Any]) -> OutboxMessage:
    """An OutboxMessage from a row of OUTBOX_COLUMNS."""
    return OutboxMessage(
        id=row[0],
        exchange=row[2],
        routing_key=row[3],
        mandatory=bool(row[4]),
        traceparent=row[5],
        wire=Wire(
            body=bytes(row[10]),
            content_type=row[8],
            type=row[6],
            message_id=row[7],
            correlation_id=str(row[1]),
            timestamp=row[9],
        ),
    )


def outbox_values(saga_id: UUID, m: OutboxMessage, owner: str) -> tuple[Any, ...]:
    """The values of an outbox row to insert, after its id: OUTBOX_COLUMNS then owner."""
    return (
        str(saga_id),
        m.exchange,
        m.routing_key,
        m.mandatory,
        m.traceparent,
        m.wire.type,
        m.wire.message_id,
        m.wire.content_type,
        m.wire.timestamp,
        m.wire.body,
        owner,
    )


def ts(value: datetime | None) -> float | None:
    """A time as stored: seconds since the epoch."""
    return None if value is None else value.timestamp()


def load(saga_id: object, blob: str | bytes) -> SagaState:
    """A stored state, or UnreadableSagaError saying what is wrong with it."""
    try:
        return SagaState.model_validate_json(blob)
    except ValidationError as exc:
        raise UnreadableSagaError(
            f"saga {saga_id} cannot be read: {exc.error_count()} problem(s), first: "
            f"{exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))}"
        ) from exc

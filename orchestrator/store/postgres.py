"""SagaStore in PostgreSQL: one store for several orchestrators (psycopg 3 and its pool).

Several orchestrators may commit at once. Every write of a saga checks the version it was
read at, so two decisions from the same state never both land (the second gets
ConcurrentUpdateError and decides again from the stored state). Each orchestrator writes
its outbox rows under its own owner id and renews a lease on them (``heartbeat``); the rows
of one whose lease ran out are taken over by another (``claim_orphans``), with
``FOR UPDATE SKIP LOCKED`` so that two claimers never take the same row. The relay never
walks the outbox by id, so rows that commit out of id order are never skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from messages.contract.models import SagaStatus
from messages.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    StoreTransientError,
    UnreadableSagaError,
)
from orchestrator.engine import SagaState
from orchestrator.store.base import (
    LEASE_S,
    OUTBOX_COLUMNS,
    OutboxMessage,
    SagaStats,
    SqlStore,
    load,
    outbox_row,
    outbox_values,
    ts,
)

log = logging.getLogger(__name__)

POOL_WAIT_S = 2.0  # longest wait for a connection before the store counts as unreachable
FINISHED = tuple(s.value for s in SagaStatus if s.finished)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas (
    saga_id       UUID PRIMARY KEY,
    status        TEXT NOT NULL,
    reason        TEXT,
    deadline      DOUBLE PRECISION,
    waiting_since DOUBLE PRECISION,
    version       INTEGER NOT NULL,
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    state         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_deadline ON sagas (deadline) WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_status ON sagas (status, created_at);
CREATE INDEX IF NOT EXISTS sagas_waiting ON sagas (waiting_since)
    WHERE waiting_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_ended ON sagas (updated_at)
    WHERE status IN ('COMPLETED', 'COMPENSATED', 'FAILED');
CREATE TABLE IF NOT EXISTS outbox (
    id           BIGSERIAL PRIMARY KEY,
    saga_id      UUID NOT NULL,
    exchange     TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    mandatory    BOOLEAN NOT NULL,
    traceparent  TEXT,
    type         TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    content_type TEXT NOT NULL,
    timestamp    DOUBLE PRECISION NOT NULL,
    body         BYTEA NOT NULL,
    owner        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_owner ON outbox (owner);
CREATE INDEX IF NOT EXISTS outbox_message ON outbox (message_id);
CREATE TABLE IF NOT EXISTS orchestrators (
    owner       TEXT PRIMARY KEY,
    alive_until DOUBLE PRECISION NOT NULL
);
"""
# Every table and index the schema makes: when all exist, the DDL is not run at all.
_RELATIONS = re.findall(r"IF NOT EXISTS (\w+)", _SCHEMA)


class PostgresStore(SqlStore):
    """SagaStore on a PostgreSQL database that several orchestrators may share."""

    shared = True
    MARK = "%s"
    INPUT_FIELD = "(state::json -> 'input' ->> %s)"
    MINUTE = "floor(updated_at / 60)::bigint"

    def __init__(self, url: str, *, readonly: bool = False, pool_size: int = 4) -> None:
        self.owner = uuid.uuid4().hex
        self.readonly = readonly
        # Autocommit: reads see the latest commit and hold nothing open; writes are explicit
        # transactions.
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "connect_timeout": 5},
            # Reads run on the event loop: a database that is away must not hold it for long.
            timeout=POOL_WAIT_S,
            open=False,
            name="saga-store",
        )
        try:
            self._pool.open(wait=True, timeout=10)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot reach the saga store at {_redact(url)}: {exc}"
            ) from exc
        if readonly:
            self._check_schema(url)
            return
        with self._connection() as db, db.transaction():
            # One orchestrator creates the schema while the others wait for it. Only if some
            # of it is missing: CREATE INDEX IF NOT EXISTS locks its table against writes even
            # when the index exists, and holding one such lock while waiting for the next
            # deadlocks with a live orchestrator's transaction that writes both tables.
            db.execute("SELECT pg_advisory_xact_lock(7172635)")
            if _missing(db):
                db.execute(_SCHEMA)
        self.heartbeat()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a database that does not answer is StoreTransientError.

        The pool drops a connection that broke, so the next call connects afresh.
        """
        try:
            with self._pool.connection() as db:
                yield db
        except psycopg.OperationalError as exc:
            raise StoreTransientError(f"the saga store did not answer: {exc}") from exc

    def _check_schema(self, url: str) -> None:
        with self._connection() as db:
            row = db.execute("SELECT to_regclass('sagas')").fetchone()
        if row is None or row[0] is None:
            self._pool.close()
            raise ConfigurationError(
                f"no saga store at {_redact(url)}: an orchestrator creates it when it first runs"
            )

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with self._connection() as db:
            row = db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def get(self, saga_id: UUID) -> SagaState | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT state, status FROM sagas WHERE saga_id = %s", (saga_id,)
            ).fetchone()
        return self.loaded(saga_id, row)

    def commit_many(
        self,
        changes: Sequence[tuple[SagaState, Sequence[OutboxMessage]]],
        published: Sequence[int] = (),
    ) -> list[list[OutboxMessage]]:
        with self._connection() as db, db.transaction(), db.cursor() as cur:
            if published:
                cur.execute("DELETE FROM outbox WHERE id = ANY(%s)", (list(published),))
            self._write_states(cur, [state for state, _ in changes])
            rows = [(state.saga_id, m) for state, outbox in changes for m in outbox]
            ids: list[int] = []
            if rows:
                cur.executemany(
                    "INSERT INTO outbox (saga_id, exchange, routing_key, mandatory, traceparent,"
                    " type, message_id, content_type, timestamp, body, owner)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    [outbox_values(saga_id, m, self.owner) for saga_id, m in rows],
                    returning=True,
                )
                while True:
                    ids.append(cur.fetchone()[0])  # type: ignore[index]
                    if not cur.nextset():
                        break
        stored = iter(ids)
        return [[dataclasses.replace(m, id=next(stored)) for m in outbox] for _, outbox in changes]

    def _write_states(self, cur: psycopg.Cursor[Any], states: Sequence[SagaState]) -> None:
        """Insert new sagas and update the others, each only from the version it was read at."""
        new = [s for s in states if s.version == 0]
        known = [s for s in states if s.version != 0]
        if new:
            cur.executemany(
                "INSERT INTO sagas (status, reason, deadline, waiting_since, version, updated_at,"
                " state, saga_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (saga_id) DO NOTHING",
                [(*_values(s), ts(s.created_at)) for s in new],
            )
            if cur.rowcount != len(new):
                raise ConcurrentUpdateError(f"saga {_names(new)} already exists")
        if known:
            cur.executemany(
                "UPDATE sagas SET status = %s, reason = %s, deadline = %s, waiting_since = %s,"
                " version = %s, updated_at = %s, state = %s WHERE saga_id = %s AND version = %s",
                [(*_values(s), s.version) for s in known],
            )
            if cur.rowcount != len(known):
                raise ConcurrentUpdateError(f"saga {_names(known)} changed since it was read")

    def due(self, now: datetime, limit: int) -> list[SagaState]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT saga_id, state FROM sagas WHERE deadline <= %s ORDER BY deadline LIMIT %s",
                (now.timestamp(), limit),
            ).fetchall()
        due = []
        for saga_id, blob in rows:
            try:
                due.append(load(saga_id, blob))
            except UnreadableSagaError as exc:
                self.quarantine(saga_id, str(exc))
        return due

    def quarantine(self, saga_id: UUID, why: str) -> None:
        log.error("saga %s quarantined: %s", saga_id, why, extra={"saga_id": str(saga_id)})
        with self._connection() as db:
            db.execute(
                # A new version, so a decision about to commit on the old state fails.
                "UPDATE sagas SET status = %s, reason = %s, deadline = NULL,"
                " waiting_since = NULL, version = version + 1 WHERE saga_id = %s",
                (SagaStatus.QUARANTINED.value, why[:500], saga_id),
            )

    def quarantined(self, limit: int) -> list[tuple[str, str, datetime]]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT saga_id, reason, updated_at FROM sagas WHERE status = %s"
                " ORDER BY updated_at DESC LIMIT %s",
                (SagaStatus.QUARANTINED.value, limit),
            ).fetchall()
        return [(str(i), why, datetime.fromtimestamp(at, UTC)) for i, why, at in rows]

    def stuck(self, now: datetime, after_s: float) -> int:
        cutoff = now.timestamp() - after_s
        return int(self._one("SELECT count(*) FROM sagas WHERE waiting_since <= %s", (cutoff,)))

    def outbox(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        with self._connection() as db:
            rows = db.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > %s ORDER BY id LIMIT %s",
                (after, limit),
            ).fetchall()
        return [outbox_row(row) for row in rows]

    def prune(self, ended_before: datetime, limit: int) -> int:
        with self._connection() as db:
            return db.execute(
                "DELETE FROM sagas WHERE saga_id IN (SELECT saga_id FROM sagas"
                " WHERE status IN ('COMPLETED', 'COMPENSATED', 'FAILED') AND updated_at < %s"
                " LIMIT %s)",
                (ended_before.timestamp(), limit),
            ).rowcount

    def heartbeat(self) -> None:
        with self._connection() as db:
            db.execute(
                "INSERT INTO orchestrators (owner, alive_until) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET alive_until = EXCLUDED.alive_until",
                (self.owner, time.time() + LEASE_S),
            )

    def claim_orphans(self, limit: int) -> list[OutboxMessage]:
        now = time.time()
        with self._connection() as db, db.transaction():
            rows = db.execute(
                f"UPDATE outbox SET owner = %s WHERE id IN (SELECT id FROM outbox"
                f" WHERE owner != %s AND owner NOT IN"
                f" (SELECT owner FROM orchestrators WHERE alive_until > %s)"
                f" ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {OUTBOX_COLUMNS}",
                (self.owner, self.owner, now, limit),
            ).fetchall()
            # Leases long gone: their rows, if any were left, have just been taken.
            db.execute("DELETE FROM orchestrators WHERE alive_until < %s", (now - 10 * LEASE_S,))
        return sorted((outbox_row(row) for row in rows), key=lambda row: row.id or 0)

    def outbox_done(self, ids: Iterable[int]) -> None:
        with self._connection() as db:
            db.execute("DELETE FROM outbox WHERE id = ANY(%s)", (list(ids),))

    def outbox_depth(self) -> int:
        return int(self._one("SELECT count(*) FROM outbox"))

    def outbox_holds(self, message_id: str) -> bool:
        found = self._one("SELECT 1 FROM outbox WHERE message_id = %s LIMIT 1", (message_id,))
        return found is not None

    def _select(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        with self._connection() as db:
            return list(db.execute(sql, args).fetchall())

    def counts(self) -> dict[str, int]:
        with self._connection() as db:
            rows = db.execute("SELECT status, count(*) FROM sagas GROUP BY status").fetchall()
        return {status: int(count) for status, count in rows}

    def stats(self) -> SagaStats:
        by_status = self.counts()
        with self._connection() as db:
            outcomes = db.execute(
                "SELECT status, reason, count(*) FROM sagas WHERE status = ANY(%s)"
                " GROUP BY status, reason ORDER BY count(*) DESC",
                (list(FINISHED),),
            ).fetchall()
            durations = db.execute(
                "SELECT updated_at - created_at FROM sagas WHERE status = ANY(%s) ORDER BY 1",
                (list(FINISHED),),
            ).fetchall()
            oldest = db.execute(
                "SELECT state FROM sagas WHERE status IN (%s, %s) ORDER BY created_at LIMIT 1",
                (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value),
            ).fetchone()
        return SagaStats(
            by_status=by_status,
            by_outcome={f"{s} {r or ''}".strip(): int(n) for s, r, n in outcomes},
            durations_s=[float(d) for (d,) in durations],
            oldest_running=None if oldest is None else load("oldest running", oldest[0]),
        )

    def close(self) -> None:
        if not self.readonly:
            try:  # let the others take over this one's rows at once, not after the lease
                with self._pool.connection(timeout=2) as db:
                    db.execute("DELETE FROM orchestrators WHERE owner = %s", (self.owner,))
            except Exception:
                log.warning("could not give up the outbox lease; it runs out by itself")
        self._pool.close()


def _values(state: SagaState) -> tuple[Any, ...]:
    """The columns of a saga as stored, after its commit: version + 1."""
    stored = state.model_copy(update={"version": state.version + 1})
    return (
        stored.status.value,
        stored.reason,
        ts(stored.deadline),
        ts(stored.waiting_since),
        stored.version,
        ts(stored.updated_at),
        stored.model_dump_json(),
        stored.saga_id,
    )


def _names(states: Sequence[SagaState]) -> str:
    """Which sagas a failed write was about: one, or one of several."""
    if len(states) == 1:
        return str(states[0].saga_id)
    return f"{states[0].saga_id} or one of {len(states) - 1} more"


def _redact(url: str) -> str:
    """The URL without its password, for errors and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable PostgreSQL URL)"
    return " ".join(f"{k}={'***' if k == 'password' else v}" for k, v in info.items())


def _missing(db: psycopg.Connection[Any]) -> int:
    """How many of the schema's tables and indexes do not exist (in the search path)."""
    row = db.execute(
        "SELECT count(*) FROM unnest(%s::text[]) AS r WHERE to_regclass(r) IS NULL",
        (_RELATIONS,),
    ).fetchone()
    return int(row[0]) if row else len(_RELATIONS)

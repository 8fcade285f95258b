"""The SQLite store on a real file: saga state and its outbox, committed together, kept safe.

States come from the real engine so that what is stored is what the orchestrator stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from messages.codec import encode
from messages.errors import ConcurrentUpdateError, SagaError
from messages.models import (
    CommandFailed,
    CommandSucceeded,
    Money,
    PlaceOrder,
    SagaStatus,
)
from orchestrator.definition import RetryPolicy, order_saga
from orchestrator.engine import Decision, PublishResult, SagaState, SendCommand, on_reply, start
from orchestrator.store import OutboxMessage, SqliteStore

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TIMEOUT_S = 10.0
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SAGA = order_saga(RetryPolicy(TIMEOUT_S, 3), RetryPolicy(5.0, 2))


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "orchestrator.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(db_path)
    yield opened
    opened.close()


def place_order(saga_id: UUID | None = None) -> PlaceOrder:
    return PlaceOrder(
        saga_id=saga_id or uuid4(),
        created_at=T0,
        customer_id="cust-42",
        sku="SKU-1",
        quantity=2,
        amount=Money(amount=Decimal("25.50")),
    )


def started(at: datetime = T0, saga_id: UUID | None = None) -> Decision:
    """A new saga, as the engine starts it: RUNNING, ReserveStock pending until at + timeout."""
    return start(SAGA, place_order(saga_id), "amq.gen-reply", at)


def outbox_of(decision: Decision) -> list[OutboxMessage]:
    """The outbox rows for a decision (commands to their participant, results to events)."""
    rows = []
    for out in decision.outbox:
        if isinstance(out, SendCommand):
            rows.append(OutboxMessage("saga.commands", out.participant, encode(out.command)))
        else:
            assert isinstance(out, PublishResult)
            rows.append(
                OutboxMessage(
                    "saga.events",
                    "saga.done",
                    encode(out.event),
                    mandatory=False,
                    traceparent=TRACE,
                )
            )
    return rows


def answer(decision: Decision, ok: bool, at: datetime) -> Decision:
    """The participant answers the pending command of ``decision``."""
    (out,) = decision.outbox
    assert isinstance(out, SendCommand)
    fields = {
        "saga_id": out.command.saga_id,
        "command_id": out.command.message_id,
        "command_type": type(out.command).__name__,
        "participant": out.participant,
    }
    reply = CommandSucceeded(**fields) if ok else CommandFailed(**fields, reason="no")
    return on_reply(SAGA, decision.state, reply, at)


def without_ids(rows: list[OutboxMessage]) -> list[OutboxMessage]:
    return [
        OutboxMessage(r.exchange, r.routing_key, r.wire, r.mandatory, r.traceparent) for r in rows
    ]


def commit_advanced(store: SqliteStore, stored: SagaState, decision: Decision) -> SagaState:
    """Commit the engine's next state for a saga read as ``stored`` (carrying its version)."""
    return store.commit(
        decision.state.model_copy(update={"version": stored.version}), outbox_of(decision)
    )


# --- commit and get --------------------------------------------------------------------------


def test_a_new_saga_is_stored_with_version_1(store: SqliteStore) -> None:
    decision = started()

    stored = store.commit(decision.state, outbox_of(decision))

    assert stored.version == 1
    loaded = store.get(decision.state.saga_id)
    assert loaded is not None
    assert loaded == stored
    assert loaded.model_copy(update={"version": 0}) == decision.state


def test_an_unknown_saga_is_none(store: SqliteStore) -> None:
    store.commit(started().state, [])

    assert store.get(uuid4()) is None


def test_each_commit_bumps_the_version(store: SqliteStore) -> None:
    first = started()
    v1 = store.commit(first.state, outbox_of(first))

    second = answer(first, ok=True, at=T0 + timedelta(seconds=1))
    v2 = commit_advanced(store, v1, second)

    assert v2.version == 2
    loaded = store.get(v1.saga_id)
    assert loaded is not None
    assert loaded.version == 2
    assert loaded.step == 1
    assert loaded.history == second.state.history


def test_a_stale_version_is_refused_and_changes_nothing(store: SqliteStore) -> None:
    # Given a saga stored and then advanced by one writer
    first = started()
    v1 = store.commit(first.state, outbox_of(first))
    reserved = answer(first, ok=True, at=T0 + timedelta(seconds=1))
    v2 = commit_advanced(store, v1, reserved)
    outbox_before = store.outbox(100)

    # When another writer, who read version 1, commits its own decision
    refused = answer(first, ok=False, at=T0 + timedelta(seconds=2))
    with pytest.raises(ConcurrentUpdateError, match=str(v1.saga_id)):
        commit_advanced(store, v1, refused)

    # Then the first writer's state and outbox are untouched
    assert store.get(v1.saga_id) == v2
    assert store.outbox(100) == outbox_before
    assert store.outbox_depth() == 2


def test_a_second_start_of_the_same_saga_is_refused_and_changes_nothing(
    store: SqliteStore,
) -> None:
    saga_id = uuid4()
    first = store.commit(started(saga_id=saga_id).state, [])

    with pytest.raises(ConcurrentUpdateError, match="already exists"):
        store.commit(started(T0 + timedelta(seconds=1), saga_id).state, outbox_of(started()))

    assert store.get(saga_id) == first
    assert store.outbox_depth() == 0


def test_concurrent_update_error_is_a_saga_error() -> None:
    assert issubclass(ConcurrentUpdateError, SagaError)


# --- the outbox ------------------------------------------------------------------------------


def test_outbox_rows_come_back_in_commit_order_until_done(store: SqliteStore) -> None:
    # Given two sagas: one started, one finished at once (its first step refused)
    a = started(saga_id=UUID("00000000-0000-4000-8000-00000000000a"))
    b_start = started(saga_id=UUID("00000000-0000-4000-8000-00000000000b"))
    b_done = answer(b_start, ok=False, at=T0 + timedelta(seconds=1))
    rows_a, rows_b = outbox_of(a), outbox_of(b_start) + outbox_of(b_done)
    store.commit(a.state, rows_a)
    b1 = store.commit(b_start.state, outbox_of(b_start))
    commit_advanced(store, b1, b_done)

    # Then the outbox holds every row, oldest first, exactly as committed
    pending = store.outbox(100)
    assert without_ids(pending) == rows_a + rows_b
    assert [row.wire.type for row in pending] == ["ReserveStock", "ReserveStock", "SagaFinished"]
    assert pending[2].traceparent == TRACE and pending[2].mandatory is False
    assert pending[0].wire.correlation_id == str(a.state.saga_id)
    assert store.outbox(2) == pending[:2]
    assert store.outbox_depth() == 3

    # When the first two are confirmed by the broker
    store.outbox_done([row.id for row in pending[:2] if row.id is not None])

    # Then only the third is left
    assert store.outbox(100) == pending[2:]
    assert store.outbox_depth() == 1


def test_outbox_ids_are_increasing(store: SqliteStore) -> None:
    for _ in range(3):
        decision = started()
        store.commit(decision.state, outbox_of(decision))

    ids = [row.id for row in store.outbox(100)]

    assert None not in ids
    assert ids == sorted(ids) and len(set(ids)) == 3


# --- deadlines -------------------------------------------------------------------------------


def test_due_returns_only_sagas_whose_deadline_has_passed(store: SqliteStore) -> None:
    # Given three running sagas started 0 s, 5 s and 20 s in, and one already finished
    early = store.commit(started(T0).state, [])
    middle = store.commit(started(T0 + timedelta(seconds=5)).state, [])
    late = store.commit(started(T0 + timedelta(seconds=20)).state, [])
    first = started(T0)
    finished = answer(first, ok=False, at=T0 + timedelta(seconds=1))
    assert finished.state.status is SagaStatus.COMPENSATED
    store.commit(finished.state, [])

    def due_at(seconds: float, limit: int = 100) -> list[UUID]:
        return [s.saga_id for s in store.due(T0 + timedelta(seconds=seconds), limit)]

    # Then nothing is due before the first deadline, and a deadline is due at its instant
    assert due_at(TIMEOUT_S - 0.5) == []
    assert due_at(TIMEOUT_S) == [early.saga_id]
    # and sagas come earliest deadline first, never the finished one, up to the limit
    assert due_at(TIMEOUT_S + 5) == [early.saga_id, middle.saga_id]
    assert due_at(3600) == [early.saga_id, middle.saga_id, late.saga_id]
    assert due_at(3600, limit=1) == [early.saga_id]


# --- durability ------------------------------------------------------------------------------


def test_state_and_outbox_survive_closing_and_reopening(db_path: Path) -> None:
    decision = started()
    first = SqliteStore(db_path)
    stored = first.commit(decision.state, outbox_of(decision))
    first.close()

    reopened = SqliteStore(db_path)
    try:
        assert reopened.get(decision.state.saga_id) == stored
        assert without_ids(reopened.outbox(100)) == outbox_of(decision)
        assert [s.saga_id for s in reopened.due(T0 + timedelta(hours=1), 10)] == [stored.saga_id]
        # and it carries on where it left off
        following = answer(decision, ok=True, at=T0 + timedelta(seconds=1))
        assert commit_advanced(reopened, stored, following).version == 2
    finally:
        reopened.close()


@pytest.mark.parametrize("directory", ["data", "a#b", "what?", "100%41"])
def test_a_readonly_store_reads_what_the_service_wrote(tmp_path: Path, directory: str) -> None:
    db_path = tmp_path / directory / "orchestrator.db"
    decision = started()
    writer = SqliteStore(db_path)
    stored = writer.commit(decision.state, outbox_of(decision))
    writer.close()

    reader = SqliteStore(db_path, readonly=True)
    try:
        assert reader.get(stored.saga_id) == stored
        assert reader.sagas(SagaStatus.RUNNING, 10) == [stored]
        assert reader.sagas(SagaStatus.COMPLETED, 10) == []
        assert reader.outbox_depth() == 1
    finally:
        reader.close()


def test_a_readonly_store_on_a_missing_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "orchestrator.db"

    with pytest.raises(SagaError, match="no store at") as caught:
        SqliteStore(missing, readonly=True)

    assert str(missing) in str(caught.value)
    assert "SAGA_DATA_DIR" in str(caught.value)
    assert not missing.exists()
    assert not missing.parent.exists()


def test_sagas_lists_newest_first_and_filters_by_status(store: SqliteStore) -> None:
    older = store.commit(started(T0).state, [])
    newer = store.commit(started(T0 + timedelta(minutes=1)).state, [])
    first = started(T0 + timedelta(minutes=2))
    done = answer(first, ok=False, at=T0 + timedelta(minutes=3))
    compensated = store.commit(done.state, [])

    assert [s.saga_id for s in store.sagas(None, 10)] == [
        compensated.saga_id,
        newer.saga_id,
        older.saga_id,
    ]
    assert [s.saga_id for s in store.sagas(SagaStatus.RUNNING, 10)] == [
        newer.saga_id,
        older.saga_id,
    ]
    assert [s.saga_id for s in store.sagas(SagaStatus.COMPENSATED, 10)] == [compensated.saga_id]
    assert len(store.sagas(None, 2)) == 2

"""The stores on a real SQLite file and a real PostgreSQL: saga state and its outbox, kept safe.

Every behaviour of the SagaStore protocol runs against both engines; what only one of them
does (SQLite's one-writer lock, PostgreSQL's shared outbox leases) is tested on its own.
States come from the real engine so that what is stored is what the orchestrator stores.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest

from messages.contract.codec import encode
from messages.contract.models import (
    CommandFailed,
    CommandSucceeded,
    Money,
    PlaceOrder,
    SagaStatus,
)
from messages.errors import (
    AlreadyRunningError,
    ConcurrentUpdateError,
    SagaError,
    UnreadableSagaError,
)
from orchestrator.definition import order_saga
from orchestrator.engine import (
    Decision,
    PublishResult,
    SagaState,
    SendCommand,
    on_reply,
    start,
)
from orchestrator.store import OutboxMessage, SagaFilter, SagaStore, SqliteStore, order_fields
from orchestrator.store.postgres import PostgresStore

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TIMEOUT_S = 10.0
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SAGA = order_saga(TIMEOUT_S, 3)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "orchestrator.db"


@dataclass(frozen=True)
class Backend:
    """A store engine under test, and what a test does behind the store's back."""

    name: str
    open: Callable[..., SagaStore]  # readonly=... as the stores take it
    run_sql: Callable[[str, tuple[object, ...]], None]  # in the engine's own placeholders


def _sqlite(db_path: Path) -> Backend:
    def run_sql(sql: str, args: tuple[object, ...]) -> None:
        with sqlite3.connect(db_path) as db:
            db.execute(sql, args)
        db.close()

    return Backend("sqlite", lambda **kw: SqliteStore(db_path, **kw), run_sql)


def _postgres(url: str) -> Backend:
    def run_sql(sql: str, args: tuple[object, ...]) -> None:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]

    return Backend("postgres", lambda **kw: PostgresStore(url, **kw), run_sql)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, db_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite(db_path)
    return _postgres(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(backend: Backend) -> Iterator[SagaStore]:
    opened = backend.open()
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


def commit_advanced(store: SagaStore, stored: SagaState, decision: Decision) -> SagaState:
    """Commit the engine's next state for a saga read as ``stored`` (carrying its version)."""
    return store.commit(
        decision.state.model_copy(update={"version": stored.version}), outbox_of(decision)
    )


# --- commit and get --------------------------------------------------------------------------


def test_a_new_saga_is_stored_with_version_1(store: SagaStore) -> None:
    decision = started()

    stored = store.commit(decision.state, outbox_of(decision))

    assert stored.version == 1
    loaded = store.get(decision.state.saga_id)
    assert loaded is not None
    assert loaded == stored
    assert loaded.model_copy(update={"version": 0}) == decision.state


def test_an_unknown_saga_is_none(store: SagaStore) -> None:
    store.commit(started().state, [])

    assert store.get(uuid4()) is None


def test_each_commit_bumps_the_version(store: SagaStore) -> None:
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


def test_a_stale_version_is_refused_and_changes_nothing(store: SagaStore) -> None:
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
    store: SagaStore,
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


def test_outbox_rows_come_back_in_commit_order_until_done(store: SagaStore) -> None:
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


def test_outbox_ids_are_increasing(store: SagaStore) -> None:
    for _ in range(3):
        decision = started()
        store.commit(decision.state, outbox_of(decision))

    ids = [row.id for row in store.outbox(100)]

    assert None not in ids
    assert ids == sorted(ids) and len(set(ids)) == 3


# --- deadlines -------------------------------------------------------------------------------


def test_due_returns_only_sagas_whose_deadline_has_passed(store: SagaStore) -> None:
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


def test_the_outbox_says_which_commands_the_broker_has_not_taken_yet(
    store: SagaStore,
) -> None:
    # Given a saga committed while the broker is down: ReserveStock waits in the outbox
    decision = start(SAGA, place_order(), "amq.gen-reply", T0)
    store.commit(decision.state, outbox_of(decision))
    command = str(decision.state.pending)

    # Then the outbox holds it, until the broker confirms it and the row goes
    assert store.outbox_holds(command)
    store.outbox_done([row.id for row in store.outbox(10) if row.id is not None])
    assert not store.outbox_holds(command)


# --- stuck sagas -----------------------------------------------------------------------------


def test_stuck_counts_the_sagas_that_have_waited_that_long(store: SagaStore) -> None:
    # Given a saga waiting since T0, one since 200 s in, and one that finished at once
    store.commit(started(T0).state, [])
    store.commit(started(T0 + timedelta(seconds=200)).state, [])
    store.commit(answer(started(T0), ok=False, at=T0 + timedelta(seconds=1)).state, [])

    def stuck_at(seconds: float) -> int:
        return store.stuck(T0 + timedelta(seconds=seconds), after_s=300)

    assert stuck_at(299) == 0
    assert stuck_at(300) == 1
    assert stuck_at(500) == 2
    assert stuck_at(86_400) == 2  # a finished saga waits for nothing


# --- sagas that cannot be read ---------------------------------------------------------------


def corrupt(backend: Backend, saga_id: UUID, blob: str = '{"saga_id": "half a row') -> None:
    """Damage a stored saga behind the store's back."""
    backend.run_sql("UPDATE sagas SET state = ? WHERE saga_id = ?", (blob, str(saga_id)))


def test_an_unreadable_saga_is_quarantined_and_the_others_go_on(
    store: SagaStore, backend: Backend
) -> None:
    # Given two running sagas past their deadline, one of them damaged
    good = store.commit(started(T0).state, [])
    bad = store.commit(started(T0).state, [])
    corrupt(backend, bad.saga_id)
    later = T0 + timedelta(hours=1)

    # When the timer asks for what is due
    due = store.due(later, 10)

    # Then it gets the good one, and the damaged one is set aside where an operator finds it
    assert [s.saga_id for s in due] == [good.saga_id]
    ((saga_id, why, when),) = store.quarantined(10)
    assert saga_id == str(bad.saga_id)
    assert "cannot be read" in why
    assert when.tzinfo is not None
    assert store.counts()[SagaStatus.QUARANTINED] == 1
    # and it is not handed out again, listed as a saga, or counted as stuck
    assert [s.saga_id for s in store.due(later, 10)] == [good.saga_id]
    assert [s.saga_id for s in store.sagas(SagaFilter(), 10)] == [good.saga_id]
    assert store.stuck(later, after_s=300) == 1
    with pytest.raises(UnreadableSagaError, match=str(bad.saga_id)):
        store.get(bad.saga_id)


def test_a_saga_of_an_unknown_shape_is_quarantined_too(store: SagaStore, backend: Backend) -> None:
    bad = store.commit(started(T0).state, [])
    corrupt(backend, bad.saga_id, json.dumps({"saga_id": str(bad.saga_id), "status": "BOGUS"}))

    assert store.due(T0 + timedelta(hours=1), 10) == []

    assert [row[0] for row in store.quarantined(10)] == [str(bad.saga_id)]


# --- one orchestrator per store --------------------------------------------------------------


def test_a_second_orchestrator_on_the_same_sqlite_store_is_refused(db_path: Path) -> None:
    store = SqliteStore(db_path)
    stored = store.commit(started().state, [])

    with pytest.raises(AlreadyRunningError, match="another orchestrator") as refused:
        SqliteStore(db_path)

    assert str(db_path) in str(refused.value)
    # the first one is unharmed, and reading alongside it (saga list, stats) still works
    assert store.get(stored.saga_id) == stored
    reader = SqliteStore(db_path, readonly=True)
    try:
        assert reader.get(stored.saga_id) == stored
    finally:
        reader.close()
        store.close()


def test_the_store_is_free_again_once_its_orchestrator_closes_it(db_path: Path) -> None:
    SqliteStore(db_path).close()

    again = SqliteStore(db_path)

    again.close()


# --- outbox rows no live orchestrator holds -------------------------------------------------


def test_rows_an_earlier_run_left_are_claimed_once_and_new_ones_are_not(
    backend: Backend,
) -> None:
    # Given an orchestrator that committed a saga and stopped before publishing its command
    first = backend.open()
    left = started()
    first.commit(left.state, outbox_of(left))
    first.close()

    # When the next one starts and commits a saga of its own
    second = backend.open()
    try:
        fresh = started()
        second.commit(fresh.state, outbox_of(fresh))

        # Then it claims the earlier run's row, once, and never its own (it has that in memory)
        claimed = second.claim_orphans(100)
        assert [row.wire.message_id for row in claimed] == [str(left.state.pending)]
        assert second.claim_orphans(100) == []
        assert second.outbox_depth() == 2
    finally:
        second.close()


@pytest.mark.postgres
def test_a_live_orchestrators_rows_are_left_to_it_and_a_dead_ones_taken_over(
    postgres_url: str,
) -> None:
    # Given two orchestrators sharing a store, each with a command not yet published
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        of_a, of_b = started(), started()
        a.commit(of_a.state, outbox_of(of_a))
        b.commit(of_b.state, outbox_of(of_b))

        # Then while both renew their lease, neither takes the other's rows
        assert a.claim_orphans(100) == [] and b.claim_orphans(100) == []

        # When A's lease runs out (it froze, or died without closing)
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute("UPDATE orchestrators SET alive_until = 0 WHERE owner = %s", (a.owner,))

        # Then B takes A's row, once, and A's own claims find nothing of B's
        taken = b.claim_orphans(100)
        assert [row.wire.message_id for row in taken] == [str(of_a.state.pending)]
        assert b.claim_orphans(100) == []
        # and a heartbeat brings A back to life without giving it its row back
        a.heartbeat()
        assert a.claim_orphans(100) == []
    finally:
        a.close()
        b.close()


@pytest.mark.postgres
def test_an_orchestrator_starts_while_another_one_is_writing(postgres_url: str) -> None:
    # Given a store, and another orchestrator in the middle of a transaction that has written
    # to the outbox (and may write to sagas next)
    first = PostgresStore(postgres_url)
    opened: list[PostgresStore] = []
    starting = threading.Thread(target=lambda: opened.append(PostgresStore(postgres_url)))
    try:
        with psycopg.connect(postgres_url) as writer:  # not autocommit: the transaction stays
            writer.execute("LOCK TABLE outbox IN ROW EXCLUSIVE MODE")  # what an INSERT takes

            # When a second orchestrator starts (a restart beside a live one)
            starting.start()
            starting.join(5)

            # Then it opens without waiting for that transaction: the schema is there, so it
            # takes none of the table locks whose wait deadlocked with the writer's
            assert opened, "the second orchestrator waited for another one's write"
            writer.rollback()
    finally:
        starting.join(10)
        for store in [first, *opened]:
            store.close()


@pytest.mark.postgres
def test_two_orchestrators_never_both_commit_from_the_same_state(postgres_url: str) -> None:
    # Given a saga two orchestrators have read at the same version
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        decision = started()
        stored = a.commit(decision.state, outbox_of(decision))
        read_by_b = b.get(stored.saga_id)
        assert read_by_b == stored

        # When A decides and commits first
        commit_advanced(a, stored, answer(decision, ok=True, at=T0 + timedelta(seconds=1)))

        # Then B's decision from the state it read is refused, and changes nothing
        late = answer(decision, ok=False, at=T0 + timedelta(seconds=1))
        with pytest.raises(ConcurrentUpdateError, match=str(stored.saga_id)):
            commit_advanced(b, read_by_b, late)
        current = b.get(stored.saga_id)
        assert current is not None and current.version == 2
        assert current.status is SagaStatus.RUNNING
        # and so is a second start of the same saga from a redelivered request
        with pytest.raises(ConcurrentUpdateError, match="already exists"):
            b.commit(decision.state, [])
    finally:
        a.close()
        b.close()


# --- durability ------------------------------------------------------------------------------


def test_state_and_outbox_survive_closing_and_reopening(backend: Backend) -> None:
    decision = started()
    first = backend.open()
    stored = first.commit(decision.state, outbox_of(decision))
    first.close()

    reopened = backend.open()
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
        assert reader.sagas(SagaFilter(SagaStatus.RUNNING), 10) == [stored]
        assert reader.sagas(SagaFilter(SagaStatus.COMPLETED), 10) == []
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


@pytest.mark.postgres
def test_a_readonly_postgres_store_reads_and_says_when_there_is_none(postgres_url: str) -> None:
    # Given an empty database: the CLI is refused with a reason, and creates nothing
    with pytest.raises(SagaError, match="no saga store at"):
        PostgresStore(postgres_url, readonly=True)
    # Given what an orchestrator wrote: the CLI reads it
    writer = PostgresStore(postgres_url)
    stored = writer.commit(started().state, [])
    reader = PostgresStore(postgres_url, readonly=True)
    try:
        assert reader.get(stored.saga_id) == stored
        assert reader.sagas(SagaFilter(SagaStatus.RUNNING), 10) == [stored]
    finally:
        reader.close()
        writer.close()


def test_sagas_lists_newest_first_and_filters_by_status(store: SagaStore) -> None:
    older = store.commit(started(T0).state, [])
    newer = store.commit(started(T0 + timedelta(minutes=1)).state, [])
    first = started(T0 + timedelta(minutes=2))
    done = answer(first, ok=False, at=T0 + timedelta(minutes=3))
    compensated = store.commit(done.state, [])

    assert [s.saga_id for s in store.sagas(SagaFilter(), 10)] == [
        compensated.saga_id,
        newer.saga_id,
        older.saga_id,
    ]
    assert [s.saga_id for s in store.sagas(SagaFilter(SagaStatus.RUNNING), 10)] == [
        newer.saga_id,
        older.saga_id,
    ]
    compensated_only = store.sagas(SagaFilter(SagaStatus.COMPENSATED), 10)
    assert [s.saga_id for s in compensated_only] == [compensated.saga_id]
    assert len(store.sagas(SagaFilter(), 2)) == 2


def test_sagas_filter_by_reason_input_stuck_and_age_and_page(store: SagaStore) -> None:
    """What `saga list` and the console filter on, done by the store, then paged."""
    first = started(T0)
    declined = store.commit(answer(first, ok=False, at=T0 + timedelta(seconds=1)).state, [])
    other = start(SAGA, place_order().model_copy(update={"sku": "SKU-2"}), "amq.gen-r", T0)
    waiting = store.commit(other.state, [])  # waiting since T0 for ReserveStock
    recent = store.commit(started(T0 + timedelta(minutes=10)).state, [])

    def ids(where: SagaFilter, limit: int = 10, offset: int = 0) -> list[UUID]:
        return [s.saga_id for s in store.sagas(where, limit, offset)]

    assert ids(SagaFilter(reason="NO")) == [declined.saga_id]  # any case, part of the reason
    assert ids(SagaFilter(reason="declined")) == []
    assert ids(SagaFilter(reason="_")) == []  # a character to find, not a wildcard
    assert ids(SagaFilter(reason="%")) == []
    assert ids(SagaFilter(input=order_fields(sku="SKU-2"))) == [waiting.saga_id]
    assert ids(SagaFilter(input=order_fields(customer_id="cust-42", sku="SKU-1"))) == [
        recent.saga_id,
        declined.saga_id,
    ]
    assert ids(SagaFilter(input=order_fields(customer_id="cust-7"))) == []
    stuck_before = T0 + timedelta(minutes=5)
    assert ids(SagaFilter(stuck_before=stuck_before)) == [waiting.saga_id]
    assert ids(SagaFilter(since=T0 + timedelta(minutes=1))) == [recent.saga_id]
    everything = ids(SagaFilter())
    assert len(everything) == 3
    assert ids(SagaFilter(), limit=2) + ids(SagaFilter(), limit=2, offset=2) == everything


# The sagas table as the previous version created it: no waiting_since column.
_OLD_SAGAS_TABLE = """
CREATE TABLE sagas (
    saga_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, deadline REAL,
    version INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    state TEXT NOT NULL
)
"""


def test_a_store_written_by_the_previous_version_opens_and_its_sagas_load(db_path: Path) -> None:
    # Given a store of the previous version, holding a saga with its retired fields
    state = started().state
    old = state.model_dump(mode="json", exclude={"watchers", "wait_s", "waiting_since"})
    old |= {"generation": 1, "failed_compensations": [], "version": 3}
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute(_OLD_SAGAS_TABLE)
        db.execute(
            "INSERT INTO sagas VALUES (?, 'RUNNING', NULL, ?, 3, ?, ?, ?)",
            (
                str(state.saga_id),
                T0.timestamp() + TIMEOUT_S,
                T0.timestamp(),
                T0.timestamp(),
                json.dumps(old),
            ),
        )
    db.close()

    # When this version opens it
    store = SqliteStore(db_path)
    try:
        # Then the saga loads, is due as before, and carries on
        loaded = store.get(state.saga_id)
        assert loaded is not None
        assert (loaded.pending, loaded.history, loaded.version) == (
            state.pending,
            state.history,
            3,
        )
        assert [s.saga_id for s in store.due(T0 + timedelta(hours=1), 10)] == [state.saga_id]
        assert store.stuck(T0 + timedelta(days=1), after_s=300) == 0
        new = store.commit(started().state, [])
        assert store.stuck(T0 + timedelta(days=1), after_s=300) == 1
        assert new.version == 1
    finally:
        store.close()


def test_finished_per_minute_counts_ended_sagas_by_minute_and_state(store: SagaStore) -> None:
    """The console's throughput: sagas that ended, by the minute they ended in."""
    declined = answer(started(T0), ok=False, at=T0 + timedelta(seconds=30))
    store.commit(declined.state, [])
    late = answer(started(T0), ok=False, at=T0 + timedelta(seconds=90))
    store.commit(late.state, [])
    store.commit(started(T0).state, [])  # running: not counted
    minute = int(T0.timestamp()) // 60

    assert sorted(store.finished_per_minute(T0)) == [
        ("COMPENSATED", minute, 1),
        ("COMPENSATED", minute + 1, 1),
    ]
    assert store.finished_per_minute(T0 + timedelta(seconds=60)) == [("COMPENSATED", minute + 1, 1)]

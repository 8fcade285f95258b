"""Data that does not grow forever: what is past SAGA_RETENTION_DAYS goes, and stays gone.

Pruning must never reopen the door to a duplicate: a request or command older than the
retention, whose records may have been pruned, is refused rather than handled again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from messages.contract import topology
from messages.contract.models import Money, PlaceOrder, ReserveStock, SagaStatus
from orchestrator import engine
from orchestrator.definition import order_saga
from orchestrator.store import SqliteStore
from tests.integration.stack import Stack, amqp_channel, drain, send
from workers import inventory
from workers.runtime import open_db

pytestmark = pytest.mark.broker

NOW = datetime.now(UTC)


def order(placed_at: datetime) -> PlaceOrder:
    return PlaceOrder(
        saga_id=uuid.uuid4(),
        customer_id="c-1",
        sku="item-1",
        quantity=1,
        amount=Money(amount=Decimal("25.00")),
        created_at=placed_at,
    )


def finished_saga(ended_at: datetime) -> engine.SagaState:
    started = engine.start(order_saga(5.0, 3), order(ended_at), None, ended_at, None).state
    return started.model_copy(
        update={"status": SagaStatus.COMPLETED, "deadline": None, "updated_at": ended_at}
    )


def test_an_order_older_than_the_retention_is_refused_not_started(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10")
    stack.orchestrator(SAGA_RETENTION_DAYS="30")
    old = order(NOW - timedelta(days=31))
    with amqp_channel(stack.amqp_url) as channel:
        send(channel, topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY, old)
        ((props, _),) = drain(channel, topology.dead_letter_queue(topology.REQUESTS_QUEUE), 1)
    assert props.message_id == str(old.message_id)
    assert props.headers[topology.REASON_HEADER] == "too_old"
    assert "SAGA_RETENTION_DAYS=30" in props.headers[topology.DETAIL_HEADER]
    assert stack.query("orchestrator", "SELECT count(*) FROM sagas") == [(0,)]
    assert stack.stock("item-1") == 10

    # A current order goes through as ever
    code, result = stack.place_order(
        "--customer", "c-1", "--sku", "item-1", "--qty", "1", "--amount", "25.00"
    )
    assert (code, result["status"]) == (0, "COMPLETED")


def test_a_command_older_than_the_retention_and_not_yet_seen_is_refused(stack: Stack) -> None:
    stack.worker("inventory", "--stock", "item-1=10", SAGA_RETENTION_DAYS="30")
    old = ReserveStock(
        saga_id=uuid.uuid4(),
        sku="item-1",
        quantity=1,
        created_at=NOW - timedelta(days=31),
    )
    queue = topology.command_queue("inventory")
    with amqp_channel(stack.amqp_url) as channel:
        send(channel, topology.COMMANDS_EXCHANGE, "inventory", old)
        ((props, _),) = drain(channel, topology.dead_letter_queue(queue), 1)
    assert props.headers[topology.REASON_HEADER] == "too_old"
    assert stack.stock("item-1") == 10  # nothing reserved


def test_services_prune_what_ended_before_the_retention_and_keep_the_rest(stack: Stack) -> None:
    # The orchestrator's store: one saga ended three days ago (past the retention of a
    # day and the day of margin), one 36 hours ago (within the margin), one an hour ago,
    # one running
    store = SqliteStore(stack.data_dir / "orchestrator.db")
    old, recent = finished_saga(NOW - timedelta(days=3)), finished_saga(NOW - timedelta(hours=1))
    in_margin = finished_saga(NOW - timedelta(hours=36))
    running = engine.start(order_saga(5.0, 3), order(NOW), None, NOW, None).state
    running = running.model_copy(update={"deadline": NOW + timedelta(days=365)})
    for state in (old, in_margin, recent, running):
        store.commit(state, [])
    store.close()
    # Inventory's dedupe record: one command handled three days ago, one just now
    db = open_db(stack.data_dir / "inventory.db", inventory.SCHEMA)
    for command_id, at in (("old-one", NOW - timedelta(days=3)), ("new-one", NOW)):
        db.execute(
            "INSERT INTO processed_commands VALUES (?, ?, 'ReserveStock', x'7b7d', ?)",
            (command_id, str(uuid.uuid4()), at.isoformat()),
        )
    db.close()

    stack.orchestrator(SAGA_RETENTION_DAYS="1")
    stack.worker("inventory", "--stock", "item-1=10", SAGA_RETENTION_DAYS="1")
    stack.wait_for_log("orchestrator", "pruned 1 saga(s)")
    stack.wait_for_log("inventory", "pruned 1 processed-command record(s)")

    kept = {row[0] for row in stack.query("orchestrator", "SELECT saga_id FROM sagas")}
    assert kept == {str(in_margin.saga_id), str(recent.saga_id), str(running.saga_id)}
    records = stack.query("inventory", "SELECT command_id FROM processed_commands")
    assert [row[0] for row in records] == ["new-one"]

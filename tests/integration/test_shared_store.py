"""Two orchestrators and two inventories on one PostgreSQL: one is killed, none of it is lost.

Real processes, a real broker, a real PostgreSQL (a database of this test's own: the
orchestrators' tables, and a schema per participant). The surviving orchestrator takes the
killed one's unacked deliveries from the queues and, once its lease has run out, the outbox
rows it had committed but not published; the two inventories compete for one queue and one
stock.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from messages.contract import topology
from tests.conftest import POSTGRES_URL
from tests.integration.stack import Stack, amqp_channel

pytestmark = [pytest.mark.broker, pytest.mark.postgres]

ORDERS = 300
STOCK = 250  # so that some sagas are compensated too: both paths cross the kill


@pytest.fixture
def scaled(postgres_database: str, stack: Stack, tmp_path: Path) -> Stack:
    """Two orchestrators, two inventories, a payment and an order service on one PostgreSQL.

    Each process has a data dir of its own (its health file).
    """
    stack.env["SAGA_STORE_URL"] = postgres_database
    stack.env["SAGA_PARTICIPANT_DB_URL"] = postgres_database

    def start(name: str, *argv: str, ready: str = "ready") -> None:
        (tmp_path / name).mkdir()
        stack.start(name, *argv, ready=ready, SAGA_DATA_DIR=str(tmp_path / name))

    for name in ("inventory-a", "inventory-b"):
        start(name, "workers", "run", "inventory", "--stock", f"item-1={STOCK}", ready="commands")
    start("payment", "workers", "run", "payment", ready="commands")
    start("order", "workers", "run", "order", ready="commands")
    for name in ("orchestrator-a", "orchestrator-b"):
        start(name, "orchestrator", "run")
    return stack


def place_orders(stack: Stack) -> subprocess.Popen[str]:
    return stack.place_order_async(
        "--customer", "c-1", "--sku", "item-1", "--qty", "1", "--amount", "5.00",
        "--count", str(ORDERS), "--concurrency", "16", timeout=90,
    )  # fmt: skip


def test_a_killed_orchestrator_loses_nothing_the_other_one_finishes(scaled: Stack) -> None:
    stack = scaled
    # When orders flow and one orchestrator is SIGKILLed while they do
    placing = place_orders(stack)
    time.sleep(1.0)
    stack.kill("orchestrator-a")
    out, err = placing.communicate(timeout=150)

    # Then every saga ended, as the stock allowed: none lost, none decided twice
    summary = json.loads(out)
    assert summary["outcomes"] == {"COMPLETED": STOCK, "COMPENSATED": ORDERS - STOCK}, err
    stats = stack.cli("orchestrator", "stats")
    assert stats["by_state"]["COMPLETED"] == STOCK
    assert stats["by_state"]["COMPENSATED"] == ORDERS - STOCK
    assert stats["by_state"]["RUNNING"] == stats["by_state"]["COMPENSATING"] == 0
    # and stock and money are conserved, with one order per completed saga
    assert stack.cli("workers", "stock") == {"item-1": 0}
    charges = stack.cli("workers", "payments")
    assert sum(1 for c in charges.values() if c["status"] == "charged") == STOCK
    orders = stack.cli("workers", "orders")
    assert len(orders) == STOCK

    # and every process took part: the killed orchestrator had started sagas, the survivor
    # finished the rest, and both inventories reserved stock
    def logged(name: str, text: str) -> int:
        return (stack.data_dir / f"{name}.log").read_text().count(text)

    started = {name: logged(name, "saga: started") for name in ("orchestrator-a", "orchestrator-b")}
    assert 0 < started["orchestrator-a"] < ORDERS, started
    assert started["orchestrator-b"] > 0, started
    assert logged("inventory-a", "Reserved") > 0 and logged("inventory-b", "Reserved") > 0


def test_a_postgresql_outage_mid_run_costs_time_not_sagas(
    scaled: Stack, postgres_database: str
) -> None:
    # Given orders flowing through the scaled-out stack
    placing = place_orders(scaled)
    time.sleep(1.0)

    # When the database refuses every connection for 4 s (a restart, a failover): longer
    # than a message's SAGA_MAX_DELIVERIES retries take, shorter than an orchestrator's lease
    database = urlsplit(postgres_database).path.lstrip("/")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        try:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            ).fetchone()
            assert cut is not None and cut[0] > 0
            time.sleep(4.0)
        finally:
            admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    out, err = placing.communicate(timeout=150)

    # Then every saga still ended as the stock allowed, and no message was dead-lettered:
    # a database that did not answer is not the message's fault
    summary = json.loads(out)
    assert summary["outcomes"] == {"COMPLETED": STOCK, "COMPENSATED": ORDERS - STOCK}, err
    assert len(scaled.cli("workers", "orders")) == STOCK
    assert scaled.cli("workers", "stock") == {"item-1": 0}
    with amqp_channel(scaled.amqp_url) as channel:
        for queue, _, _ in topology.consumed_queues():
            dlq = topology.dead_letter_queue(queue)
            assert channel.queue_declare(dlq, passive=True).method.message_count == 0, dlq
    # and all processes are still up: they reconnected by themselves
    exited = {name: p.tail(20) for name, p in scaled.services.items() if p.poll() is not None}
    assert exited == {}

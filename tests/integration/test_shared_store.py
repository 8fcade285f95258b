"""Two orchestrators on one PostgreSQL store and one vhost: one is killed, none of it is lost.

Real processes, a real broker, a real PostgreSQL (a schema of this test's own). The
survivor takes the killed one's unacked deliveries from the queues, and, once its lease has
run out, the outbox rows it had committed but not published.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.stack import Stack

pytestmark = [pytest.mark.broker, pytest.mark.postgres]

ORDERS = 300
STOCK = 250  # so that some sagas are compensated too: both paths cross the kill


def test_a_killed_orchestrator_loses_nothing_the_other_one_finishes(
    stack: Stack, postgres_url: str, tmp_path: Path
) -> None:
    # Given two orchestrators sharing a PostgreSQL store, each with a data dir of its own
    stack.env["SAGA_STORE_URL"] = postgres_url
    stack.worker("all", "--stock", f"item-1={STOCK}")
    for name in ("orchestrator-a", "orchestrator-b"):
        (tmp_path / name).mkdir()
        stack.start(name, "orchestrator", "run", SAGA_DATA_DIR=str(tmp_path / name))

    # When orders flow and one orchestrator is SIGKILLed while they do
    placing = stack.place_order_async(
        "--customer", "c-1", "--sku", "item-1", "--qty", "1", "--amount", "5.00",
        "--count", str(ORDERS), "--concurrency", "16", timeout=90,
    )  # fmt: skip
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
    # and both took part: the killed one had started sagas, the survivor finished the rest
    started = {
        name: (stack.data_dir / f"{name}.log").read_text().count("saga: started")
        for name in ("orchestrator-a", "orchestrator-b")
    }
    assert 0 < started["orchestrator-a"] < ORDERS, started
    assert started["orchestrator-b"] > 0, started

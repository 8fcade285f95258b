"""The broker itself goes away: restarted again and again under load, or down for a while.

These run on a private RabbitMQ node (scripts/harness/rabbit_node.py), never the shared one,
so the node can be stopped for real. Every service must come back consuming every queue it
owns, by itself, and no saga may be compensated for a time-out that was the broker's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messages.contract import topology
from scripts.harness.rabbit_node import PrivateNode
from tests.integration.stack import ROOT, Stack
from tests.integration.test_saga_flows import ORDER

pytestmark = pytest.mark.broker

QUEUES = [q for q, _, _ in topology.consumed_queues()]
# Quick to notice a lost broker and quick to retry; deadlines as short as a test can afford.
SETTINGS = {
    "SAGA_CONNECT_RETRY_S": "0.2",
    "SAGA_STEP_TIMEOUT_S": "1",
    "SAGA_STEP_MAX_ATTEMPTS": "3",
    "SAGA_TICK_S": "0.05",
}


@pytest.fixture
def node() -> Iterator[PrivateNode]:
    with PrivateNode.create() as node:
        yield node


@pytest.fixture
def broker_stack(node: PrivateNode, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(node.amqp_url, tmp_path, env=dict(SETTINGS))
    try:
        yield stack
    finally:
        stack.stop_all()


def run(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def everything_consuming(node: PrivateNode, stack: Stack, timeout: float = 30.0) -> None:
    """Wait until the broker and the services' own health checks agree all is consumed."""
    deadline = time.monotonic() + timeout
    workers = [name for name in stack.services if name != "orchestrator"]
    while True:
        consumers = node.consumers()
        healthy = [run(stack, "orchestrator", "health").returncode == 0] + [
            run(stack, "workers", "health", name).returncode == 0 for name in workers
        ]
        if all(consumers.get(q) == 1 for q in QUEUES) and all(healthy):
            return
        if time.monotonic() > deadline:
            logs = {name: s.output()[-3000:] for name, s in stack.services.items()}
            raise AssertionError(f"not every queue consumed: {consumers} {healthy}\n{logs}")
        time.sleep(0.5)


def sagas(stack: Stack) -> list[dict[str, Any]]:
    out = run(stack, "orchestrator", "list", "--json", "--limit", "100000")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def wait_all_finished(stack: Stack, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        listed = sagas(stack)
        if listed and all(s["status"] in ("COMPLETED", "COMPENSATED", "FAILED") for s in listed):
            return listed
        assert time.monotonic() < deadline, [s for s in listed if s["status"] == "RUNNING"]
        time.sleep(0.5)


def test_ten_broker_restarts_under_load_leave_every_service_consuming(
    node: PrivateNode, broker_stack: Stack
) -> None:
    stack = broker_stack
    stack.worker("all", "--stock", "item-1=100000")
    stack.orchestrator()
    everything_consuming(node, stack)

    for restart in range(10):
        # Given orders on their way
        load = stack.place_order_async(
            *ORDER, "--amount", "25.00", "--count", "200", "--concurrency", "4", timeout=60
        )
        time.sleep(0.3 + 0.1 * restart)  # restarts land at different points of the sagas
        # When the broker restarts under them
        node.restart(down_s=1 + (restart % 3) * 0.5)
        # Then every service consumes every queue again, by itself
        everything_consuming(node, stack)
        # The client loses its connection too: a clear line, never a traceback (or it was done)
        _, err = load.communicate(timeout=90)
        assert load.returncode in (0, 2) and "Traceback" not in err, err

    # And every saga the broker took completed: none compensated, none failed
    finished = wait_all_finished(stack)
    assert {s["status"] for s in finished} == {"COMPLETED"}, [
        (s["status"], s["reason"]) for s in finished if s["status"] != "COMPLETED"
    ]
    assert len(stack.query("order", "SELECT saga_id FROM orders")) == len(finished)
    assert stack.stock("item-1") == 100000 - len(finished)
    for name in ("orchestrator", "all"):
        assert "reconnected to RabbitMQ" in stack.services[name].output()


def test_a_broker_outage_longer_than_every_deadline_compensates_nothing(
    node: PrivateNode, broker_stack: Stack
) -> None:
    # Given sagas waiting for a payment service that is not there yet, with deadlines of
    # 1 + 2 + 4 s before a step is compensated
    stack = broker_stack
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("order")
    stack.orchestrator()
    orders = [stack.place_order_async(*ORDER, "--amount", "25.00", timeout=5) for _ in range(4)]
    deadline = time.monotonic() + 20
    while sum(s["step"] == "charge_payment" for s in sagas(stack)) < 4:
        assert time.monotonic() < deadline, sagas(stack)
        time.sleep(0.2)
    for order in orders:
        order.kill()

    # When the broker is down for three times as long as all those deadlines together
    node.halt()
    time.sleep(21)
    node.start()
    stack.worker("payment")

    # Then no saga is compensated for it: the time the broker was away did not count
    finished = wait_all_finished(stack)
    assert [s["status"] for s in finished] == ["COMPLETED"] * 4, finished
    everything_consuming(node, stack)

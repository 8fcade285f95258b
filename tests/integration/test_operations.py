"""Seeing and steering sagas: the saga CLI, metrics and structured logs, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from scripts.harness.processes import free_port
from tests.integration.stack import ROOT, Stack
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker


# The `saga` command, through this interpreter: a venv need not be activated (on PATH).
SAGA = (sys.executable, "-m", "orchestrator")


def saga_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The `saga` command, as an operator runs it."""
    return subprocess.run(
        [*SAGA, *args],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (samples only)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_list_show_and_stats_describe_what_happened(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10")
    stack.orchestrator()
    _, completed = stack.place_order(*ORDER, "--amount", "25.00")
    _, declined = stack.place_order(*ORDER, "--amount", "5000.00")

    listing = json.loads(saga_cli(stack, "list", "--json").stdout)
    assert [s["saga_id"] for s in listing] == [declined["saga_id"], completed["saga_id"]]
    assert [s["status"] for s in listing] == ["COMPENSATED", "COMPLETED"]
    assert listing[0]["reason"] == "payment_declined"

    only = json.loads(saga_cli(stack, "list", "--state", "completed", "--json").stdout)
    assert [s["saga_id"] for s in only] == [completed["saga_id"]]
    assert (
        json.loads(saga_cli(stack, "list", "--since", "10m", "--limit", "1", "--json").stdout)[0][
            "saga_id"
        ]
        == declined["saga_id"]
    )

    table = saga_cli(stack, "list").stdout
    assert "STATE" in table and "payment_declined" in table

    shown = saga_cli(stack, "show", declined["saga_id"]).stdout
    assert "order: 1 x item-1 for c-1, 5000.00 EUR" in shown
    assert re.search(r"charge_payment\s+failed\s+payment_declined", shown)
    assert re.search(r"reserve_stock\s+sent\s+ReleaseStock attempt 1", shown)

    stats = json.loads(saga_cli(stack, "stats", "--json").stdout)
    assert stats["by_state"]["COMPLETED"] == 1
    assert stats["by_state"]["COMPENSATED"] == 1
    assert stats["by_outcome"] == {"COMPLETED": 1, "COMPENSATED payment_declined": 1}
    assert stats["finished"] == 2
    assert stats["duration_p99_ms"] >= stats["duration_mean_ms"] > 0
    assert stats["oldest_running"] is None

    missing = saga_cli(stack, "show", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2
    assert "has not started it" in missing.stderr


def test_abort_compensates_a_running_saga_and_records_why(stack: Stack) -> None:
    # Given a saga stuck waiting on payment, which is not running
    stack.worker("inventory", "--stock", "item-1=10")
    stack.orchestrator(SAGA_STEP_TIMEOUT_S="60")
    client = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60)
    stack.wait_for_log("orchestrator", "ChargePayment attempt 1")
    saga_id = json.loads(saga_cli(stack, "list", "--json").stdout)[0]["saga_id"]

    # When an operator aborts it, and payment comes back (the refund needs an answer)
    aborting = subprocess.Popen(
        [*SAGA, "abort", saga_id, "--reason", "customer called", "--json"],
        cwd=ROOT,
        env=stack.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stack.wait_for_log("orchestrator", "abort_requested")
    stack.worker("payment")
    out, err = aborting.communicate(timeout=60)

    # Then it is compensated, the in-flight charge included, and the history says who and why
    assert aborting.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "COMPENSATED"
    assert result["reason"] == "aborted: customer called"
    assert sent(result)[-2:] == ["RefundPayment", "ReleaseStock"]
    requested = [e for e in result["history"] if e["event"] == "abort_requested"]
    assert requested and requested[0]["detail"].endswith(": customer called")
    assert stack.stock("item-1") == 10
    out, _ = client.communicate(timeout=30)
    assert json.loads(out)["status"] == "COMPENSATED"  # the requester hears it too
    deadline = time.monotonic() + 10
    while stack.query("payment", "SELECT status FROM charges") != [("refunded",)]:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # And a finished saga cannot be aborted
    again = saga_cli(stack, "abort", saga_id, "--reason", "twice")
    assert again.returncode == 2
    assert "saga is already COMPENSATED" in again.stderr


def test_metrics_count_what_happened(stack: Stack) -> None:
    orchestrator_port, workers_port = free_port(), free_port()
    stack.worker("all", "--stock", "item-1=10", SAGA_METRICS_PORT=str(workers_port))
    stack.orchestrator(SAGA_METRICS_PORT=str(orchestrator_port))
    stack.place_order(*ORDER, "--amount", "25.00")
    stack.place_order(*ORDER, "--amount", "25.00")
    stack.place_order(*ORDER, "--amount", "5000.00")

    # Published rows leave the outbox once confirmed, with the next commit or after a quiet
    # moment: a little after the result has reached its client.
    for _ in range(50):
        samples = scrape(orchestrator_port)
        if samples["saga_outbox_depth"] == 0:
            break
        time.sleep(0.1)
    assert samples["saga_started_total"] == 3
    assert samples['saga_finished_total{outcome="COMPLETED"}'] == 2
    assert samples['saga_finished_total{outcome="COMPENSATED"}'] == 1
    assert samples['saga_sagas{state="COMPLETED"}'] == 2
    assert samples["saga_in_flight"] == 0
    assert samples["saga_outbox_depth"] == 0
    assert samples['saga_compensations_total{step="reserve_stock"}'] == 1
    assert (
        samples['saga_step_duration_seconds_count{outcome="succeeded",step="reserve_stock"}'] == 3
    )
    assert samples['saga_step_duration_seconds_count{outcome="failed",step="charge_payment"}'] == 1

    # A participant counts a command once its reply is confirmed, which may come a moment
    # after the orchestrator has the reply and the saga has ended.
    key = 'saga_commands_total{command="%s",outcome="%s",participant="%s"}'
    last_reply = key % ("CompleteOrder", "CommandSucceeded", "order")
    for _ in range(50):
        workers = scrape(workers_port)
        if workers.get(last_reply) == 2:
            break
        time.sleep(0.1)
    assert workers[key % ("ReserveStock", "CommandSucceeded", "inventory")] == 3
    assert workers[key % ("ChargePayment", "CommandFailed", "payment")] == 1
    assert workers[key % ("CompleteOrder", "CommandSucceeded", "order")] == 2


def test_json_logs_carry_the_saga_id(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10", SAGA_LOG_FORMAT="json")
    stack.orchestrator(SAGA_LOG_FORMAT="json")
    _, result = stack.place_order(*ORDER, "--amount", "25.00")

    lines = [json.loads(line) for line in stack.services["all"].output().splitlines()]
    reserved = [entry for entry in lines if entry["message"].startswith("Reserved 1 unit")]
    assert len(reserved) == 1
    entry: dict[str, Any] = reserved[0]
    assert entry["saga_id"] == result["saga_id"]
    assert entry["step"] == "ReserveStock"
    assert entry["level"] == "INFO" and "message_id" in entry
    orchestrator_lines = [
        json.loads(line) for line in stack.services["orchestrator"].output().splitlines()
    ]
    assert any(
        e.get("saga_id") == result["saga_id"] and e.get("step") == "complete_order"
        for e in orchestrator_lines
    )

    # One W3C trace id, started by place_order, follows the saga through every service
    about_saga = [e for e in lines + orchestrator_lines if e.get("saga_id") == result["saga_id"]]
    trace_ids = {e.get("trace_id") for e in about_saga}
    assert len(about_saga) > 5
    assert len(trace_ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", trace_ids.pop() or "")


def test_place_order_count_places_many_and_summarises(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=4")
    stack.orchestrator()

    done = subprocess.run(
        [
            sys.executable,
            "scripts/place_order.py",
            *ORDER,
            "--amount",
            "10.00",
            "--count",
            "6",
            "--concurrency",
            "3",
            "--json",
        ],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 1, done.stderr  # some were compensated
    summary = json.loads(done.stdout)
    assert summary["outcomes"] == {"COMPLETED": 4, "COMPENSATED": 2}  # 4 in stock
    assert summary["finished"] == 6
    assert summary["sagas_per_s"] > 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert stack.stock("item-1") == 0

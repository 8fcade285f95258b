"""scripts/bench.py runs end to end on a tiny count and prints sane fields (no timing limits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("reserve_stock", "charge_payment", "complete_order")


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.broker
def test_bench_starts_a_stack_and_reports_sane_numbers(amqp_url: str, tmp_path: Path) -> None:
    done = run_bench(
        *("--url", amqp_url, "--start-stack", "--count", "20", "--concurrency", "4"),
        *("--raw", "--json", "--data-dir", str(tmp_path)),  # a failed run keeps its logs there
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)

    assert result["sagas"] == 20
    assert result["finished"] == 20
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 20
    assert outcomes["COMPLETED"] > 0
    assert outcomes["COMPENSATED"] > 0  # 10% of the orders are over the credit limit
    assert outcomes["TIMED_OUT"] == 0

    assert result["completed_per_s"] > 0
    assert result["finished_per_s"] >= result["completed_per_s"]
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    for step in STEPS:
        timing = result["steps_ms"][step]
        assert timing["n"] > 0
        assert 0 <= timing["p50"] <= timing["p99"]
    assert result["messages_per_saga"] >= 8  # request, 3 commands, 3 replies, result

    assert result["raw"]["messages_per_s"] > 0
    assert result["ratio"] > 0
    rss = result["orchestrator_rss_kib"]
    assert rss["start"] > 0 and rss["end"] > 0
    assert result["machine"]["nproc"] >= 1
    assert result["machine"]["rabbitmq_version"]
    assert (result["params"]["count"], result["params"]["concurrency"]) == (20, 4)


@pytest.mark.broker
def test_bench_says_so_when_no_orchestrator_runs(amqp_url: str) -> None:
    done = run_bench("--url", amqp_url, "--count", "1", "--timeout", "2", timeout=60)
    assert done.returncode == 2
    assert "orchestrator" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_says_so_when_no_broker_answers() -> None:
    done = run_bench("--url", "amqp://guest:guest@127.0.0.1:1/", "--count", "1", timeout=60)
    assert done.returncode == 2
    assert "cannot reach RabbitMQ" in done.stderr
    assert "Traceback" not in done.stderr


def test_markdown_table_from_results(tmp_path: Path) -> None:
    result = {
        "label": "tiny",
        "params": {"mode": "closed", "concurrency": 4, "count": 20},
        "machine": {"nproc": 2, "python": "3.11", "rabbitmq_version": "3.10.8"},
        "sagas": 20,
        "outcomes": {"COMPLETED": 18, "COMPENSATED": 2, "FAILED": 0, "TIMED_OUT": 0},
        "completed_per_s": 30.0,
        "finished_per_s": 33.3,
        "latency_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0, "max": 40.0},
        "steps_ms": {s: {"p50": 1.0, "p99": 2.0, "n": 20} for s in STEPS},
        "messages_per_saga": 8.0,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(result))
    done = run_bench("--markdown", str(path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| tiny | - | closed c=4 | 20 | 30.0 | 33.3 | 10.0 |" in done.stdout

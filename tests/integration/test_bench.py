"""scripts/bench.py runs end to end on a tiny count and prints sane fields (no timing limits)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from messages.plumbing.management import vhost_of
from tests.conftest import POSTGRES_URL
from tests.integration.broker import Broker
from tests.integration.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("reserve_stock", "charge_payment", "complete_order")
HOPS = (
    "request",
    *(f"{step}.{hop}" for step in STEPS for hop in ("orchestrator", "participant", "reply")),
    "result",
)


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
@pytest.mark.postgres
def test_bench_scales_out_on_postgresql_and_counts_each_process(
    amqp_url: str, tmp_path: Path
) -> None:
    # Given the bench's own database on the test PostgreSQL, two orchestrators, two of each
    done = run_bench(
        *("--url", amqp_url, "--start-stack", "--count", "40", "--concurrency", "8"),
        *("--postgres-url", POSTGRES_URL, "--orchestrators", "2", "--replicas", "2"),
        *("--queue-type", "quorum", "--json", "--data-dir", str(tmp_path)),
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)

    # Then every saga finished, and CPU is reported per process and summed per role
    assert result["finished"] == 40 and result["outcomes"]["TIMED_OUT"] == 0
    assert (result["params"]["orchestrators"], result["params"]["replicas"]) == (2, 2)
    assert (result["params"]["store"], result["params"]["queue_type"]) == ("postgresql", "quorum")
    by_process = result["cpu_ms_per_saga_by_process"]
    assert {"orchestrator-1", "orchestrator-2", "inventory-1", "inventory-2"} <= set(by_process)
    per_role = result["cpu_ms_per_saga"]
    assert per_role["orchestrator"] == pytest.approx(
        by_process["orchestrator-1"] + by_process["orchestrator-2"], abs=0.02
    )
    assert per_role["postgresql"] > 0
    # and the bench's database is gone
    with psycopg.connect(POSTGRES_URL) as db:
        left = db.execute("SELECT datname FROM pg_database WHERE datname LIKE 'saga_bench_%'")
        assert left.fetchall() == []


def test_bench_refuses_several_orchestrators_without_postgresql() -> None:
    done = run_bench("--start-stack", "--orchestrators", "2")

    assert done.returncode == 2
    assert "give --postgres-url" in done.stderr


def script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), imported by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.broker
def test_bench_limit_against_a_running_stack(stack: Stack, broker: Broker) -> None:
    """--limit without --start-stack: its own pass-through processes, gone afterwards."""
    stack.orchestrator()
    stack.worker("inventory", "--stock", "bench-item=1000")
    stack.worker("payment")
    stack.worker("order")
    done = run_bench(
        *("--url", stack.amqp_url, "--count", "20", "--concurrency", "4", "--warmup", "2"),
        *("--limit", "--json"),
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)

    limit = result["limit"]
    assert (limit["count"], limit["concurrency"]) == (20, 4)
    assert limit["finished"] == 20 and limit["timed_out"] == 0
    assert limit["finished_per_s"] > 0
    assert 0 < limit["latency_ms"]["p50"] <= limit["latency_ms"]["max"]
    assert {"orchestrator", "inventory", "payment", "order", "bench"} <= set(
        limit["cpu_ms_per_saga"]
    )
    assert result["limit_ratio"] > 0
    assert result["limit_ratio"] == pytest.approx(
        result["finished_per_s"] / limit["finished_per_s"], abs=0.001
    )

    vhost = quote(vhost_of(stack.amqp_url), safe="")
    queues = [q["name"] for q in broker.api("GET", f"queues/{vhost}")]
    assert not [q for q in queues if q.startswith("limit.")]
    deadline = time.monotonic() + 10
    while True:  # the pass-through processes' connections close as they exit
        names = [
            str((c.get("client_properties") or {}).get("connection_name"))
            for c in broker.api("GET", f"vhosts/{vhost}/connections")
        ]
        if not [n for n in names if n.startswith("bench-limit")] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not [n for n in names if n.startswith("bench-limit")]


@pytest.mark.broker
def test_bench_breakdown_accounts_for_the_latency(amqp_url: str, tmp_path: Path) -> None:
    done = run_bench(
        *("--url", amqp_url, "--start-stack", "--count", "10", "--concurrency", "1"),
        *("--warmup", "2", "--breakdown", "--breakdown-count", "30", "--json"),
        *("--data-dir", str(tmp_path)),
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    breakdown = json.loads(done.stdout)["breakdown"]

    assert breakdown["sagas"] == 30 and breakdown["timed_out"] == 0
    assert breakdown["with_timeline"] >= 25  # a saga with a resend is left out
    assert tuple(breakdown["hops_ms"]) == HOPS
    for name, hop in breakdown["hops_ms"].items():
        assert hop["n"] == breakdown["with_timeline"]
        # A reply hop is the orchestrator's decode and decision, a fraction of a millisecond
        # that the tap's own delivery can outweigh; every other hop has real work in it.
        assert hop["p50"] > (-1 if name.endswith(".reply") else 0), (name, hop)
        assert hop["p90"] >= hop["p50"]
    end_to_end = breakdown["end_to_end_ms"]["p50"]
    assert end_to_end > 0
    assert 0.5 * end_to_end <= breakdown["sum_of_p50_ms"] <= 2 * end_to_end


def test_breakdown_hops_of_one_timeline() -> None:
    breakdown = script("bench_breakdown")
    t0 = 1_000_000.0

    def at(ms: float) -> float:
        return t0 + ms / 1000

    # A declined saga: reserve, charge fails, reserve undone.
    history = [
        (at(1), "saga", "started"),
        (at(1), "reserve_stock", "sent"),
        (at(6), "reserve_stock", "succeeded"),
        (at(6), "charge_payment", "sent"),
        (at(11), "charge_payment", "failed"),
        (at(11), "saga", "compensating"),
        (at(11), "reserve_stock", "sent"),
        (at(16), "reserve_stock", "compensated"),
        (at(16), "saga", "compensated"),
    ]
    taps = [(at(m), breakdown.COMMAND) for m in (3, 8, 13)]
    taps += [(at(m), breakdown.REPLY) for m in (5.5, 10.5, 15.5)]
    timeline = breakdown.Timeline(t0, at(18), history, taps)

    hops = breakdown.saga_hops(timeline)
    assert hops is not None
    assert list(hops) == [
        "request",
        *(f"{s}.{h}" for s in STEPS[:2] for h in ("orchestrator", "participant", "reply")),
        *(f"reserve_stock/undo.{h}" for h in ("orchestrator", "participant", "reply")),
        "result",
    ]
    ms = {name: round(seconds * 1000, 3) for name, seconds in hops.items()}
    assert ms["request"] == 1
    assert ms["reserve_stock.orchestrator"] == 2
    assert ms["reserve_stock.participant"] == 2.5
    assert ms["reserve_stock.reply"] == 0.5
    assert ms["result"] == 2
    assert sum(hops.values()) == pytest.approx(0.018)  # the hops add up to end to end

    # A resend (two commands on the tap, one reply) cannot be cut into hops: left out.
    resent = breakdown.Timeline(t0, at(18), history, [*taps, (at(4), breakdown.COMMAND)])
    assert breakdown.saga_hops(resent) is None

    def p50(seconds: list[float]) -> dict[str, Any]:
        return {"n": len(seconds), "p50": round(sorted(seconds)[0] * 1000, 3)}

    report = breakdown.report([timeline, resent], p50, 1)
    assert (report["sagas"], report["with_timeline"]) == (2, 1)
    assert report["sum_of_p50_ms"] == pytest.approx(18)
    assert report["end_to_end_ms"]["p50"] == 18
    lines = breakdown.breakdown_lines(report)
    assert "sum of the p50s" in lines[-1] and "18.00" in lines[-1]


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
        "limit": {"finished_per_s": 250.0},
        "limit_ratio": 0.133,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(result))
    done = run_bench("--markdown", str(path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| tiny | - | closed c=4 | 20 | 30.0 | 33.3 | 10.0 |" in done.stdout
    assert "| 250.0 (0.13) |" in done.stdout

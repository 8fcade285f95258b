"""The bench's results: summarised samples, the human report and the markdown table."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts import bench_breakdown, bench_limit
from scripts.harness.bench_client import (
    Sample,
)
from scripts.harness.bench_common import (
    MESSAGE_COUNTING,
    OUTCOMES,
    STEPS,
    TIMED_OUT,
    BenchError,
    summary_ms,
)


def summarise(samples: Sequence[Sample], elapsed: float) -> dict[str, Any]:
    outcomes = Counter({name: 0 for name in OUTCOMES})
    outcomes.update(s.outcome for s in samples)
    finished = [s for s in samples if s.outcome != TIMED_OUT]
    steps: defaultdict[str, list[float]] = defaultdict(list)
    for sample in finished:
        for step, seconds in sample.steps.items():
            steps[step].append(seconds)
    messages_by_outcome: dict[str, float] = {}
    for outcome in outcomes:
        counts = [s.messages for s in finished if s.outcome == outcome]
        if counts:
            messages_by_outcome[outcome] = round(sum(counts) / len(counts), 2)
    reasons = Counter(s.reason.split(":")[0] for s in finished if s.reason)
    return {
        "sagas": len(samples),
        "finished": len(finished),
        "outcomes": dict(outcomes),
        "reasons": dict(reasons),
        "elapsed_s": round(elapsed, 3),
        "completed_per_s": round(outcomes["COMPLETED"] / elapsed, 1),
        "finished_per_s": round(len(finished) / elapsed, 1),
        "latency_ms": summary_ms([s.latency_s for s in finished if s.latency_s is not None]),
        "steps_ms": {
            name: summary_ms(values, (50, 99))
            for name, values in sorted(steps.items(), key=lambda kv: _step_order(kv[0]))
        },
        "messages_per_saga": (
            round(sum(s.messages for s in finished) / len(finished), 2) if finished else None
        ),
        "messages_by_outcome": messages_by_outcome,
        "messages_counted": MESSAGE_COUNTING,
    }


def _step_order(name: str) -> tuple[int, str]:
    base = name.split("/")[0]
    return (STEPS.index(base) if base in STEPS else len(STEPS), name)


# --- output ------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float | int) else str(value)


def describe_load(result: dict[str, Any]) -> str:
    params = result["params"]
    if params["mode"] == "open":
        return f"open {params['rate']:g}/s x {params['duration_s']:g}s"
    return f"closed c={params['concurrency']}"


def human(result: dict[str, Any]) -> str:
    machine = result["machine"]
    latency = result["latency_ms"]
    outcomes = ", ".join(f"{k} {v}" for k, v in result["outcomes"].items() if v)
    lines = [
        f"load        {describe_load(result)}, {result['sagas']} sagas measured "
        f"(+{result['params']['warmup']} warm-up), "
        f"{result['params']['decline_ratio']:.0%} over the credit limit",
        f"machine     {machine.get('nproc')} CPUs, {machine.get('memory_gib')} GiB, Python "
        f"{machine.get('python')}, RabbitMQ {machine.get('rabbitmq_version')}",
        f"outcomes    {result['finished']} finished of {result['sagas']}: {outcomes}",
        f"elapsed     {result['elapsed_s']:.2f} s",
        f"throughput  {result['completed_per_s']:.1f} completed sagas/s, "
        f"{result['finished_per_s']:.1f} finished sagas/s",
        f"latency     p50 {_f(latency['p50'])} ms  p95 {_f(latency['p95'])} ms  "
        f"p99 {_f(latency['p99'])} ms  max {_f(latency['max'])} ms  (request publish to result)",
    ]
    for index, (name, step) in enumerate(result["steps_ms"].items()):
        head = "steps" if index == 0 else ""
        lines.append(
            f"{head:<12}{name:<22} p50 {_f(step['p50']):>6} ms  p99 {_f(step['p99']):>6} ms"
            f"  (n={step['n']})"
        )
    lines.append(
        f"messages    {_f(result['messages_per_saga'], 2)} per saga "
        f"({', '.join(f'{k} {v:g}' for k, v in result['messages_by_outcome'].items())})"
    )
    if "open_loop" in result:
        open_loop = result["open_loop"]
        lines.append(
            f"open loop   start lag max {open_loop['max_start_lag_ms']} ms, "
            f"at most {open_loop['max_in_flight']} sagas in flight"
        )
    if "orchestrator_rss_kib" in result:
        rss = result["orchestrator_rss_kib"]
        lines.append(
            "orch. RSS   "
            + ", ".join(f"{k} {_f((v or 0) / 1024)} MiB" for k, v in rss.items() if v)
        )
    if result["cpu_cores"]:
        per_saga = result.get("cpu_ms_per_saga", {})
        lines.append(
            "CPU         "
            + ", ".join(
                f"{k} {v:.2f} cores ({_f(per_saga.get(k), 2)} ms/saga)"
                for k, v in result["cpu_cores"].items()
            )
        )
    load = result.get("machine_load", {})
    if "busy_cores" in load:
        lines.append(
            f"machine     {load['busy_cores']:.2f} of {machine.get('nproc')} cores busy: bench and "
            f"stack {load['bench_and_stack_cores']:.2f}, rabbitmq {load['rabbitmq_cores']:.2f}, "
            f"other processes {load['other_cores']:.2f} (steal {load['steal_cores']:.2f})"
        )
    if "raw" in result:
        raw = result["raw"]
        lines.append(
            f"raw broker  {raw['messages_per_s']:.0f} msg/s ({raw['messages']} x "
            f"{raw['body_bytes']} B persistent, confirmed (window {raw['window']}), acked)"
            + "".join(
                f", {k} {v:g} us CPU/msg" for k, v in raw.get("cpu_us_per_message", {}).items()
            )
        )
        lines.append(
            f"ratio       {result['finished_per_s']:.1f} sagas/s x "
            f"{_f(result['messages_per_saga'], 2)} msg / {raw['messages_per_s']:.0f} msg/s "
            f"= {result['ratio']:.3f}"
        )
    lines += bench_limit.limit_lines(result)
    if "breakdown" in result:
        lines += bench_breakdown.breakdown_lines(result["breakdown"])
    if result["late_results"]:
        lines.append(f"late        {result['late_results']} result(s) arrived after --timeout")
    return "\n".join(lines)


def markdown(paths: Sequence[Path]) -> str:
    results = []
    for path in paths:
        try:
            results.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read {path}: {exc}") from exc
    head = (
        "| run | code | load | sagas | completed/s | finished/s | p50 ms | p95 ms | p99 ms "
        "| max ms | outcomes (C/X/F/T) | msg/saga | raw msg/s | ratio "
        "| orch. RSS MiB start→end | limit sagas/s (ratio) |"
    )
    rows = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for path, r in results:
        lat = r["latency_ms"]
        out = r["outcomes"]
        raw = r.get("raw")
        rss = r.get("orchestrator_rss_kib") or {}
        rss_text = (
            f"{rss['start'] / 1024:.1f} → {rss['end'] / 1024:.1f}"
            if rss.get("start") and rss.get("end")
            else "-"
        )
        limit = r.get("limit")
        limit_text = (
            f"{_f(limit['finished_per_s'])} ({_f(r.get('limit_ratio'), 2)})" if limit else "-"
        )
        outcomes = "/".join(
            str(out.get(k, 0)) for k in ("COMPLETED", "COMPENSATED", "FAILED", TIMED_OUT)
        )
        source = r.get("source") or {}
        code = (source.get("git_commit") or "-") + (
            " (modified)" if source.get("git_dirty") else ""
        )
        rows.append(
            f"| {r.get('label') or path.stem} | {code} | {describe_load(r)} | {r['sagas']} "
            f"| {_f(r['completed_per_s'])} | {_f(r['finished_per_s'])} | {_f(lat['p50'])} "
            f"| {_f(lat['p95'])} | {_f(lat['p99'])} | {_f(lat['max'])} | {outcomes} "
            f"| {_f(r['messages_per_saga'], 2)} | {_f(raw['messages_per_s'], 0) if raw else '-'} "
            f"| {_f(r.get('ratio'), 2)} | {rss_text} | {limit_text} |"
        )
    step_head = (
        "| run | "
        + " | ".join(f"{s} p50 / p99 ms" for s in STEPS)
        + " | CPU ms per saga (cores) | machine busy / other processes (cores) |"
    )
    step_rows = [step_head, "|" + " --- |" * (len(STEPS) + 3)]
    for path, r in results:
        cells = []
        for name in STEPS:
            step = r["steps_ms"].get(name)
            cells.append(f"{_f(step['p50'])} / {_f(step['p99'])}" if step else "-")
        per_saga = r.get("cpu_ms_per_saga", {})
        cpu = ", ".join(
            f"{k} {_f(per_saga.get(k), 1)} ({v:.2f})" for k, v in r.get("cpu_cores", {}).items()
        )
        load = r.get("machine_load", {})
        busy = (
            f"{load['busy_cores']:.2f} / {load['other_cores']:.2f}" if "busy_cores" in load else "-"
        )
        step_rows.append(
            f"| {r.get('label') or path.stem} | {' | '.join(cells)} | {cpu} | {busy} |"
        )
    machine = results[0][1]["machine"] if results else {}
    note = (
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model', '?')}), "
        f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}, "
        f"{machine.get('rabbitmq_product')} {machine.get('rabbitmq_version')} "
        f"({machine.get('erlang')}); services' SQLite on {machine.get('data_dir_fs') or '?'}."
    )
    return "\n".join([*rows, "", *step_rows, "", note])

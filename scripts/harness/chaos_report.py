"""The soak's report: one row per figure, one per check, and `violations: N` last."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scripts.harness.audit import Check, Snapshot
from scripts.harness.chaos_options import (
    CONNECTIONS,
    FAULT_FLAGS,
    FAULT_LINE,
    KIND_HELP,
    KINDS,
    MAX_LISTED,
    NODE,
    SERVICE_SETTINGS,
    SERVICES,
    TERMINAL,
    Options,
    Order,
)
from scripts.harness.chaos_plan import Chaos
from scripts.harness.drain import Drain
from scripts.harness.load import LoadStats
from scripts.harness.scale import Infrastructure
from scripts.harness.supervisor import Supervisor
from workers.faults import CRASH_EXIT_CODE

# The orchestrator logs each history entry it commits as "STEP: EVENT DETAIL".
TIMEOUT_LINE = re.compile(rb"\w+: timed_out ")


def count_timeouts(log: Path) -> int:
    """Deadlines missed, as the orchestrator logged them."""
    if not log.exists():
        return 0
    with log.open("rb") as lines:
        return sum(1 for line in lines if TIMEOUT_LINE.search(line))


def count_log_lines(logs: Iterable[Path]) -> tuple[Counter[str], int, int]:
    """Faults injected by kind, ERROR lines and tracebacks, over the given logs."""
    faults: Counter[str] = Counter()
    errors = tracebacks = 0
    for path in logs:
        if not path.exists():
            continue
        with path.open("rb") as log:
            for line in log:
                if match := FAULT_LINE.search(line):
                    faults[match[1].decode()] += 1
                errors += b" ERROR " in line
                tracebacks += line.startswith(b"Traceback")
    return faults, errors, tracebacks


def outcome_text(snap: Snapshot, placed: set[str]) -> str:
    """Sagas by final state; the compensated ones by the first word of their reason."""
    by_status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in placed:
        saga = snap.sagas.get(s)
        status = saga.status if saga else "MISSING"
        by_status[status] += 1
        if saga and status == "COMPENSATED":
            reasons[(saga.outcome or "?").split(":")[0]] += 1
    parts = []
    for status in ("COMPLETED", "COMPENSATED", "FAILED", "RUNNING", "COMPENSATING", "MISSING"):
        if by_status[status] or status in TERMINAL:
            detail = ""
            if status == "COMPENSATED" and reasons:
                detail = " (" + ", ".join(f"{r} {n}" for r, n in reasons.most_common()) + ")"
            parts.append(f"{status} {by_status[status]}{detail}")
    return ", ".join(parts)


def build_report(
    opts: Options,
    infra: Infrastructure,
    vhost: str,
    data_dir: Path,
    orders: list[Order],
    snap: Snapshot,
    load: LoadStats,
    drained: Drain,
    chaos: Chaos,
    supervisor: Supervisor,
    checks: list[Check],
) -> dict[str, Any]:
    """The report as JSON (--json writes it as is)."""
    placed = {str(o.request.saga_id) for o in orders[: load.placed]}
    services = supervisor.services.values()
    faults, errors, tracebacks = count_log_lines(s.log for s in services)
    kinds = Counter(o.kind for o in orders[: load.placed])
    load_s = max((load.all_finished or load.last_placed) - load.first_placed, 0.001)
    finished = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status in TERMINAL)
    drain_s = None if drained.drained_at is None else drained.drained_at - load.last_placed
    broker = chaos.broker
    outages = chaos.outages.done if chaos.outages else []
    return {
        "params": {
            "sagas": opts.sagas,
            "concurrency": opts.concurrency,
            "seed": opts.seed,
            "faults": opts.faults,
            "fault_delay_s": opts.fault_delay_s,
            "vhost": vhost,
            "data_dir": str(data_dir),
            "service_settings": SERVICE_SETTINGS,
            "scale": asdict(opts.scale) | {"database": infra.database},
            "stack": opts.scale.describe(),
        },
        "orders": {k: kinds[k] for k in KINDS},
        "placed": load.placed,
        "finished": finished,
        "outcomes": outcome_text(snap, placed),
        "kills": {
            name: {"done": chaos.count(name), "planned": chaos.planned(name)} for name in SERVICES
        },
        "connection_drops": {
            "done": chaos.count(CONNECTIONS),
            "planned": chaos.planned(CONNECTIONS),
        },
        "kill_log": chaos.done,
        "broker_restart": asdict(broker) | {"skipped": broker.command is None},
        "node_stops": {
            "done": [asdict(stop) for stop in outages],
            "planned": chaos.planned(NODE),
            "nodes": len(infra.cluster.nodes) if infra.cluster else 0,
        },
        "restarts": {s.name: s.starts - 1 for s in services},
        "crashes": {s.name: s.crashes for s in services if s.role != "orchestrator"},
        "unexpected_exits": {s.name: s.unexpected for s in services if s.unexpected},
        "faults_injected": dict(faults),
        "log_errors": errors,
        "log_tracebacks": tracebacks,
        "step_timeouts": sum(count_timeouts(s.log) for s in supervisor.of_role("orchestrator")),
        "results": {"by_event": load.by_event, "by_store": load.by_store},
        "reconnects": load.reconnects,
        "load_s": round(load_s, 1),
        "sagas_per_s": round(finished / load_s, 1),
        "drain_s": None if drain_s is None else round(drain_s, 1),
        "drain_timed_out": drained.timed_out,
        "stalled": load.stalled,
        "checks": [
            {
                "n": c.number,
                "title": c.title,
                "ok": c.ok,
                "summary": c.summary,
                "problems": c.problems,
            }
            for c in checks
        ],
        "violations": sum(len(c.problems) for c in checks),
    }


def _kills_text(report: dict[str, Any]) -> str:
    parts = [f"{name} {k['done']}/{k['planned']}" for name, k in report["kills"].items()]
    broker = report["broker_restart"]
    if broker["skipped"]:
        restart = "skipped (no --broker-restart-cmd)"
    elif broker["exit_code"] == 0:
        restart = f"done in {broker['seconds']}s"
    elif broker["exit_code"] is None:
        restart = "not reached"
    else:
        restart = f"FAILED (exit {broker['exit_code']}): {broker['output']}"
    dropped = report["connection_drops"]
    drops = (
        f"; connections dropped {dropped['done']}/{dropped['planned']}"
        if dropped["planned"]
        else ""
    )
    if broker["skipped"] and report["node_stops"]["planned"]:
        return f"SIGKILL {', '.join(parts)}{drops}"  # the broker row tells of the nodes
    return f"SIGKILL {', '.join(parts)}{drops}; broker restart {restart}"


def _node_stops_text(report: dict[str, Any]) -> str:
    stops = report["node_stops"]
    parts = []
    for stop in stops["done"]:
        if stop["error"]:
            parts.append(f"node {stop['node']} FAILED ({stop['error']})")
        else:
            parts.append(
                f"node {stop['node']} at {stop['at_s']}s (stopping took {stop['stopping_s']}s), "
                f"down {stop['down_s']}s, all {stops['nodes']} running {stop['back_s']}s later"
            )
    return f"{len(stops['done'])}/{stops['planned']} stopped and started: " + (
        "; ".join(parts) or "none"
    )


def _restarts_text(report: dict[str, Any]) -> str:
    restarts = ", ".join(f"{n} {c}" for n, c in report["restarts"].items())
    crashes = ", ".join(f"{n} {c}" for n, c in report["crashes"].items())
    text = f"{restarts}; crashes seen (exit {CRASH_EXIT_CODE}): {crashes}"
    if report["unexpected_exits"]:
        unexpected = "; ".join(
            f"{n}: exit {codes}" for n, codes in report["unexpected_exits"].items()
        )
        text += f"; UNEXPECTED exits: {unexpected}"
    return text


def format_report(report: dict[str, Any]) -> list[str]:
    """The report as the lines the soak prints, ending with `violations: N`."""
    params = report["params"]
    faults = report["faults_injected"]
    injected = (
        ", ".join(f"{k} {faults.get(k, 0)}" for k in FAULT_FLAGS)
        if params["faults"]
        else "none (--no-faults)"
    )
    rows = [("stack", params["stack"])] if params["stack"] else []
    rows += [
        (
            "orders placed",
            f"{report['placed']}/{params['sagas']} at concurrency {params['concurrency']}: "
            + ", ".join(f"{n} {KIND_HELP[k]}" for k, n in report["orders"].items()),
        ),
        ("sagas by outcome", report["outcomes"]),
        ("kills", _kills_text(report)),
        *([("broker nodes", _node_stops_text(report))] if report["node_stops"]["planned"] else []),
        ("restarts", _restarts_text(report)),
        ("faults injected", injected),
        ("time-outs", f"{report['step_timeouts']} deadlines missed (then resent or given up)"),
        (
            "results seen",
            f"{report['results']['by_event']} on saga.events, {report['results']['by_store']} "
            f"read from the store; {report['reconnects']} reconnects",
        ),
        (
            "service logs",
            f"{report['log_errors']} ERROR lines, {report['log_tracebacks']} tracebacks",
        ),
        (
            "time to drain",
            "did not drain"
            if report["drain_s"] is None
            else f"{report['drain_s']}s after the last order",
        ),
        ("sagas/s", f"{report['sagas_per_s']} ({report['finished']} in {report['load_s']}s)"),
    ]
    lines = [
        f"chaos soak: vhost {params['vhost']}, data {params['data_dir']}, seed {params['seed']}"
    ]
    lines += [f"{label:<17} {value}" for label, value in rows]
    lines.append("-" * 100)
    for c in report["checks"]:
        state = "OK  " if c["ok"] else "FAIL"
        lines.append(f"{state} {c['n']}. {c['title']:<30} {c['summary']}")
        lines += [f"       {p}" for p in c["problems"][:MAX_LISTED]]
        if len(c["problems"]) > MAX_LISTED:
            lines.append(f"       ... and {len(c['problems']) - MAX_LISTED} more (see --json)")
    lines.append(f"violations: {report['violations']}")
    return lines

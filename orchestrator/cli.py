"""`saga` (also `python -m orchestrator`): run the orchestrator, inspect and steer sagas.

Reading commands (list, show, stats) open the store read-only; steering commands (abort,
retry) send an operator action to the orchestrator (through orchestrator.steer), which
decides and records it like any event, and answers ActionTaken or ActionRefused.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from messages.contract.models import (
    AbortSaga,
    ActionRefused,
    ActionTaken,
    Envelope,
    RetrySaga,
    SagaFinished,
    SagaStatus,
)
from messages.errors import SagaError, SagaNotFoundError
from messages.plumbing import health, logs
from messages.plumbing.service import run_service
from messages.plumbing.settings import load
from messages.plumbing.timeline import format_timeline, render_result
from orchestrator.provision import ProvisionSettings, provision
from orchestrator.report import age, current_step, describe, parse_duration, seconds_text, summary
from orchestrator.runtime import Orchestrator, definition_from
from orchestrator.settings import OrchestratorSettings, WebSettings
from orchestrator.steer import send_action
from orchestrator.store import SagaFilter, SagaStore, open_store, order_fields


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state(text: str) -> SagaStatus:
    try:
        return SagaStatus(text.upper())
    except ValueError:
        valid = ", ".join(s.value for s in SagaStatus)
        raise argparse.ArgumentTypeError(f"no state {text!r}; valid states: {valid}") from None


def _limit(text: str) -> int:
    """--limit N: at most N sagas; 0 means all of them (an audit reads every saga)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more, got {value}")
    return value or _ALL


_ALL = sys.maxsize  # what --limit 0 stands for: more rows than a store can hold


def build_parser(prog: str = "saga") -> argparse.ArgumentParser:
    """The command line: run, health, provision, web, list, show, stats, retry and abort."""
    parser = argparse.ArgumentParser(prog=prog, description="The order saga orchestrator.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume requests and replies until interrupted")
    sub.add_parser(
        "health", help="exit 0 if the orchestrator is connected and consuming, else 1 and why"
    )
    sub.add_parser(
        "provision", help="create one RabbitMQ user per service and declare the topology"
    )
    sub.add_parser(
        "web",
        help="serve the console in a browser (SAGA_WEB_HOST:SAGA_WEB_PORT, 127.0.0.1:8080)",
    )

    listing = sub.add_parser("list", help="list sagas, newest first")
    listing.add_argument(
        "--state",
        type=_state,
        metavar="STATE",
        help="only sagas in this state: " + ", ".join(s.value for s in SagaStatus),
    )
    listing.add_argument(
        "--stuck",
        action="store_true",
        help="only sagas waiting SAGA_STUCK_AFTER_S or longer for one reply",
    )
    listing.add_argument("--since", type=_duration, help="only sagas started within, e.g. 10m")
    listing.add_argument("--reason", help="only sagas whose reason contains this, e.g. declined")
    listing.add_argument("--customer", help="only this customer's sagas")
    listing.add_argument("--sku", help="only sagas for this SKU")
    listing.add_argument(
        "--limit", type=_limit, default=50, help="at most this many (default 50; 0: all)"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    show = sub.add_parser("show", help="one saga: its order and timeline")
    show.add_argument("saga_id", type=UUID, help="the saga id place_order printed")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    stats = sub.add_parser("stats", help="counts by state and outcome, durations")
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    retry = sub.add_parser(
        "retry",
        help="send the command a running or compensating saga waits on again now, "
        "not at its deadline (a FAILED saga stays FAILED)",
    )
    retry.add_argument("saga_id", type=UUID)
    retry.add_argument("--reason", required=True, help="why; kept in the saga's history")
    retry.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the orchestrator's answer"
    )
    retry.add_argument("--json", action="store_true", help="machine-readable output")

    action = sub.add_parser(
        "abort",
        help="compensate a saga before its pivot now; end a stuck one past it as FAILED",
    )
    action.add_argument("saga_id", type=UUID)
    action.add_argument("--reason", required=True, help="why; kept in the saga's history")
    action.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the saga to end"
    )
    action.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "saga") -> int:
    """Entry point; returns the process exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "provision":
            return _provision()
        if args.command == "web":
            return _web()
        settings = load(OrchestratorSettings)
        logs.configure(settings.log_level, settings.log_format)
        if args.command == "run":
            return _run(settings)
        if args.command == "health":
            return _health(settings)
        if args.command == "retry":
            return _retry(settings, args)
        if args.command == "abort":
            return _steer(settings, args)
        store = open_store(settings, readonly=True)
        try:
            if args.command == "show":
                return _show(store, args, settings)
            command = {"list": _list, "stats": _stats}[args.command]
            return command(store, args, settings.stuck_after_s)
        finally:
            store.close()
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, nothing went wrong here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, sqlite3.Error) as exc:
        print(f"error: the store under SAGA_DATA_DIR cannot be used: {exc}", file=sys.stderr)
        return 2


def module_main() -> int:
    """`python -m orchestrator`, same commands as `saga`."""
    return main(prog="python -m orchestrator")


def _provision() -> int:
    settings = load(ProvisionSettings)
    logs.configure(settings.log_level, settings.log_format)
    for line in asyncio.run(provision(settings)):
        print(line)
    return 0


def _web() -> int:
    from orchestrator.web.app import serve  # the web stack loads only for `saga web`

    settings = load(WebSettings)
    logs.configure(settings.log_level, settings.log_format)
    return serve(settings)


def _health(settings: OrchestratorSettings) -> int:
    problem = health.check(health.path(settings.data_dir, "orchestrator"))
    print(f"orchestrator: {problem or 'healthy: connected and consuming'}")
    return 1 if problem else 0


def _run(settings: OrchestratorSettings) -> int:
    store = open_store(settings)
    try:
        return run_service(Orchestrator(settings, store).run())
    finally:
        store.close()


# --- reading -----------------------------------------------------------------------------------


def _list(store: SagaStore, args: argparse.Namespace, stuck_after_s: float) -> int:
    if args.state is SagaStatus.QUARANTINED:
        return _list_quarantined(store, args)
    now = datetime.now(UTC)
    where = SagaFilter(
        status=args.state,
        since=now - args.since if args.since else None,
        stuck_before=now - timedelta(seconds=stuck_after_s) if args.stuck else None,
        reason=args.reason,
        input=order_fields(customer_id=args.customer, sku=args.sku),
    )
    sagas = store.sagas(where, args.limit)
    if args.json:
        print(json.dumps([summary(s, now, stuck_after_s) for s in sagas], indent=2))
        return 0
    if not sagas:
        print("no sagas")
        return 0
    print(f"{'SAGA ID':<36}  {'STATE':<12}  {'STEP':<15}  {'AGE':>5}  {'STUCK':>5}  LAST ERROR")
    for s in sagas:
        stuck_for = s.stuck_for(now, stuck_after_s)
        stuck = "-" if stuck_for is None else seconds_text(stuck_for)
        print(
            f"{s.saga_id!s:<36}  {s.status:<12}  {current_step(s):<15}  {age(s, now):>5}  "
            f"{stuck:>5}  {s.outcome or ''}"
        )
    return 0


def _list_quarantined(store: SagaStore, args: argparse.Namespace) -> int:
    """Sagas the orchestrator set aside because it could not read or decide them."""
    rows = store.quarantined(args.limit)
    if args.json:
        report = [
            {"saga_id": i, "status": "QUARANTINED", "reason": why, "updated_at": at.isoformat()}
            for i, why, at in rows
        ]
        print(json.dumps(report, indent=2))
        return 0
    if not rows:
        print("no quarantined sagas")
    for saga_id, why, at in rows:
        print(f"{saga_id}  QUARANTINED  {at:%Y-%m-%d %H:%M:%S}  {why}")
    return 0


def _show(store: SagaStore, args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    stuck_after_s = settings.stuck_after_s
    state = store.get(args.saga_id)
    if state is None:
        raise SagaNotFoundError(
            f"no saga {args.saga_id} in the store: the orchestrator has not started it "
            "(a request waits in orchestrator.requests until an orchestrator runs)"
        )
    if args.json:
        print(state.model_dump_json(indent=2))
        return 0
    print(
        f"saga {state.saga_id}: {state.status}" + (f" ({state.outcome})" if state.outcome else "")
    )
    print(f"{state.saga}: {describe(state, definition_from(settings))}")
    print(f"started {state.created_at:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC")
    stuck_for = state.stuck_for(datetime.now(UTC), stuck_after_s)
    if stuck_for is not None:
        print(
            f"stuck: waiting {seconds_text(stuck_for)} for one reply, attempt {state.attempt} "
            f"(participant back: saga retry {state.saga_id} --reason ...; "
            f"if it must stop: saga abort {state.saga_id} --reason ...)"
        )
    print(format_timeline(state.history))
    return 0


_IN_FLIGHT = (SagaStatus.RUNNING, SagaStatus.COMPENSATING)  # what stats.oldest_running covers


def _stats(store: SagaStore, args: argparse.Namespace, stuck_after_s: float) -> int:
    stats = store.stats()
    stuck = store.stuck(datetime.now(UTC), stuck_after_s)
    durations = stats.durations_s
    mean = sum(durations) / len(durations) if durations else None
    p99 = durations[min(len(durations) - 1, int(0.99 * len(durations)))] if durations else None
    in_flight = sum(stats.by_status.get(s.value, 0) for s in _IN_FLIGHT)
    # the store counts first and looks up the oldest after: a saga may finish in between
    oldest = stats.oldest_running if in_flight else None
    report = {
        "by_state": {s.value: stats.by_status.get(s.value, 0) for s in SagaStatus},
        "by_outcome": stats.by_outcome,
        "finished": len(durations),
        "stuck": stuck,
        "outbox": store.outbox_depth(),
        "duration_mean_ms": None if mean is None else round(mean * 1000, 1),
        "duration_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "oldest_running": None
        if oldest is None
        else {
            "saga_id": str(oldest.saga_id),
            "status": oldest.status.value,
            "started": oldest.created_at.isoformat(),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        "by state:   "
        + ", ".join(f"{s.value} {stats.by_status.get(s.value, 0)}" for s in SagaStatus)
    )
    print("by outcome: " + (", ".join(f"{k}: {v}" for k, v in stats.by_outcome.items()) or "-"))
    if mean is not None and p99 is not None:
        print(f"duration:   mean {mean * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    if stuck:
        print(f"stuck:      {stuck} (waiting {stuck_after_s:g}s or longer: saga list --stuck)")
    if report["outbox"]:
        print(f"outbox:     {report['outbox']} message(s) not yet confirmed by the broker")
    if oldest is not None:
        oldest_age = age(oldest, datetime.now(UTC))
        print(f"oldest in flight: {oldest.saga_id}, {oldest.status}, {oldest_age} old")
    return 0


# --- steering ----------------------------------------------------------------------------------


def _operator() -> str:
    """Who asks, as the saga's history records it: user@host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _retry(settings: OrchestratorSettings, args: argparse.Namespace) -> int:
    """`saga retry`: 0 once the orchestrator has sent the command again, else 2 and why."""
    action = RetrySaga(saga_id=args.saga_id, reason=args.reason, requested_by=_operator())
    answer = send_action(settings.amqp_url, settings.ca_file, action, args.timeout)
    if isinstance(answer, ActionRefused):
        raise SagaError(f"retry refused: {answer.detail}")
    if not isinstance(answer, ActionTaken):
        raise SagaError(
            f"retry sent, but no answer within {args.timeout:g}s: is the orchestrator "
            f"running? (see: saga show {args.saga_id})"
        )
    print(answer.model_dump_json(indent=2) if args.json else f"{args.saga_id}: {answer.detail}")
    return 0


def _steer(settings: OrchestratorSettings, args: argparse.Namespace) -> int:
    """`saga abort`: waits for the saga's end; 0 COMPENSATED, 1 FAILED, 2 refused or late."""
    action = AbortSaga(saga_id=args.saga_id, reason=args.reason, requested_by=_operator())
    taken: list[ActionTaken] = []  # the abort's answer; the saga's end follows it

    def refused_or_finished(message: Envelope) -> bool:
        if message.saga_id != args.saga_id:
            return False
        if isinstance(message, ActionTaken):
            taken.append(message)
        return isinstance(message, SagaFinished | ActionRefused)

    answer = send_action(
        settings.amqp_url,
        settings.ca_file,
        action,
        args.timeout,
        refused_or_finished,
        watch_events=True,
    )
    if isinstance(answer, ActionRefused):
        raise SagaError(f"{args.command} refused: {answer.detail}")
    if not isinstance(answer, SagaFinished):
        heard = f"taken ({taken[0].detail})" if taken else "sent, not answered yet"
        print(
            f"{args.command} {heard}; the saga did not finish within {args.timeout:g}s "
            f"(see: saga show {args.saga_id})"
        )
        return 2
    print(render_result(answer, args.json))
    return 0 if answer.status is not SagaStatus.FAILED else 1

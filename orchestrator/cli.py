"""`python -m orchestrator run | list | show`: run the orchestrator, or read its store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from uuid import UUID

from messages import logs
from messages.errors import SagaError, SagaNotFoundError
from messages.models import SagaStatus
from messages.service import run_service
from messages.settings import load
from messages.timeline import format_timeline
from orchestrator.engine import SagaState
from orchestrator.runtime import Orchestrator
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import SqliteStore


def build_parser() -> argparse.ArgumentParser:
    """The command line: run, list and show."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator", description="The order saga orchestrator."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume requests and replies until interrupted")
    listing = sub.add_parser("list", help="list sagas, newest first")
    listing.add_argument(
        "--state", type=SagaStatus, choices=list(SagaStatus), help="only sagas in this state"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="one saga and its timeline")
    show.add_argument("saga_id", type=UUID, help="the saga id place_order printed")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _summary(state: SagaState) -> dict[str, object]:
    order = state.request
    return {
        "saga_id": str(state.saga_id),
        "status": state.status.value,
        "step": state.history[-1].step if state.history else None,
        "reason": state.reason,
        "customer_id": order.customer_id,
        "sku": order.sku,
        "quantity": order.quantity,
        "amount": str(order.amount.amount),
        "currency": order.amount.currency,
        "created_at": state.created_at.isoformat(),
        "updated_at": state.updated_at.isoformat(),
    }


def _list(settings: OrchestratorSettings, args: argparse.Namespace) -> int:
    store = SqliteStore(settings.db_path, readonly=True)
    sagas = store.sagas(args.state, args.limit)
    if args.json:
        print(json.dumps([_summary(s) for s in sagas], indent=2))
        return 0
    if not sagas:
        print("no sagas")
        return 0
    print(f"{'SAGA ID':<36}  {'STATE':<12}  {'CREATED (UTC)':<19}  {'ORDER':<32}  REASON")
    for s in sagas:
        order = f"{s.request.quantity} x {s.request.sku} {s.request.amount}"
        print(
            f"{s.saga_id!s:<36}  {s.status:<12}  {s.created_at:%Y-%m-%d %H:%M:%S}  "
            f"{order:<32}  {s.reason or ''}"
        )
    return 0


def _show(settings: OrchestratorSettings, args: argparse.Namespace) -> int:
    store = SqliteStore(settings.db_path, readonly=True)
    state = store.get(args.saga_id)
    if state is None:
        raise SagaNotFoundError(f"no saga {args.saga_id} in {settings.db_path}")
    if args.json:
        print(state.model_dump_json(indent=2))
        return 0
    order = state.request
    print(f"saga {state.saga_id}: {state.status}" + (f" ({state.reason})" if state.reason else ""))
    print(f"order: {order.quantity} x {order.sku} for {order.customer_id}, {order.amount}")
    print(format_timeline(state.history))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load(OrchestratorSettings)
        logs.configure(settings.log_level)
        if args.command == "run":
            return _run(settings)
        return _list(settings, args) if args.command == "list" else _show(settings, args)
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(settings: OrchestratorSettings) -> int:
    store = SqliteStore(settings.db_path)
    try:
        return run_service(Orchestrator(settings, store).run())
    finally:
        store.close()

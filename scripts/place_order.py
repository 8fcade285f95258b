#!/usr/bin/env python3
"""Place an order and wait for its saga to finish.

Prints the saga id, its final state and a per-step timeline. Exit code: 0 when the order
completed, 1 when it was rejected and compensated, 2 on a time-out, FAILED or an error.
With --count N it places N orders, C at a time, and prints a summary instead, counted by
state and reason; the exit code is then the worst of the orders' codes.

    python scripts/place_order.py --customer c-1 --sku item-1 --qty 1 --amount 25.00
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from uuid import uuid4

from pydantic import ValidationError

from messages.contract.models import Envelope, PlaceOrder, SagaFinished, SagaStatus, parse_money
from messages.errors import SagaError
from messages.plumbing.client import Client
from messages.plumbing.settings import BrokerSettings, load
from messages.plumbing.timeline import render_result

FLAGS = {"customer_id": "--customer", "sku": "--sku", "quantity": "--qty", "amount": "--amount"}
EXIT_CODES = {SagaStatus.COMPLETED: 0, SagaStatus.COMPENSATED: 1, SagaStatus.FAILED: 2}
CODE_OF_STATE = {status.value: code for status, code in EXIT_CODES.items()}
TIMED_OUT, NOT_PLACED = "TIMED_OUT", "NOT_PLACED"  # --count outcomes besides saga states


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--customer", required=True, help="customer id, e.g. c-1")
    parser.add_argument("--sku", required=True, help="stock keeping unit, e.g. item-1")
    parser.add_argument("--qty", type=int, required=True, help="units to order")
    parser.add_argument("--amount", required=True, help="price, e.g. 25.00 or '25.00 USD'")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a result (default 60); the order is not withdrawn after it",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--url", default=None, help="RabbitMQ URL (default: SAGA_AMQP_URL, else local guest)"
    )
    parser.add_argument("--count", type=int, default=1, help="place this many orders")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="with --count: orders in flight at once"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.concurrency < 1:
        parser.error("--count and --concurrency must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be more than 0 seconds")
    return args


def build_request(args: argparse.Namespace) -> PlaceOrder:
    try:
        return PlaceOrder(
            saga_id=uuid4(),
            customer_id=args.customer,
            sku=args.sku,
            quantity=args.qty,
            amount=parse_money(args.amount),
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()
        )
        raise SagaError(f"invalid order: {problems}") from exc
    except ValueError as exc:
        raise SagaError(f"invalid order: {exc}") from exc


def place_one(client: Client, args: argparse.Namespace) -> int:
    request = build_request(args)
    client.request(request)
    result = client.wait_for(lambda m: _finishes(m, request), args.timeout)
    if not isinstance(result, SagaFinished):
        if args.json:
            print(
                json.dumps(
                    {
                        "saga_id": str(request.saga_id),
                        "status": "TIMED_OUT",
                        "reason": f"no result within {args.timeout:g}s; the order is still queued",
                        "history": [],
                    }
                )
            )
        else:
            print(
                f"saga {request.saga_id}: no result within {args.timeout:g}s. The order is "
                "queued and will still be processed: is the orchestrator running? "
                f"Check later with: saga show {request.saga_id}"
            )
        return 2
    print(render_result(result, args.json))
    return EXIT_CODES[result.status]


def place_many(client: Client, args: argparse.Namespace) -> int:
    """Closed loop: keep ``concurrency`` orders in flight until ``count`` have finished."""
    started: dict[object, float] = {}
    outcomes: Counter[tuple[str, str]] = Counter()  # (state, reason)
    latencies: list[float] = []
    placed = 0
    begin = time.monotonic()
    while placed < args.count or started:
        while placed < args.count and len(started) < args.concurrency:
            request = build_request(args)
            client.request(request)
            started[request.saga_id] = time.monotonic()
            placed += 1
        result = client.wait_for(lambda m: isinstance(m, SagaFinished), args.timeout)
        if not isinstance(result, SagaFinished):
            outcomes[TIMED_OUT, f"no result within {args.timeout:g}s"] += len(started)
            if placed < args.count:
                outcomes[NOT_PLACED, "stopped at the time-out"] += args.count - placed
            break
        if (at := started.pop(result.saga_id, None)) is not None:
            latencies.append(time.monotonic() - at)
            outcomes[result.status.value, result.reason or ""] += 1
            _progress(sum(outcomes.values()), args.count)
    elapsed = time.monotonic() - begin
    _summary(outcomes, latencies, elapsed, args.json)
    # the worst single-order code: 0 all completed, 1 some compensated, 2 anything else
    return max((CODE_OF_STATE.get(state, 2) for state, _ in outcomes), default=2)


def _finishes(message: Envelope, request: PlaceOrder) -> bool:
    return isinstance(message, SagaFinished) and message.saga_id == request.saga_id


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        filled = int(30 * done / total)
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)


def _summary(
    outcomes: Counter[tuple[str, str]], latencies: list[float], elapsed: float, as_json: bool
) -> None:
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0
        )

    by_state: Counter[str] = Counter()
    for (state, _), n in outcomes.items():
        by_state[state] += n
    by_reason = sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
    summary = {
        "outcomes": dict(by_state),
        "by_reason": [{"state": s, "reason": r or None, "count": n} for (s, r), n in by_reason],
        "finished": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "sagas_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": round(pct(0.5), 1), "p99": round(pct(0.99), 1)},
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    counts = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    print(f"{summary['finished']} sagas in {elapsed:.1f}s ({summary['sagas_per_s']}/s): {counts}")
    for (state, reason), n in by_reason:
        print(f"  {n:>6}  {state:<12} {reason}".rstrip())
    print(f"latency p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build_request(args)  # refuse bad input before touching the broker
        settings = load(BrokerSettings)
        with Client(args.url or settings.amqp_url, ca_file=settings.ca_file) as client:
            if args.count == 1:
                return place_one(client, args)
            return place_many(client, args)
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into `head`
        sys.exit(0)

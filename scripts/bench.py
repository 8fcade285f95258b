#!/usr/bin/env python3
"""Benchmark the saga stack: sagas/s, latency, per-step latency, and the broker's raw rate.

Drives the stack running at --url (or, with --start-stack, starts the orchestrator and the
three participants as separate processes against it), placing orders the way
place_order.py does: PlaceOrder published persistent with confirms to saga.requests, reply_to
an exclusive server-named queue, and the SagaFinished with the same saga id awaited there.

    python scripts/bench.py --start-stack --concurrency 16 --count 5000 --raw
    python scripts/bench.py --url amqp://guest:guest@localhost:5672/bench --concurrency 64
    python scripts/bench.py --start-stack --rate 30 --duration 30 --json > run.json
    python scripts/bench.py --start-stack --concurrency 1 --count 200 --breakdown --limit
    python scripts/bench.py --markdown benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

# `python scripts/bench.py` puts scripts/ on the path, not the checkout that holds the harness.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from messages.errors import ConfigurationError
from messages.plumbing.amqp import BROKER_ERRORS
from messages.plumbing.settings import BrokerSettings, load
from scripts import bench_limit
from scripts.harness.bench_common import BenchError
from scripts.harness.bench_report import human, markdown
from scripts.harness.bench_run import bench
from scripts.harness.bench_stack import BenchStack


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", help="RabbitMQ URL (default: SAGA_AMQP_URL, else local guest)")
    parser.add_argument(
        "--start-stack",
        action="store_true",
        help="start the orchestrator and the three participants as separate processes",
    )
    parser.add_argument(
        "--postgres-url",
        help="--start-stack: keep the orchestrators' store and the participants in PostgreSQL "
        "(a database the bench makes on this server and drops afterwards), not SQLite",
    )
    parser.add_argument(
        "--orchestrators",
        type=int,
        default=1,
        help="--start-stack: orchestrator processes (more than 1 needs --postgres-url)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="--start-stack: processes of each participant (more than 1 needs --postgres-url)",
    )
    parser.add_argument(
        "--queue-type",
        choices=("classic", "quorum"),
        default="classic",
        help="--start-stack: SAGA_QUEUE_TYPE of the started services (quorum on a cluster: "
        "give --url the comma-separated URLs of its nodes)",
    )
    parser.add_argument("--count", type=int, default=1000, help="closed loop: sagas to measure")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="closed loop: sagas in flight at once"
    )
    parser.add_argument("--rate", type=float, help="open loop: sagas started per second")
    parser.add_argument("--duration", type=float, help="open loop: seconds to keep starting")
    parser.add_argument("--warmup", type=int, default=50, help="sagas run first, not measured")
    parser.add_argument(
        "--decline-ratio",
        type=float,
        default=0.1,
        help="share of orders over the credit limit, which payment declines",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a saga may take before it counts as timed out",
    )
    parser.add_argument("--sku", default="bench-item", help="SKU ordered (1 unit per order)")
    parser.add_argument(
        "--stock",
        type=int,
        default=1_000_000_000,
        help="--start-stack: units of --sku the inventory starts with",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="--start-stack: where to make the services' temporary SQLite directory "
        "(default: the system's temporary directory)",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="--start-stack: keep the data directory"
    )
    parser.add_argument("--raw", action="store_true", help="also measure the broker's raw rate")
    parser.add_argument("--raw-count", type=int, default=10_000, help="--raw: messages, at most")
    parser.add_argument(
        "--raw-seconds",
        type=float,
        default=5.0,
        help="--raw: stop publishing after this long, even short of --raw-count",
    )
    parser.add_argument(
        "--raw-window", type=int, default=256, help="--raw: unconfirmed publishes at once"
    )
    parser.add_argument("--raw-size", type=int, default=512, help="--raw: body bytes")
    parser.add_argument(
        "--raw-prefetch", type=int, default=64, help="--raw: unacked deliveries (SAGA_PREFETCH)"
    )
    parser.add_argument(
        "--limit",
        action="store_true",
        help="also measure the message-shape limit: the saga's 8 persistent confirmed "
        "messages through 4 pass-through processes (aiormq on uvloop, no state, no SQLite), "
        f"closed loop at --concurrency for min(--count, {bench_limit.COUNT_CAP}) sagas, after "
        "the rest; reports limit_ratio = finished/s over the limit's",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="after the measurement, run --breakdown-count more sagas (none declined) and "
        "report where each millisecond of their path goes, per hop: a tap queue (exclusive, "
        "not durable, so its copies are never written to disk) sees each command and reply "
        "as the broker routes it; meant for --concurrency 1",
    )
    parser.add_argument(
        "--breakdown-count", type=int, default=200, help="--breakdown: sagas to time"
    )
    parser.add_argument("--label", help="name of the run in the --markdown table")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--markdown",
        nargs="+",
        metavar="FILE",
        type=Path,
        help="print a markdown table of these JSON results files, and nothing else",
    )
    args = parser.parse_args(argv)
    if args.markdown:
        return args
    problems = []
    if (args.rate is None) != (args.duration is None):
        problems.append("--rate and --duration go together (open loop)")
    elif args.rate is not None and (args.rate <= 0 or args.duration <= 0):
        problems.append("--rate and --duration must be positive")
    elif args.rate is not None and args.rate * args.duration < 1:
        problems.append("--rate x --duration must be at least one saga")
    if args.count < 1 or args.concurrency < 1:
        problems.append("--count and --concurrency must be at least 1")
    if args.warmup < 0:
        problems.append("--warmup cannot be negative")
    if not 0 <= args.decline_ratio <= 1:
        problems.append("--decline-ratio must be between 0 and 1")
    if args.timeout <= 0:
        problems.append("--timeout must be positive")
    if min(args.raw_count, args.raw_window, args.raw_size, args.raw_prefetch) < 1:
        problems.append("--raw-count, --raw-window, --raw-size and --raw-prefetch must be >= 1")
    if args.raw_seconds <= 0:
        problems.append("--raw-seconds must be positive")
    if args.stock < 0:
        problems.append("--stock cannot be negative")
    if args.breakdown_count < 1:
        problems.append("--breakdown-count must be at least 1")
    if args.orchestrators < 1 or args.replicas < 1:
        problems.append("--orchestrators and --replicas must be at least 1")
    elif (args.orchestrators > 1 or args.replicas > 1) and not args.postgres_url:
        problems.append(
            "several orchestrators or replicas share their state in PostgreSQL: give --postgres-url"
        )
    if problems:
        parser.error("; ".join(problems))
    return args


# --- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The bench says what went wrong itself; the AMQP libraries' own log lines (with
    # tracebacks, on a lost connection) would only repeat it.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if args.markdown:
            print(markdown(args.markdown))
            return 0
        url = args.url or load(BrokerSettings).amqp_url
    except (BenchError, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stack = (
        BenchStack(
            url,
            args.sku,
            args.stock,
            args.data_dir,
            args.keep_data,
            args.orchestrators,
            args.replicas,
            args.postgres_url,
            args.queue_type,
        )
        if args.start_stack
        else None
    )
    failed = True
    try:
        with _terminate_as_interrupt():
            result = asyncio.run(_cancel_on_terminate(bench(args, url, stack)))
        failed = False
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BROKER_ERRORS as exc:
        print(f"error: RabbitMQ connection trouble: {exc!r}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        failed = False  # nothing to look into: the data directory goes unless --keep-data
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.stop(failed=failed)
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


async def _cancel_on_terminate(run: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """While the loop runs, SIGTERM cancels the run as Ctrl-C does: the `finally` blocks
    can still use the broker (--limit deletes its queues), which a KeyboardInterrupt raised
    anywhere in the loop would not let them."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the bench like Ctrl-C, so the stack is stopped either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head: not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

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
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import aiormq
import bench_breakdown
import bench_limit
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from children import Children
from yarl import URL

from messages.contract import topology
from messages.contract.codec import decode
from messages.contract.models import HistoryEntry, Money, PlaceOrder, SagaFinished, SagaStatus
from messages.errors import ConfigurationError, DecodeError, PublishFailedError
from messages.plumbing.amqp import BROKER_ERRORS, Publisher, redact
from messages.plumbing.settings import BrokerSettings, load

ROOT = Path(__file__).resolve().parents[1]
SAGA = "saga"  # the `step` of history entries about the saga as a whole (orchestrator.engine)
TIMED_OUT = "TIMED_OUT"
OUTCOMES = (*(s.value for s in SagaStatus if s.finished), TIMED_OUT)
STEPS = ("reserve_stock", "charge_payment", "complete_order")
REPLY_EVENTS = {
    "succeeded": "",
    "failed": "",
    "compensated": "/undo",
    "compensation_failed": "/undo",
}
OK_AMOUNT = Money(amount=Decimal("25.00"))
DECLINED_AMOUNT = Money(amount=Decimal("5000.00"))  # over the default credit limit of 1000.00
SERVICES = ("orchestrator", "inventory", "payment", "order")
SERVICE_QUEUES = {
    "orchestrator": topology.REQUESTS_QUEUE,
    **{p: topology.command_queue(p) for p in topology.PARTICIPANTS},
}
READY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
MESSAGE_COUNTING = (
    "request + commands sent (resends included) + replies the orchestrator applied + the "
    "result delivered to reply_to; the copy of the result on saga.events is not counted"
)


class BenchError(Exception):
    """Raised with a message for the user; the script exits with code 2."""


# --- command line ------------------------------------------------------------------------


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
    if problems:
        parser.error("; ".join(problems))
    return args


# --- statistics --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (so p50 <= p99 <= max always)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, Any]:
    """Percentiles, max and mean of durations in seconds, as milliseconds."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    for p in points:
        out[f"p{p:g}"] = _ms(percentile(ordered, p))
    out["max"] = _ms(ordered[-1]) if ordered else None
    out["mean"] = _ms(sum(ordered) / len(ordered)) if ordered else None
    return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def analyse_history(history: Sequence[HistoryEntry]) -> tuple[dict[str, float], int]:
    """Per-step latency (a step's last `sent` to its reply) and the messages the saga cost.

    A compensation's latency is keyed ``<step>/undo``.
    """
    sent: dict[str, Any] = {}
    steps: dict[str, float] = {}
    commands = replies = 0
    for entry in history:
        if entry.step == SAGA:
            continue
        if entry.event == "sent":
            commands += 1
            sent[entry.step] = entry.at
        elif entry.event in REPLY_EVENTS:
            replies += 1
            at = sent.pop(entry.step, None)
            if at is not None:
                steps[entry.step + REPLY_EVENTS[entry.event]] = (entry.at - at).total_seconds()
    return steps, 1 + commands + replies + 1


# --- machine and processes ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def source_info() -> dict[str, Any]:
    """Which code ran: the checkout's commit, and whether tracked files differ from it."""
    info: dict[str, Any] = {"root": str(ROOT), "git_commit": None, "git_dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty"] = bool(dirty.stdout.strip())
    return info


def filesystem_of(path: Path) -> str | None:
    """The filesystem type ``path`` lives on (ext4, tmpfs...), from /proc/mounts."""
    best, kind = "", None
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process, in KiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    return None


def machine_ticks() -> dict[str, int] | None:
    """Jiffies all CPUs spent per state since boot (/proc/stat), to see what else ran."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        return dict(zip(names, map(int, fields), strict=True))
    return None


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def machine_load(
    before: dict[str, int] | None,
    after: dict[str, int] | None,
    elapsed: float,
    cores: dict[str, float],
) -> dict[str, Any]:
    """How busy the whole machine was, and how much of that was not this bench's processes."""
    load: dict[str, Any] = {"loadavg_end": loadavg()}
    if before is None or after is None or elapsed <= 0:
        return load
    delta = {k: (after[k] - before[k]) / _TICKS / elapsed for k in after}
    busy = sum(delta.values()) - delta["idle"] - delta["iowait"]
    ours = sum(v for k, v in cores.items() if k != "rabbitmq")
    load.update(
        busy_cores=round(busy, 2),
        bench_and_stack_cores=round(ours, 2),
        rabbitmq_cores=round(cores.get("rabbitmq", 0.0), 2),
        other_cores=round(max(0.0, busy - ours - cores.get("rabbitmq", 0.0)), 2),
        steal_cores=round(delta["steal"], 2),
        iowait_cores=round(delta["iowait"], 2),
    )
    return load


def local_broker_pid(url: str) -> int | None:
    """The pid of the Erlang VM, when the broker runs on this machine."""
    if URL(url).host not in ("localhost", "127.0.0.1", "::1"):
        return None
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == "beam.smp":
                        return int(entry.name)
    return None


@dataclass
class Stack:
    """The orchestrator and the three participants as separate processes (--start-stack)."""

    url: str
    sku: str
    stock: int
    parent_dir: Path | None
    keep_data: bool
    data_dir: Path | None = None
    children: Children | None = None

    def start(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="saga-bench-", dir=self.parent_dir))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
        env.update(
            SAGA_AMQP_URL=self.url,
            SAGA_DATA_DIR=str(self.data_dir),
            SAGA_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        commands = {
            "orchestrator": ["orchestrator", "run"],
            "inventory": ["workers", "run", "inventory", "--stock", f"{self.sku}={self.stock}"],
            "payment": ["workers", "run", "payment"],
            "order": ["workers", "run", "order"],
        }
        self.children = Children(self.data_dir)
        for name in SERVICES:
            self.children.start(name, [sys.executable, "-m", *commands[name]], env, cwd=ROOT)

    def pids(self) -> dict[str, int]:
        return self.children.pids() if self.children else {}

    def check_alive(self) -> None:
        exited = self.children.exited() if self.children else None
        if exited is not None:
            name, code = exited
            raise BenchError(
                f"{name} exited with code {code} during the bench:\n" + self.log_tail(name)
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        return self.children.log_tail(name, lines) if self.children else ""

    def stop(self, *, failed: bool = False) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 10 s); idempotent."""
        if self.children is not None:
            self.children.stop(10)
        if self.data_dir is not None and self.data_dir.exists():
            if self.keep_data or failed:
                print(f"bench: services' data and logs kept in {self.data_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


# --- the client --------------------------------------------------------------------------


@dataclass
class Sample:
    """What one measured saga gave."""

    outcome: str
    latency_s: float | None = None
    steps: dict[str, float] = field(default_factory=dict)
    messages: int = 0
    reason: str | None = None


async def connect(url: str, name: str) -> AbstractConnection:
    try:
        return await aio_pika.connect(
            url, timeout=CONNECT_TIMEOUT_S, client_properties={"connection_name": name}
        )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise BenchError(f"RabbitMQ at {redact(url)} refused the login: {exc}") from exc
    except aiormq.exceptions.InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            raise BenchError(f"RabbitMQ at {redact(url)}: {exc}") from exc
        vhost = URL(url).path.lstrip("/") or "/"
        raise BenchError(
            f"RabbitMQ at {redact(url)} closed the connection while opening it: does the "
            f"vhost {vhost!r} exist, and may this user use it?"
        ) from exc
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError, ConnectionError) as exc:
        detail = str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach RabbitMQ at {redact(url)}: {detail}") from exc


def server_info(connection: AbstractConnection) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if connection.transport is not None:
        props = dict(connection.transport.connection.server_properties or {})

    def text(value: Any) -> str | None:
        return (
            value.decode() if isinstance(value, bytes) else (None if value is None else str(value))
        )

    return {
        "rabbitmq_product": text(props.get("product")),
        "rabbitmq_version": text(props.get("version")),
        "erlang": text(props.get("platform")),
    }


async def queue_consumers(connection: AbstractConnection, queue: str) -> int | None:
    """Consumers of ``queue``, or None when it does not exist (passive declare)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()
    result = declared.declaration_result
    return int(result.consumer_count or 0)


class SagaClient:
    """Places orders and matches each result to its request by saga id."""

    def __init__(self, connection: AbstractConnection, timeout: float, sku: str) -> None:
        self.connection = connection
        self.timeout = timeout
        self.sku = sku
        self.pending: dict[UUID, tuple[asyncio.Future[Sample], float]] = {}
        self.late = 0
        self.lost: BaseException | None = None
        # --breakdown: called with each result and the wall-clock times of its publish and
        # receipt (time.time(), comparable with the orchestrator's history on one machine).
        self.on_result: Callable[[SagaFinished, float, float], None] | None = None
        self._publisher: Publisher | None = None
        self._reply_to = ""

    async def open(self) -> None:
        publish_channel = await self.connection.channel(publisher_confirms=True)
        try:
            await publish_channel.get_exchange(topology.REQUESTS_EXCHANGE, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise BenchError(
                f"there is no {topology.REQUESTS_EXCHANGE} exchange on this vhost: the "
                "orchestrator has never run here (start it, or use --start-stack)"
            ) from exc
        # get_exchange(ensure=True) closed nothing; the channel stays open for publishing.
        # The client counts in the CPU per saga, so it publishes and consumes the way the
        # services do: through aiormq directly (Publisher; basic_consume, no IncomingMessage).
        self._publisher = await Publisher.on(publish_channel)
        reply_channel = await (await self.connection.channel()).get_underlay_channel()
        declared = await reply_channel.queue_declare(exclusive=True, auto_delete=True)
        assert declared.queue is not None
        self._reply_to = declared.queue
        await reply_channel.basic_consume(self._reply_to, self._on_result, no_ack=True)
        self.connection.close_callbacks.add(self._on_close)

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        self.lost = exc or ConnectionError("connection closed")
        for future, _started in self.pending.values():
            if not future.done():
                future.set_exception(BenchError(f"lost the connection to RabbitMQ: {self.lost}"))

    async def _on_result(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        received = time.perf_counter()
        received_wall = time.time()
        properties = delivered.header.properties
        try:
            key = UUID(properties.correlation_id or "")
        except ValueError:
            return
        waiting = self.pending.pop(key, None)
        if waiting is None:
            self.late += 1
            return
        future, started = waiting
        try:
            message = decode(delivered.body, content_type=properties.content_type)
        except DecodeError as exc:
            if not future.done():
                future.set_exception(BenchError(f"undecodable result for saga {key}: {exc}"))
            return
        if not isinstance(message, SagaFinished) or future.done():
            return
        steps, messages = analyse_history(message.history)
        if self.on_result is not None:
            self.on_result(message, received_wall - (received - started), received_wall)
        future.set_result(
            Sample(message.status.value, received - started, steps, messages, message.reason)
        )

    def order(self, index: int, declined: bool) -> PlaceOrder:
        return PlaceOrder(
            saga_id=uuid4(),
            customer_id=f"bench-c-{index % 100}",
            sku=self.sku,
            quantity=1,
            amount=DECLINED_AMOUNT if declined else OK_AMOUNT,
        )

    async def run_saga(self, request: PlaceOrder) -> Sample:
        """Place ``request`` and wait for its result: a Sample, TIMED_OUT after the timeout."""
        if self.lost is not None:
            raise BenchError(f"lost the connection to RabbitMQ: {self.lost}")
        assert self._publisher is not None, "open() first"
        future: asyncio.Future[Sample] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self.pending[request.saga_id] = (future, started)
        try:
            await self._publisher.publish(
                topology.REQUESTS_EXCHANGE,
                request,
                topology.REQUEST_ROUTING_KEY,
                reply_to=self._reply_to,
            )
        except PublishFailedError as exc:
            self.pending.pop(request.saga_id, None)
            raise BenchError(
                f"the broker did not take the request ({exc}): is the orchestrator's "
                f"{topology.REQUESTS_QUEUE} queue declared on this vhost?"
            ) from exc
        try:
            async with asyncio.timeout(self.timeout):  # no extra task per saga, unlike wait_for
                return await future
        except TimeoutError:
            self.pending.pop(request.saga_id, None)
            return Sample(TIMED_OUT)


def declined_at(index: int, ratio: float) -> bool:
    """Exactly ``ratio`` of any prefix of orders is declined, spread evenly."""
    return math.floor((index + 1) * ratio) > math.floor(index * ratio)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()
        self.started = time.perf_counter()
        self._shown = 0.0

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.enabled and (now - self._shown > 0.1 or self.done == self.total):
            self._shown = now
            width = 30
            filled = int(width * self.done / self.total)
            rate = self.done / max(now - self.started, 1e-9)
            sys.stderr.write(
                f"\r{self.label:<8} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total}  {rate:7.1f} sagas/s "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


async def closed_loop(
    client: SagaClient, count: int, concurrency: int, ratio: float, progress: Progress
) -> list[Sample]:
    samples: list[Sample] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index, next_index = next_index, next_index + 1
            samples.append(await client.run_saga(client.order(index, declined_at(index, ratio))))
            progress.step()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return samples


async def open_loop(
    client: SagaClient, rate: float, duration: float, ratio: float, progress: Progress
) -> tuple[list[Sample], float, int]:
    """Start sagas on a fixed schedule, whatever is still running.

    Returns the samples, the largest delay of a start behind its schedule, and the most
    sagas in flight at once.
    """
    total = max(1, round(rate * duration))
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []
    in_flight = max_in_flight = 0
    start = time.perf_counter()
    max_lag = 0.0

    async def one(index: int) -> None:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            samples.append(await client.run_saga(client.order(index, declined_at(index, ratio))))
        finally:
            in_flight -= 1
        progress.step()

    try:
        for index in range(total):
            due = start + index / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            max_lag = max(max_lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return samples, max_lag, max_in_flight


# --- the raw broker rate -----------------------------------------------------------------


async def measure_raw(
    url: str, count: int, seconds: float, window: int, size: int, prefetch: int, timeout: float
) -> dict[str, Any]:
    """Persistent, confirmed publishes and acked consumes through one durable queue.

    Publishes ``count`` messages, or as many as go out in ``seconds``, whichever is fewer,
    while consuming them; the rate is messages over first publish to last delivery.
    """
    connection = await connect(url, "bench:raw")
    async with connection:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        name = f"bench.raw.{uuid4().hex[:12]}"
        # Durable like ours; and gone by itself two minutes after use if we cannot delete it.
        queue = await consume_channel.declare_queue(
            name, durable=True, arguments={"x-expires": 120_000}
        )
        try:
            received = 0
            expected = count
            all_in = asyncio.Event()

            async def on_message(incoming: AbstractIncomingMessage) -> None:
                nonlocal received
                await incoming.ack()
                received += 1
                if received >= expected:
                    all_in.set()

            body = b"x" * size
            slots = asyncio.Semaphore(window)
            in_flight: set[asyncio.Task[None]] = set()
            failures: list[BaseException] = []

            async def one(index: int) -> None:
                try:
                    await publish_channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=str(index),
                            content_type="application/octet-stream",
                        ),
                        routing_key=name,
                        mandatory=True,
                    )
                except BROKER_ERRORS as exc:
                    failures.append(exc)
                finally:
                    slots.release()

            tag = await queue.consume(on_message)
            started = time.perf_counter()
            published = 0
            while published < count and time.perf_counter() - started < seconds:
                await slots.acquire()
                task = asyncio.create_task(one(published))
                published += 1
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if failures:
                    break
            expected = published
            if received >= expected:
                all_in.set()
            if in_flight:
                await asyncio.gather(*in_flight)
            if failures:
                raise BenchError(f"raw publish failed: {failures[0]!r}")
            confirmed = time.perf_counter()
            try:
                await asyncio.wait_for(all_in.wait(), timeout)
            except TimeoutError as exc:
                raise BenchError(
                    f"raw: only {received} of {published} messages came back within {timeout:g}s"
                ) from exc
            finished = time.perf_counter()
            await queue.cancel(tag)
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                cleanup = await connection.channel()
                await cleanup.queue_delete(name)
    elapsed = finished - started
    return {
        "messages": published,
        "window": window,
        "prefetch": prefetch,
        "body_bytes": size,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(published / elapsed, 1),
        "publish_confirmed_per_s": round(published / (confirmed - started), 1),
    }


# --- one run -----------------------------------------------------------------------------


async def preflight(connection: AbstractConnection, url: str, starting: bool) -> None:
    """Fail early and clearly when the stack is not there (or, with --start-stack, is)."""
    consumers = {
        name: await queue_consumers(connection, queue) for name, queue in SERVICE_QUEUES.items()
    }
    if starting:
        busy = [n for n, c in consumers.items() if c]
        if busy:
            raise BenchError(
                f"{', '.join(busy)} already consume(s) on {redact(url)}: a stack is running "
                "there. Drop --start-stack to bench it, or use another vhost."
            )
        return
    if consumers["orchestrator"] is None:
        raise BenchError(
            f"no {topology.REQUESTS_QUEUE} queue on {redact(url)}: the orchestrator has never "
            "run on this vhost. Start the stack (see README), or use --start-stack."
        )
    idle = [n for n, c in consumers.items() if not c]
    if idle:
        raise BenchError(
            f"nobody consumes the queue(s) of {', '.join(idle)} on {redact(url)}: is the "
            f"{'orchestrator' if 'orchestrator' in idle else 'participant'} running? "
            "(or use --start-stack)"
        )


async def wait_ready(connection: AbstractConnection, stack: Stack) -> float:
    """Until each service consumes its queue (they log their ready line at INFO only)."""
    started = time.perf_counter()
    deadline = started + READY_TIMEOUT_S
    waiting = dict(SERVICE_QUEUES)
    while waiting:
        stack.check_alive()
        for name, queue in list(waiting.items()):
            if await queue_consumers(connection, queue):
                del waiting[name]
        if waiting:
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{', '.join(waiting)} did not start consuming within {READY_TIMEOUT_S:g}s:\n"
                    + "\n".join(stack.log_tail(n) for n in waiting)
                )
            await asyncio.sleep(0.1)
    return time.perf_counter() - started


@dataclass
class Watch:
    """Samples the orchestrator's RSS while the bench runs; reads CPU time around it."""

    pids: dict[str, int]
    progress: Progress
    trace_every_s: float = 5.0
    rss_max: int = 0
    trace: list[tuple[float, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def cpu(self) -> dict[str, float | None]:
        times: dict[str, float | None] = {n: cpu_seconds(p) for n, p in self.pids.items()}
        times["bench"] = time.process_time()
        return times

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        pid = self.pids.get("orchestrator")
        started = time.perf_counter()
        next_trace = started
        while pid is not None:
            rss = rss_kib(pid) or 0
            self.rss_max = max(self.rss_max, rss)
            now = time.perf_counter()
            if now >= next_trace:
                self.trace.append((round(now - started, 1), rss, self.progress.done))
                next_trace += self.trace_every_s
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def bench(args: argparse.Namespace, url: str, stack: Stack | None) -> dict[str, Any]:
    connection = await connect(url, "bench")
    async with connection:
        result: dict[str, Any] = {
            "label": args.label,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": params_of(args),
            "machine": {**machine_info(), **server_info(connection)},
            "source": source_info(),
        }
        await preflight(connection, url, stack is not None)
        pids: dict[str, int] = {}
        rss: dict[str, int | None] = {}
        if stack is not None:
            stack.start()
            assert stack.data_dir is not None
            pids = stack.pids()
            result["machine"]["data_dir_fs"] = filesystem_of(stack.data_dir)
            result["stack_ready_s"] = round(await wait_ready(connection, stack), 2)
            rss["start"] = rss_kib(pids["orchestrator"])
            status(args, f"stack ready: {pids} data in {stack.data_dir}")
        broker = local_broker_pid(url)
        if broker is not None:
            pids["rabbitmq"] = broker

        client = SagaClient(connection, args.timeout, args.sku)
        await client.open()
        if args.warmup:
            await warm_up(client, args, stack)
        if stack is not None:
            rss["after_warmup"] = rss_kib(pids["orchestrator"])

        total = args.count if args.rate is None else max(1, round(args.rate * args.duration))
        progress = Progress("measure", total)
        watch = Watch(pids, progress)
        watch.start()
        cpu_before = watch.cpu()
        ticks_before = machine_ticks()
        load_before = loadavg()
        started = time.perf_counter()
        if args.rate is not None:
            samples, lag, in_flight = await open_loop(
                client, args.rate, args.duration, args.decline_ratio, progress
            )
            result["open_loop"] = {
                "scheduled": len(samples),
                "max_start_lag_ms": round(lag * 1000, 2),
                "max_in_flight": in_flight,
            }
        else:
            samples = await closed_loop(
                client, args.count, args.concurrency, args.decline_ratio, progress
            )
        elapsed = time.perf_counter() - started
        cpu_after = watch.cpu()
        ticks_after = machine_ticks()
        watch.stop()
        progress.close()
        if stack is not None:
            stack.check_alive()
            rss["end"] = rss_kib(pids["orchestrator"])
            rss["max"] = max(watch.rss_max, rss["end"] or 0)
            result["orchestrator_rss_kib"] = rss
            result["orchestrator_rss_trace"] = {
                "columns": ["seconds", "rss_kib", "sagas_finished"],
                "rows": watch.trace,
            }
        result.update(summarise(samples, elapsed))
        result["late_results"] = client.late
        used = {
            name: after - before
            for name, after in cpu_after.items()
            if after is not None and (before := cpu_before.get(name)) is not None
        }
        result["cpu_cores"] = {name: round(cpu / elapsed, 3) for name, cpu in used.items()}
        result["machine_load"] = {
            "loadavg_start": load_before,
            **machine_load(ticks_before, ticks_after, elapsed, result["cpu_cores"]),
        }
        if result["finished"]:
            result["cpu_ms_per_saga"] = {
                name: round(cpu * 1000 / result["finished"], 2) for name, cpu in used.items()
            }
        if args.breakdown:
            result["breakdown"] = await measure_breakdown(args, url, client)
        if args.raw:
            status(
                args, f"raw broker rate: up to {args.raw_count} messages or {args.raw_seconds:g}s"
            )
            raw_pids = {"bench": os.getpid(), **({"rabbitmq": broker} if broker else {})}
            raw_before = {name: cpu_seconds(pid) for name, pid in raw_pids.items()}
            raw = await measure_raw(
                url,
                args.raw_count,
                args.raw_seconds,
                args.raw_window,
                args.raw_size,
                args.raw_prefetch,
                max(args.timeout, 60.0),
            )
            raw["cpu_us_per_message"] = {
                name: round((after - start) * 1e6 / raw["messages"], 1)
                for name, pid in raw_pids.items()
                if (after := cpu_seconds(pid)) is not None
                and (start := raw_before.get(name)) is not None
            }
            result["raw"] = raw
            per_saga = result["messages_per_saga"] or 0.0
            result["ratio"] = round(result["finished_per_s"] * per_saga / raw["messages_per_s"], 3)
        if args.limit:
            limit = result["limit"] = await measure_limit(args, url, broker)
            rate = limit["finished_per_s"]
            result["limit_ratio"] = round(result["finished_per_s"] / rate, 3) if rate else None
    return result


async def measure_breakdown(
    args: argparse.Namespace, url: str, client: SagaClient
) -> dict[str, Any]:
    """--breakdown: more sagas (none declined), timed hop by hop; see bench_breakdown."""
    status(args, f"breakdown: {args.breakdown_count} sagas at concurrency {args.concurrency}")
    tap = bench_breakdown.Tap(url)
    progress = Progress("breakdown", args.breakdown_count)
    try:
        await tap.open()
        client.on_result = tap.on_result
        samples = await closed_loop(client, args.breakdown_count, args.concurrency, 0.0, progress)
        await asyncio.sleep(0.2)  # the tap's copies were routed before the results; to be sure
    finally:
        client.on_result = None
        progress.close()
        await tap.close()
    breakdown = bench_breakdown.report(
        tap.collected(), lambda seconds: summary_ms(seconds, (50, 90)), args.concurrency
    )
    breakdown["timed_out"] = sum(s.outcome == TIMED_OUT for s in samples)
    return breakdown


async def measure_limit(args: argparse.Namespace, url: str, broker: int | None) -> dict[str, Any]:
    """--limit: the message-shape limit on this machine and broker; see bench_limit."""
    count = min(args.count, bench_limit.COUNT_CAP)
    status(args, f"message-shape limit: {count} sagas at concurrency {args.concurrency}")
    try:
        run = await bench_limit.measure_limit(
            url,
            count=count,
            concurrency=args.concurrency,
            warmup=args.warmup,
            timeout=args.timeout,
            prefetch=int(BrokerSettings.model_fields["prefetch"].default),  # as --start-stack
            cpu=cpu_seconds,
            other_pids={"rabbitmq": broker} if broker is not None else {},
        )
    except bench_limit.LimitError as exc:
        raise BenchError(f"--limit: {exc}") from exc
    return run.result(summary_ms)


async def warm_up(client: SagaClient, args: argparse.Namespace, stack: Stack | None) -> None:
    """A first saga alone (a clear error if nothing answers), then the rest of the warm-up."""
    progress = Progress("warm-up", args.warmup)
    first = await client.run_saga(client.order(0, False))
    progress.step()
    if first.outcome == TIMED_OUT:
        progress.close()
        if stack is not None:
            stack.check_alive()
        raise BenchError(
            f"no result within {args.timeout:g}s for the first saga: is the orchestrator "
            "running, and are the participants? (python -m orchestrator list shows its sagas)"
        )
    concurrency = args.concurrency if args.rate is None else 16
    samples = (
        await closed_loop(client, args.warmup - 1, concurrency, args.decline_ratio, progress)
        if args.warmup > 1
        else []
    )
    progress.close()
    timed_out = sum(s.outcome == TIMED_OUT for s in samples)
    if timed_out:
        raise BenchError(f"{timed_out} warm-up saga(s) got no result within {args.timeout:g}s")


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


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": "open" if args.rate is not None else "closed",
        "warmup": args.warmup,
        "decline_ratio": args.decline_ratio,
        "timeout_s": args.timeout,
        "start_stack": args.start_stack,
        "sku": args.sku,
    }
    if args.rate is not None:
        params.update(rate=args.rate, duration_s=args.duration)
    else:
        params.update(count=args.count, concurrency=args.concurrency)
    if args.raw:
        params.update(
            raw_count=args.raw_count,
            raw_seconds=args.raw_seconds,
            raw_window=args.raw_window,
            raw_size=args.raw_size,
            raw_prefetch=args.raw_prefetch,
        )
    if args.breakdown:
        params.update(breakdown_count=args.breakdown_count)
    if args.limit:
        params.update(limit_count=min(args.count, bench_limit.COUNT_CAP))
    return params


def status(args: argparse.Namespace, text: str) -> None:
    """A line on stderr about what the bench is doing (stdout is for the result)."""
    print(f"bench: {text}", file=sys.stderr)


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
        Stack(url, args.sku, args.stock, args.data_dir, args.keep_data)
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

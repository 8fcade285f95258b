"""One bench run: preflight, the stack ready, warm-up, the measured load and its extras."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from aio_pika.abc import AbstractConnection

from messages.contract import topology
from messages.plumbing.amqp import redact
from messages.plumbing.settings import BrokerSettings
from scripts import bench_breakdown, bench_limit
from scripts.harness.bench_client import (
    Progress,
    SagaClient,
    closed_loop,
    connect,
    open_loop,
    queue_consumers,
    server_info,
)
from scripts.harness.bench_common import (
    READY_TIMEOUT_S,
    SERVICE_QUEUES,
    TIMED_OUT,
    BenchError,
    summary_ms,
)
from scripts.harness.bench_raw import (
    measure_raw,
)
from scripts.harness.bench_report import (
    summarise,
)
from scripts.harness.bench_stack import BenchStack, role
from scripts.harness.measure import (
    Watch,
    cpu_seconds,
    filesystem_of,
    loadavg,
    local_broker_pid,
    machine_info,
    machine_load,
    machine_ticks,
    rss_kib,
    source_info,
)

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


async def wait_ready(connection: AbstractConnection, stack: BenchStack) -> float:
    """Until each service consumes its queue (they log their ready line at INFO only)."""
    started = time.perf_counter()
    deadline = started + READY_TIMEOUT_S
    waiting = dict(SERVICE_QUEUES)
    # Every replica consumes: several orchestrators share the requests queue, and so on.
    wanted = {n: stack.orchestrators if n == "orchestrator" else stack.replicas for n in waiting}
    while waiting:
        stack.check_alive()
        for name, queue in list(waiting.items()):
            if (await queue_consumers(connection, queue) or 0) >= wanted[name]:
                del waiting[name]
        if waiting:
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{', '.join(waiting)} did not start consuming within {READY_TIMEOUT_S:g}s:\n"
                    + "\n".join(stack.log_tail(n) for n in waiting)
                )
            await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def bench(args: argparse.Namespace, url: str, stack: BenchStack | None) -> dict[str, Any]:
    """One bench run; ``url`` may list a cluster's nodes, which the started stack is given."""
    nodes = url.split(",")
    url = nodes[0]  # the bench's own clients talk to the first node; the cluster does the rest
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
            first = pids.get("orchestrator", pids.get("orchestrator-1", 0))
            rss["start"] = rss_kib(first)
            status(args, f"stack ready: {pids} data in {stack.data_dir}")
        # One local node's CPU; a cluster's is spread over nodes this does not attribute.
        broker = local_broker_pid(url) if len(nodes) == 1 else None
        if broker is not None:
            pids["rabbitmq"] = broker

        client = SagaClient(connection, args.timeout, args.sku)
        await client.open()
        if args.warmup:
            await warm_up(client, args, stack)
        if stack is not None:
            rss["after_warmup"] = rss_kib(first)

        total = args.count if args.rate is None else max(1, round(args.rate * args.duration))
        progress = Progress("measure", total)
        watch = Watch(pids, progress, postgres=bool(stack and stack.postgres_url))
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
            rss["end"] = rss_kib(first)
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
        if len(used) > len({role(name) for name in used}):  # replicas: each, then by role
            finished = max(1, result["finished"])
            result["cpu_ms_per_saga_by_process"] = {
                name: round(cpu * 1000 / finished, 2) for name, cpu in used.items()
            }
            by_role: dict[str, float] = {}
            for name, cpu in used.items():
                by_role[role(name)] = by_role.get(role(name), 0.0) + cpu
            used = by_role
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


async def warm_up(client: SagaClient, args: argparse.Namespace, stack: BenchStack | None) -> None:
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


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": "open" if args.rate is not None else "closed",
        "warmup": args.warmup,
        "decline_ratio": args.decline_ratio,
        "timeout_s": args.timeout,
        "start_stack": args.start_stack,
        "orchestrators": args.orchestrators,
        "replicas": args.replicas,
        "store": "postgresql" if args.postgres_url else "sqlite",
        "queue_type": args.queue_type,
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

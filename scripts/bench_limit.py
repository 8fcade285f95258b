#!/usr/bin/env python3
"""The message-shape limit: a saga's 8 messages through pass-through processes, nothing else.

bench.py --limit measures, on the same machine and broker as the saga run, how fast the
saga's message shape alone goes: a client, a pass-through "orchestrator" and three
pass-through "participants", each a plain aiormq client on uvloop with no state, no SQLite
and no validation. Per saga, as in the stack:

    client --request--> orchestrator --command 1--> inventory --reply--> orchestrator
      --command 2--> payment --reply--> orchestrator --command 3--> order --reply-->
      orchestrator --result--> the client's reply_to

8 messages, each persistent (delivery_mode 2) and published with publisher confirms; each
consumer acks its delivery only once its outgoing publish is confirmed; prefetch as the
services' (SAGA_PREFETCH's default). The bodies are JSON of the size of the stack's
messages, never parsed; the step and the client's reply_to travel in headers. The queues
(limit.<run>.requests, .replies, .inventory, .payment, .order) are durable, on the bench's
vhost, published to through the default exchange, and deleted at the end.

The processes are started by bench.py (``measure_limit``); by hand, one role each:

    BENCH_LIMIT_URL=amqp://guest:guest@localhost:5672/bench \\
        python scripts/bench_limit.py orchestrator --prefix limit.test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiormq
import aiormq.abc
from pamqp import commands as spec

# Run as `python scripts/bench_limit.py ROLE` (a pass-through process), scripts/ is on the path,
# not the checkout that holds the harness.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness.processes import Process, Processes

PARTICIPANTS = ("inventory", "payment", "order")
COMMAND_TYPES = ("ReserveStock", "ChargePayment", "CompleteOrder")  # message_type, as the stack's
ROLES = ("orchestrator", *PARTICIPANTS)
URL_ENV = "BENCH_LIMIT_URL"  # the URL goes by environment: no password in `ps`
PERSISTENT = 2
STEP_HEADER = "x-limit-step"
REQUESTER_HEADER = "x-limit-reply-to"
READY_TIMEOUT_S = 30.0
COUNT_CAP = 3000  # the limit runs min(--count, COUNT_CAP) sagas
QUEUE_EXPIRES_MS = 120_000  # gone by themselves if the bench dies before deleting them


class LimitError(Exception):
    """Raised with a message for the user."""


def _body(kind: str, size: int) -> bytes:
    """JSON of ``size`` bytes that looks like one of our messages (nobody parses it)."""
    head = {
        "message_id": str(uuid4()),
        "saga_id": str(uuid4()),
        "schema_version": 1,
        "created_at": "2026-11-28T12:00:00.000000Z",
        "type": kind,
    }
    empty = len(json.dumps({**head, "detail": ""}))
    return json.dumps({**head, "detail": "x" * max(0, size - empty)}).encode()


# The sizes of the stack's JSON bodies: PlaceOrder, ReserveStock, CommandSucceeded, and the
# SagaFinished of a completed saga with its 8 history entries.
REQUEST = _body("PlaceOrder", 290)
COMMAND = _body("ReserveStock", 220)
REPLY = _body("CommandSucceeded", 330)
RESULT = _body("SagaFinished", 1350)
BODY_BYTES = {
    "request": len(REQUEST),
    "command": len(COMMAND),
    "reply": len(REPLY),
    "result": len(RESULT),
}


@dataclass(frozen=True)
class Names:
    """The queues of one limit run."""

    prefix: str

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    def participant(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def consumed(self) -> dict[str, list[str]]:
        """The queues each role consumes."""
        return {
            "orchestrator": [self.requests, self.replies],
            **{p: [self.participant(p)] for p in PARTICIPANTS},
        }


# --- the pass-through processes ----------------------------------------------------------


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _send(
    channel: aiormq.abc.AbstractChannel,
    routing_key: str,
    body: bytes,
    kind: str,
    correlation_id: str | None,
    headers: dict[str, Any] | None = None,
    *,
    mandatory: bool = True,
) -> None:
    """Publish persistent through the default exchange and wait for the broker's confirm."""
    confirm = await channel.basic_publish(
        body,
        routing_key=routing_key,
        mandatory=mandatory,
        properties=spec.Basic.Properties(
            content_type="application/json",
            message_type=kind,
            correlation_id=correlation_id,
            delivery_mode=PERSISTENT,
            headers=headers,
        ),
    )
    if not isinstance(confirm, spec.Basic.Ack):
        raise LimitError(f"the broker did not confirm {kind} to {routing_key}: {confirm!r}")


Handler = Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]


def handlers(role: str, names: Names, publish: aiormq.abc.AbstractChannel) -> dict[str, Handler]:
    """The consumers of ``role``, by queue. Each acks once its publish is confirmed."""

    async def ack(message: aiormq.abc.DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        await message.channel.basic_ack(message.delivery_tag)

    async def on_request(message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        headers = {STEP_HEADER: 0, REQUESTER_HEADER: props.reply_to or ""}
        first = names.participant(PARTICIPANTS[0])
        await _send(publish, first, COMMAND, COMMAND_TYPES[0], props.correlation_id, headers)
        await ack(message)

    async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        headers = props.headers or {}
        step = int(_text(headers[STEP_HEADER])) + 1
        requester = _text(headers[REQUESTER_HEADER])
        if step < len(PARTICIPANTS):
            headers = {STEP_HEADER: step, REQUESTER_HEADER: requester}
            to = names.participant(PARTICIPANTS[step])
            kind = COMMAND_TYPES[step]
            await _send(publish, to, COMMAND, kind, props.correlation_id, headers)
        else:  # like the stack's result: the requester may have gone, so not mandatory
            await _send(
                publish, requester, RESULT, "SagaFinished", props.correlation_id, mandatory=False
            )
        await ack(message)

    async def on_command(message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        await _send(
            publish, names.replies, REPLY, "CommandSucceeded", props.correlation_id, props.headers
        )
        await ack(message)

    if role == "orchestrator":
        return {names.requests: on_request, names.replies: on_reply}
    return {names.participant(role): on_command}


async def serve(role: str, url: str, names: Names, prefetch: int) -> int:
    """Pass messages on until SIGTERM/SIGINT (0), or until something fails (1)."""
    stop = asyncio.Event()
    failures: list[BaseException] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def guarded(handler: Handler) -> Handler:
        async def run(message: aiormq.abc.DeliveredMessage) -> None:
            try:
                await handler(message)
            except Exception as exc:  # any failure ends the process, loudly
                failures.append(exc)
                stop.set()

        return run

    async with aiormq.connect(
        url, client_properties={"connection_name": f"bench-limit:{role}"}
    ) as connection:
        publish = await connection.channel(publisher_confirms=True)
        consume = await connection.channel(publisher_confirms=False)
        await consume.basic_qos(prefetch_count=prefetch)
        for queue, handler in handlers(role, names, publish).items():
            await consume.basic_consume(queue, guarded(handler))
        closing = connection.closing
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((closing, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if closing.done() and not stop.is_set():
            why = "" if closing.cancelled() else f": {closing.exception()!r}"
            failures.append(ConnectionError(f"the connection closed{why}"))
        closing.cancel()
    for exc in failures[:3]:
        print(f"bench_limit {role}: {exc!r}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("url", nargs="?", help=f"RabbitMQ URL (default: ${URL_ENV})")
    parser.add_argument("--prefix", required=True, help="queue names' prefix, e.g. limit.ab12")
    parser.add_argument("--prefetch", type=int, default=64, help="unacked deliveries")
    args = parser.parse_args(argv)
    url = args.url or os.environ.get(URL_ENV)
    if not url:
        parser.error(f"give the URL, or set {URL_ENV}")
    import uvloop  # only the pass-through processes run on uvloop

    return uvloop.run(serve(args.role, url, Names(args.prefix), args.prefetch))


# --- driving it from bench.py ------------------------------------------------------------


@dataclass
class PassThrough:
    """The four pass-through processes and their queues."""

    url: str
    names: Names
    prefetch: int
    log_dir: Path | None = None
    children: Processes = field(default_factory=Processes)

    async def declare(self, channel: aiormq.abc.AbstractChannel) -> None:
        for queue in (self.names.requests, self.names.replies, *self._participant_queues()):
            await channel.queue_declare(
                queue, durable=True, arguments={"x-expires": QUEUE_EXPIRES_MS}
            )

    def _participant_queues(self) -> list[str]:
        return [self.names.participant(p) for p in PARTICIPANTS]

    def start(self) -> None:
        env = {**os.environ, URL_ENV: self.url, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir = Path(tempfile.mkdtemp(prefix="saga-bench-limit-"))
        for role in ROLES:
            options = ("--prefix", self.names.prefix, "--prefetch", str(self.prefetch))
            argv = (sys.executable, str(Path(__file__).resolve()), role, *options)
            log = log_dir / f"{role}.log"
            child = Process(role, argv, env, log, own_session=True, die_with_parent=True)
            self.children.add(child.start())

    def pids(self) -> dict[str, int]:
        return self.children.pids()

    def check_alive(self) -> None:
        exited = self.children.exited()
        if exited is not None:
            role, code = exited
            raise LimitError(
                f"the pass-through {role} exited with code {code}:\n" + self.log_tail(role)
            )

    def log_tail(self, role: str, lines: int = 10) -> str:
        return self.children.log_tail(role, lines)

    async def wait_ready(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Until every queue has its consumer."""
        deadline = time.perf_counter() + READY_TIMEOUT_S
        waiting = [q for queues in self.names.consumed().values() for q in queues]
        while waiting:
            self.check_alive()
            for queue in list(waiting):
                ok = await channel.queue_declare(queue, passive=True)
                if ok is not None and ok.consumer_count:
                    waiting.remove(queue)
            if waiting:
                if time.perf_counter() > deadline:
                    raise LimitError(
                        f"nobody consumed {', '.join(waiting)} within {READY_TIMEOUT_S:g}s"
                    )
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent. The logs go with them."""
        self.children.stop(5)
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    async def delete_queues(self, connection: aiormq.abc.AbstractConnection) -> None:
        channel = await connection.channel()
        for queue in (self.names.requests, self.names.replies, *self._participant_queues()):
            await channel.queue_delete(queue)
        await channel.close()

    def delete_queues_aside(self, timeout: float = 10.0) -> None:
        """Delete the queues from a thread with a loop and a connection of its own.

        For when this loop cannot: SIGTERM (a KeyboardInterrupt in bench.py) cancels every
        task, the connection's own included. Failing that, x-expires removes them.
        """

        async def delete() -> None:
            async with aiormq.connect(
                self.url, client_properties={"connection_name": "bench-limit:cleanup"}
            ) as connection:
                await self.delete_queues(connection)

        def run() -> None:
            with contextlib.suppress(Exception):
                asyncio.run(asyncio.wait_for(delete(), timeout))

        thread = threading.Thread(target=run, name="bench-limit-cleanup", daemon=True)
        thread.start()
        thread.join(timeout + 1)


class LimitClient:
    """Places pass-through "orders" and matches each result by correlation id."""

    def __init__(
        self, connection: aiormq.abc.AbstractConnection, requests: str, timeout: float
    ) -> None:
        self.connection = connection
        self.requests = requests
        self.timeout = timeout
        self.pending: dict[str, tuple[asyncio.Future[float], float]] = {}
        self.late = 0
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._reply_to = ""

    async def open(self) -> None:
        self._channel = await self.connection.channel(publisher_confirms=True)
        replies = await self.connection.channel(publisher_confirms=False)
        declared = await replies.queue_declare("", exclusive=True, auto_delete=True)
        assert declared is not None and declared.queue is not None
        self._reply_to = declared.queue
        await replies.basic_consume(self._reply_to, self._on_result, no_ack=True)

    async def _on_result(self, message: aiormq.abc.DeliveredMessage) -> None:
        received = time.perf_counter()
        waiting = self.pending.pop(message.header.properties.correlation_id or "", None)
        if waiting is None:
            self.late += 1
            return
        future, started = waiting
        if not future.done():
            future.set_result(received - started)

    async def run_saga(self) -> float | None:
        """One saga: its latency in seconds, None when no result came within the timeout."""
        assert self._channel is not None, "open() first"
        key = uuid4().hex
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pending[key] = (future, time.perf_counter())
        confirm = await self._channel.basic_publish(
            REQUEST,
            routing_key=self.requests,
            mandatory=True,
            properties=spec.Basic.Properties(
                content_type="application/json",
                message_type="PlaceOrder",
                correlation_id=key,
                reply_to=self._reply_to,
                delivery_mode=PERSISTENT,
            ),
        )
        if not isinstance(confirm, spec.Basic.Ack):
            self.pending.pop(key, None)
            raise LimitError(f"the broker did not confirm a request: {confirm!r}")
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self.pending.pop(key, None)
            return None

    async def closed_loop(self, count: int, concurrency: int) -> tuple[list[float], int]:
        """``count`` sagas, ``concurrency`` at once: the latencies, and how many timed out."""
        latencies: list[float] = []
        timed_out = 0
        left = count

        async def worker() -> None:
            nonlocal left, timed_out
            while left > 0:
                left -= 1
                latency = await self.run_saga()
                if latency is None:
                    timed_out += 1
                else:
                    latencies.append(latency)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
        return latencies, timed_out


@dataclass
class LimitRun:
    """What a limit measurement gave; bench.py turns it into result["limit"]."""

    count: int
    concurrency: int
    warmup: int
    prefetch: int
    latencies: list[float]
    timed_out: int
    elapsed: float
    cpu_s: dict[str, float]
    late: int

    def result(self, summarise: Callable[[Sequence[float]], dict[str, Any]]) -> dict[str, Any]:
        """result["limit"]; ``summarise`` is bench.py's summary_ms (percentiles in ms)."""
        finished = len(self.latencies)
        return {
            "count": self.count,
            "concurrency": self.concurrency,
            "warmup": self.warmup,
            "prefetch": self.prefetch,
            "finished": finished,
            "timed_out": self.timed_out,
            "elapsed_s": round(self.elapsed, 3),
            "finished_per_s": round(finished / self.elapsed, 1),
            "latency_ms": summarise(self.latencies),
            "cpu_ms_per_saga": {
                name: round(cpu * 1000 / finished, 2) for name, cpu in self.cpu_s.items()
            }
            if finished
            else {},
            "cpu_cores": {name: round(cpu / self.elapsed, 3) for name, cpu in self.cpu_s.items()},
            "messages_per_saga": 8,
            "body_bytes": BODY_BYTES,
            "late_results": self.late,
        }


async def measure_limit(
    url: str,
    *,
    count: int,
    concurrency: int,
    warmup: int,
    timeout: float,
    prefetch: int,
    cpu: Callable[[int], float | None],
    other_pids: dict[str, int],
) -> LimitRun:
    """Start the pass-through processes, run ``warmup`` then ``count`` sagas, clean up.

    ``cpu(pid)`` reads a process's CPU seconds; ``other_pids`` (e.g. the broker's) are
    measured too, and so is this process (as "bench"). The processes are stopped and the
    queues deleted however this ends, Ctrl-C included.
    """
    names = Names(f"limit.{uuid4().hex[:8]}")
    passthrough = PassThrough(url, names, prefetch)
    connection = await aiormq.connect(
        url, client_properties={"connection_name": "bench-limit:client"}
    )
    try:
        setup = await connection.channel()
        await passthrough.declare(setup)
        passthrough.start()
        await passthrough.wait_ready(setup)
        await setup.close()
        client = LimitClient(connection, names.requests, timeout)
        await client.open()
        if await client.run_saga() is None:  # alone first: a clear error if nothing answers
            passthrough.check_alive()
            raise LimitError(f"the pass-through stack gave no result within {timeout:g}s")
        if warmup > 1:
            await client.closed_loop(warmup - 1, concurrency)
        pids = {**passthrough.pids(), **other_pids}
        before = {name: cpu(pid) for name, pid in pids.items()}
        bench_before = time.process_time()
        started = time.perf_counter()
        latencies, timed_out = await client.closed_loop(count, concurrency)
        elapsed = time.perf_counter() - started
        used = {
            name: end - start
            for name, pid in pids.items()
            if (end := cpu(pid)) is not None and (start := before[name]) is not None
        }
        used["bench"] = time.process_time() - bench_before
        passthrough.check_alive()
        return LimitRun(
            count, concurrency, warmup, prefetch, latencies, timed_out, elapsed, used, client.late
        )
    finally:
        passthrough.stop()
        try:
            await asyncio.wait_for(passthrough.delete_queues(connection), 10)
        except Exception:
            passthrough.delete_queues_aside()
        except BaseException:  # cancelled (Ctrl-C): clean up all the same, then go on
            passthrough.delete_queues_aside()
            raise
        with contextlib.suppress(Exception):
            await connection.close()


def limit_lines(result: dict[str, Any]) -> list[str]:
    """The human output's lines about result["limit"] and result["limit_ratio"]."""
    limit = result.get("limit")
    if not limit:
        return []

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    latency = limit["latency_ms"]
    cpu = limit.get("cpu_ms_per_saga", {})
    lines = [
        f"limit       {limit['finished_per_s']:.1f} sagas/s, p50 {ms(latency['p50'])} ms  "
        f"p99 {ms(latency['p99'])} ms  (c={limit['concurrency']}, {limit['finished']} of "
        f"{limit['count']} sagas: the 8 persistent confirmed messages, pass-through processes)",
        "limit CPU   " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + " ms/saga",
    ]
    if result.get("limit_ratio") is not None:
        lines.append(
            f"vs limit    {result['finished_per_s']:.1f} / {limit['finished_per_s']:.1f} "
            f"sagas/s = {result['limit_ratio']:.3f} of the message-shape limit"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""The bench's client: places orders as place_order.py does and times each saga."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from yarl import URL

from messages.contract import topology
from messages.contract.codec import decode
from messages.contract.models import PlaceOrder, SagaFinished
from messages.errors import DecodeError, PublishFailedError
from messages.plumbing.amqp import Publisher, redact
from scripts.harness.bench_common import (
    CONNECT_TIMEOUT_S,
    DECLINED_AMOUNT,
    OK_AMOUNT,
    TIMED_OUT,
    BenchError,
    analyse_history,
)

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

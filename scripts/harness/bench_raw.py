"""The broker's raw rate: persistent, confirmed messages through one durable queue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from uuid import uuid4

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from messages.plumbing.amqp import BROKER_ERRORS
from scripts.harness.bench_client import (
    connect,
)
from scripts.harness.bench_common import (
    BenchError,
)

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

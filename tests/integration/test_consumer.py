"""The shared consumer on a real broker: poison messages end in the DLQ, never loop."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aio_pika.abc import AbstractIncomingMessage

from messages import amqp, topology
from messages.models import AnyMessage, Money, PlaceOrder
from messages.settings import BrokerSettings
from tests.integration.stack import amqp_channel, drain, send

pytestmark = pytest.mark.broker


def test_a_message_that_always_fails_is_dead_lettered_after_max_deliveries(amqp_url: str) -> None:
    settings = BrokerSettings(amqp_url=amqp_url, max_deliveries=3)
    calls: list[str] = []
    order = PlaceOrder(
        saga_id=uuid.uuid4(),
        customer_id="c-1",
        sku="item-1",
        quantity=1,
        amount=Money(amount="1.00"),
    )  # type: ignore[arg-type]

    async def always_fails(message: AnyMessage, incoming: AbstractIncomingMessage) -> None:
        calls.append(str(message.message_id))
        raise RuntimeError("the database is on fire")

    async def run() -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            channel = await connection.channel()
            exchanges = await amqp.declare_topology(channel)
            await amqp.consume(channel, topology.REQUESTS_QUEUE, exchanges, always_fails, settings)
            with amqp_channel(amqp_url) as publisher:
                send(publisher, topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY, order)
            for _ in range(100):  # until it is dead-lettered, or 10 s
                await asyncio.sleep(0.1)
                if len(calls) >= 3:
                    break
            await asyncio.sleep(0.5)  # a fourth delivery, if the bound were broken

    asyncio.run(run())

    assert calls == [str(order.message_id)] * 3
    with amqp_channel(amqp_url) as channel:
        dead = drain(channel, topology.dead_letter_queue(topology.REQUESTS_QUEUE), 1)
        assert (
            channel.queue_declare(topology.REQUESTS_QUEUE, passive=True).method.message_count == 0
        )
    ((props, body),) = dead
    assert props.headers[topology.REASON_HEADER] == "handler_error"
    assert "the database is on fire" in props.headers[topology.DETAIL_HEADER]
    assert props.headers[topology.DELIVERIES_HEADER] == 3
    assert props.message_id == str(order.message_id)
    assert body == order.model_dump_json().encode()

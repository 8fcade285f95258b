"""The shared consumer on a real broker: poison messages end in the DLQ, never loop."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from aio_pika.abc import AbstractConnection

from messages.contract import topology
from messages.contract.models import Envelope, Money, PlaceOrder
from messages.plumbing import amqp
from messages.plumbing.settings import BrokerSettings
from tests.integration.stack import amqp_channel, drain, send

pytestmark = pytest.mark.broker


def an_order() -> PlaceOrder:
    return PlaceOrder(
        saga_id=uuid.uuid4(),
        customer_id="c-1",
        sku="item-1",
        quantity=1,
        amount=Money(amount=Decimal("1.00")),
    )


async def consume_requests(
    connection: AbstractConnection, settings: BrokerSettings, handler: amqp.Handler
) -> None:
    """Declare the topology and consume the requests queue with ``handler``."""
    channel = await connection.channel(publisher_confirms=True)
    await amqp.declare_topology(channel, settings)
    publisher = await amqp.Publisher.on(channel)
    consuming = await (await connection.channel()).get_underlay_channel()
    await amqp.consume(consuming, topology.REQUESTS_QUEUE, publisher, handler, settings)


def test_a_message_that_always_fails_is_dead_lettered_after_max_deliveries(amqp_url: str) -> None:
    settings = BrokerSettings(amqp_url=amqp_url, max_deliveries=3)
    calls: list[str] = []
    order = an_order()

    async def always_fails(message: Envelope, delivery: amqp.Delivery) -> None:
        calls.append(str(message.message_id))
        raise RuntimeError("the database is on fire")

    async def run() -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            await consume_requests(connection, settings, always_fails)
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


def test_a_message_still_being_handled_is_never_acked_by_a_later_ones_ack(amqp_url: str) -> None:
    """Acks go several at once (multiple=True), but never past a delivery still in hand.

    The first order's handler never finishes; the four after it do. When the consumer goes
    away, the first one must still be on the queue (a later ack that covered it would have
    lost an order), and only the first: the others were acked, though behind it.
    """
    settings = BrokerSettings(amqp_url=amqp_url)
    orders = [an_order() for _ in range(5)]
    handled: list[str] = []

    async def first_one_hangs(message: Envelope, delivery: amqp.Delivery) -> None:
        if message.message_id == orders[0].message_id:
            await asyncio.Event().wait()  # until the connection closes under it
        handled.append(str(message.message_id))

    async def run() -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            await consume_requests(connection, settings, first_one_hangs)
            with amqp_channel(amqp_url) as sender:
                for order in orders:
                    send(sender, topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY, order)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if len(handled) == 4:
                    break
            await asyncio.sleep(0.3)  # time for any (wrong) ack to reach the broker

    asyncio.run(run())

    assert len(handled) == 4
    with amqp_channel(amqp_url) as channel:
        back = drain(channel, topology.REQUESTS_QUEUE, len(orders), timeout=1)
    assert [props.message_id for props, _ in back] == [str(orders[0].message_id)]

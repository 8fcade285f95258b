"""SAGA_QUEUE_TYPE=quorum on a real broker: the broker counts deliveries and dead-letters.

RabbitMQ 3.10 runs quorum queues on a single node, so these use the shared broker, each in
its own vhost; the cluster test (test_cluster.py) runs them replicated on three nodes.
"""

from __future__ import annotations

import asyncio

import pytest

from messages.contract import topology
from messages.contract.models import Envelope
from messages.errors import ConfigurationError
from messages.plumbing import amqp
from messages.plumbing.settings import BrokerSettings
from tests.integration.stack import Stack, amqp_channel, drain, send
from tests.integration.test_consumer import an_order, consume_requests
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker

QUORUM = {"SAGA_QUEUE_TYPE": "quorum"}


def test_a_poison_message_is_dead_lettered_by_the_broker_after_max_deliveries(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = BrokerSettings(amqp_url=amqp_url, max_deliveries=3, queue_type="quorum")
    calls: list[int] = []
    order = an_order()

    async def always_fails(message: Envelope, delivery: amqp.Delivery) -> None:
        calls.append(delivery.tag)
        raise RuntimeError("the database is on fire")

    async def run() -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            await consume_requests(connection, settings, always_fails)
            with amqp_channel(amqp_url) as publisher:
                send(publisher, topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY, order)
            for _ in range(100):  # until the third delivery, or 10 s
                await asyncio.sleep(0.1)
                if len(calls) >= 3:
                    break
            await asyncio.sleep(1.0)  # a fourth delivery, if the broker's limit were not set

    asyncio.run(run())

    # Then it was delivered exactly max_deliveries times, and the broker moved it to its DLQ
    assert len(calls) == 3
    with amqp_channel(amqp_url) as channel:
        dead = drain(channel, topology.dead_letter_queue(topology.REQUESTS_QUEUE), 1)
        assert (
            channel.queue_declare(topology.REQUESTS_QUEUE, passive=True).method.message_count == 0
        )
    ((props, body),) = dead
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert props.headers["x-first-death-queue"] == topology.REQUESTS_QUEUE
    assert props.message_id == str(order.message_id)
    assert body == order.model_dump_json().encode()
    # The service counted with the broker (x-delivery-count), and logged the error each time
    assert "(delivery 3 of 3): the broker dead-letters it now" in caplog.text
    assert caplog.text.count("the database is on fire") >= 3


def test_every_queue_is_declared_quorum_with_at_least_once_dead_lettering(amqp_url: str) -> None:
    settings = BrokerSettings(amqp_url=amqp_url, max_deliveries=4, queue_type="quorum")

    async def run() -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            await amqp.declare_topology(await connection.channel(), settings)

    asyncio.run(run())

    # Declaring the same again is a no-op (the broker checks every argument is equivalent)
    with amqp_channel(amqp_url) as channel:
        for queue, _, _ in topology.consumed_queues():
            arguments = amqp.queue_arguments(settings, queue)
            channel.queue_declare(queue, durable=True, arguments=arguments)
            assert arguments["x-queue-type"] == "quorum"
            assert arguments["x-delivery-limit"] == 3
            assert arguments["x-dead-letter-strategy"] == "at-least-once"
            channel.queue_declare(
                topology.dead_letter_queue(queue),
                durable=True,
                arguments=amqp.dead_letter_queue_arguments(settings),
            )


def test_quorum_on_classic_queues_is_refused_with_what_to_do(amqp_url: str) -> None:
    # Given the topology declared as today (classic queues)
    classic = BrokerSettings(amqp_url=amqp_url)
    quorum = BrokerSettings(amqp_url=amqp_url, queue_type="quorum")

    async def declare(settings: BrokerSettings) -> None:
        connection = await amqp.connect(settings, "test")
        async with connection:
            await amqp.declare_topology(await connection.channel(), settings)

    asyncio.run(declare(classic))

    # When a service starts with SAGA_QUEUE_TYPE=quorum, then it says what is wrong and why
    with pytest.raises(ConfigurationError) as refused:
        asyncio.run(declare(quorum))
    message = str(refused.value)
    assert "exists on the broker with other arguments than SAGA_QUEUE_TYPE=quorum" in message
    assert "SAGA_QUEUE_TYPE=classic" in message and "delete the queue" in message


def test_a_service_started_on_the_wrong_queue_type_exits_saying_so(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10")  # declares classic queues
    stack.stop_all()
    service = stack.start("orchestrator", "orchestrator", "run", ready=None, **QUORUM)
    assert service.wait(30) != 0
    assert "SAGA_QUEUE_TYPE=classic" in service.output(), service.output()


def test_a_saga_completes_on_quorum_queues(stack: Stack) -> None:
    stack.env.update(QUORUM)
    stack.worker("all", "--stock", "item-1=10,item-2=5")
    stack.orchestrator()

    code, result = stack.place_order(*ORDER, "--amount", "25.00")

    assert code == 0, result
    assert result["status"] == "COMPLETED"
    assert sent(result) == ["ReserveStock", "ChargePayment", "CompleteOrder"]
    # A classic declaration of a quorum queue is refused: the queue really is quorum.
    with (
        amqp_channel(stack.amqp_url) as channel,
        pytest.raises(Exception, match="PRECONDITION_FAILED"),
    ):
        channel.queue_declare(
            topology.REQUESTS_QUEUE,
            durable=True,
            arguments=amqp.queue_arguments(None, topology.REQUESTS_QUEUE),
        )

"""The hot path to the broker: publish with confirms, consume, ack, dead-letter.

Through aiormq directly, without aio-pika's message objects and its second task per
delivery: this is where every message of every saga passes, several times. aio-pika
(messages.plumbing.amqp) connects, opens the channels and declares the topology.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec
from pamqp.common import FieldValue

from messages.contract import topology
from messages.contract.codec import Wire, decode, encode
from messages.contract.models import MESSAGE_TYPES, Envelope, MessageTypes
from messages.errors import (
    AlreadyRunningError,
    DecodeError,
    PublishFailedError,
    Rejected,
    StoreTransientError,
)
from messages.plumbing import tracing
from messages.plumbing.logs import saga_context
from messages.plumbing.metrics import DEAD_LETTERED
from messages.plumbing.settings import BrokerSettings

log = logging.getLogger(__name__)

PERSISTENT = 2  # delivery_mode: written to disk by the broker
# Set by a quorum queue on a redelivery: how many times the message was returned before.
DELIVERY_COUNT_HEADER = "x-delivery-count"
STORE_RETRY_S = 1.0  # pause before requeueing a message whose database did not answer

# What a lost connection or channel looks like from aio-pika: the broker's trouble, not ours.
BROKER_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class Publisher:
    """Publishes with confirms on one channel, through aiormq directly.

    The hot path: aio-pika's message and exchange objects cost more CPU per message than
    the rest of a hop together, so services publish through this instead.
    """

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel

    @classmethod
    async def on(cls, channel: AbstractChannel) -> Publisher:
        """A publisher on an aio-pika channel opened with publisher confirms."""
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel), "aio-pika's channels are aiormq's"
        return cls(underlay)

    async def publish(
        self,
        exchange: str,
        message: Envelope | Wire,
        routing_key: str,
        *,
        mandatory: bool = True,
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
        user_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish persistent and wait for the confirm; PublishFailedError when there is none.

        With ``mandatory`` an unroutable message is an error, so a missing queue never
        swallows a command silently. ``user_id`` must be the connection's login (RabbitMQ
        checks it), so the receiver knows who sent it. With ``timeout``, a confirm that does
        not come in time is a PublishFailedError too.
        """
        wire = message if isinstance(message, Wire) else encode(message)
        properties = spec.Basic.Properties(
            content_type=wire.content_type,
            message_type=wire.type,
            message_id=wire.message_id,
            correlation_id=wire.correlation_id,
            delivery_mode=PERSISTENT,
            reply_to=reply_to,
            headers=dict(headers) if headers else None,
            user_id=user_id,
        )
        await self.send(exchange, routing_key, wire.body, properties, mandatory, timeout)

    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        mandatory: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Publish a message as it is and wait for its confirm (see ``publish``)."""
        what = f"{properties.message_type} to {exchange or '(default)'}/{routing_key}"
        try:
            # asyncio.timeout rather than wait_for: no extra task per publish on the hot path.
            async with asyncio.timeout(timeout):
                # wait=False: the confirm is what counts, not the frames leaving the socket
                # first (saves a future and a drain per publish).
                result = await self.channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                    wait=False,
                )
        except BROKER_ERRORS as exc:
            raise PublishFailedError(f"{what}: {exc!r}") from exc
        if isinstance(result, aiormq.abc.DeliveredMessage):
            raise PublishFailedError(f"{what} was unroutable")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a handler may know of a delivery besides its decoded message."""

    tag: int
    body: bytes
    properties: spec.Basic.Properties

    @property
    def reply_to(self) -> str | None:
        return self.properties.reply_to

    @property
    def user_id(self) -> str | None:
        return self.properties.user_id

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def headers(self) -> dict[str, FieldValue]:
        return dict(self.properties.headers or {})


Handler = Callable[[Envelope, Delivery], Awaitable[None]]


async def consume(
    channel: aiormq.abc.AbstractChannel,
    queue_name: str,
    publisher: Publisher,
    handler: Handler,
    settings: BrokerSettings,
    *,
    exclusive: bool = False,
    types: MessageTypes = MESSAGE_TYPES,
) -> None:
    """Consume ``queue_name``: decode each delivery, hand it to ``handler``, then ack.

    This is the one place deliveries are acked or dead-lettered; the channel must be this
    consumer's alone (acks are sent several at a time). A message that does not decode, or
    that the handler rejects, goes to the DLQ with the reason and is logged once; the
    consumer keeps going. A handler that raises gets the message again (requeued after a
    pause) up to SAGA_MAX_DELIVERIES times; then it is dead-lettered with the error, or, from
    a quorum queue (SAGA_QUEUE_TYPE=quorum), by the broker at its delivery limit.
    """
    consumer = _Consumer(queue_name, publisher, handler, settings, _Acks(channel), types)
    try:
        await channel.queue_declare(queue_name, passive=True)
        await channel.basic_consume(queue_name, consumer.on_message, exclusive=exclusive)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise AlreadyRunningError(
            f"another consumer holds {queue_name} exclusively on this vhost ({exc}): "
            "is another instance running against the same RabbitMQ vhost?"
        ) from exc


# The frames _Acks sends: ack one, ack up to and including, requeue, requeue as failed.
_ACK, _ACK_MULTIPLE, _NACK, _REJECT = range(4)


class _Acks:
    """Acks one consumer's deliveries, several at once where it can (multiple=True).

    Handlers finish out of order (a group commit settles many at once). Once per loop turn,
    the settled deliveries at the head of the channel's order are acked with one frame; one
    settled behind a delivery still in hand is acked on its own, so a slow message never
    holds up the acks, and the prefetch window, behind it. Nacks are sent at once.

    Every ack and nack frame goes out through one task, in the order decided: frames sent
    from several tasks can overtake each other in aiormq's write queue, and an ack that
    overtakes a nack of the same delivery loses the message, or one that overtakes an ack
    of a tag it covers makes the broker close the channel (unknown delivery tag).
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._open: deque[int] = deque()  # delivery tags not yet settled, in delivery order
        self._settled: dict[int, str] = {}  # tag -> "ack" (to send), "sent" or "nack"
        self._fresh: list[int] = []  # acked since the last flush
        self._flushing = False
        self._frames: deque[tuple[int, int]] = deque()  # (tag, one of the frame kinds)
        self._sender: asyncio.Task[None] | None = None

    def received(self, tag: int) -> None:
        self._open.append(tag)

    def ack(self, tag: int) -> None:
        self._settled[tag] = "ack"
        self._fresh.append(tag)
        if not self._flushing:  # once per loop turn: a commit's handlers all settle by then
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def nack(self, tag: int) -> None:
        """Requeue ``tag``."""
        self._settled[tag] = "nack"
        self._send(tag, _NACK)

    def reject(self, tag: int) -> None:
        """Requeue ``tag`` as a failed delivery (basic.reject).

        A quorum queue counts it toward its delivery limit; RabbitMQ 4.3 and later no longer
        count a basic.nack, which says "not now" rather than "this one failed".
        """
        self._settled[tag] = "nack"
        self._send(tag, _REJECT)

    def _flush(self) -> None:
        self._flushing = False
        head = None
        while self._open and self._open[0] in self._settled:
            tag = self._open.popleft()
            if self._settled.pop(tag) == "ack":
                head = tag
        if head is not None:
            self._send(head, _ACK_MULTIPLE)
        for tag in self._fresh:
            if self._settled.get(tag) == "ack":  # behind one still in hand: on its own
                self._settled[tag] = "sent"
                self._send(tag, _ACK)
        self._fresh.clear()

    def _send(self, tag: int, kind: int) -> None:
        self._frames.append((tag, kind))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_in_order())

    async def _send_in_order(self) -> None:
        while self._frames:
            tag, kind = self._frames.popleft()
            if kind <= _ACK_MULTIPLE:
                multiple = kind == _ACK_MULTIPLE
                await _settle(self.channel.basic_ack(tag, multiple=multiple, wait=False))
            elif kind == _NACK:
                await _settle(self.channel.basic_nack(tag, requeue=True, wait=False))
            else:
                await _settle(self.channel.basic_reject(tag, requeue=True, wait=False))


class _Consumer:
    def __init__(
        self,
        queue: str,
        publisher: Publisher,
        handler: Handler,
        settings: BrokerSettings,
        acks: _Acks,
        types: MessageTypes,
    ) -> None:
        self.queue = queue
        self.types = types
        self.publisher = publisher
        self.handler = handler
        self.settings = settings
        self.acks = acks
        self._failures: dict[str, int] = {}  # message id -> deliveries whose handler raised

    async def on_message(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        properties = delivered.header.properties
        tag = delivered.delivery_tag
        assert tag is not None, "a delivery always has a tag"
        self.acks.received(tag)
        delivery = Delivery(tag, delivered.body, properties)
        try:
            message = decode(
                delivered.body,
                content_type=properties.content_type,
                type_hint=properties.message_type,
                max_bytes=self.settings.max_message_bytes,
                types=self.types,
            )
        except DecodeError as exc:
            await self._dead_letter(delivery, exc.reason, exc.detail)
            return
        with (
            saga_context(message.saga_id, step=message.type, message_id=message.message_id),
            tracing.consuming(properties.headers, f"{self.queue} {message.type}"),
        ):
            try:
                await self.handler(message, delivery)
            except Rejected as exc:
                await self._dead_letter(delivery, exc.reason, exc.detail)
            except PublishFailedError as exc:
                # Broker trouble, not the message's fault: let it come back.
                log.warning("requeueing %s: %s", delivery.message_id, exc)
                self.acks.nack(tag)
            except StoreTransientError as exc:
                # Nor is a database that is away: back to the queue, uncounted, after a pause
                # so that the messages waiting for it do not spin.
                log.warning("requeueing %s: %s", delivery.message_id, exc)
                await asyncio.sleep(STORE_RETRY_S)
                self.acks.nack(tag)
            except Exception as exc:
                await self._failed(delivery, exc)
            else:
                self.acks.ack(tag)

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """Requeue a delivery whose handler raised, or give up on it after max_deliveries."""
        if self.settings.queue_type == "quorum":
            await self._return_to_quorum_queue(delivery)
            return
        key = delivery.message_id or str(delivery.tag)
        deliveries = self._failures.pop(key, 0) + 1
        if deliveries >= self.settings.max_deliveries:
            log.exception("error handling %s (delivery %d): giving up", key, deliveries)
            await self._dead_letter(
                delivery,
                "handler_error",
                f"{exc!r} on {deliveries} deliveries",
                {topology.DELIVERIES_HEADER: deliveries},
            )
            return
        log.exception("error handling %s (delivery %d): will retry", key, deliveries)
        if len(self._failures) > 10_000:  # forget old ones rather than grow without bound
            self._failures.clear()
        self._failures[key] = deliveries
        # Requeued, not republished: a consumer may write only where its role allows, and
        # the pause keeps a poison message from spinning while it uses up its deliveries.
        await asyncio.sleep(min(0.05 * 2**deliveries, 2.0))
        self.acks.nack(delivery.tag)

    async def _return_to_quorum_queue(self, delivery: Delivery) -> None:
        """Requeue as failed: the quorum queue counts it, and dead-letters it past its limit.

        The count is the broker's, so it survives a restart of this consumer and is shared
        by every replica consuming the queue.
        """
        returned = delivery.properties.headers and delivery.properties.headers.get(
            DELIVERY_COUNT_HEADER
        )
        deliveries = (returned if isinstance(returned, int) else 0) + 1
        last = deliveries >= self.settings.max_deliveries
        log.exception(
            "error handling %s (delivery %d of %d): %s",
            delivery.message_id or f"delivery {delivery.tag}",
            deliveries,
            self.settings.max_deliveries,
            "the broker dead-letters it now" if last else "will retry",
        )
        # The same pause as for a classic queue: a poison message does not spin.
        await asyncio.sleep(0 if last else min(0.05 * 2**deliveries, 2.0))
        self.acks.reject(delivery.tag)

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        detail: str,
        extra: dict[str, str | int] | None = None,
    ) -> None:
        DEAD_LETTERED.labels(self.queue, reason).inc()
        log.warning(
            "dead-lettering message %s from %s: %s: %s",
            delivery.message_id or f"(no message_id, delivery {delivery.tag})",
            self.queue,
            reason,
            detail,
        )
        # The same message, persistent, with why it was moved in its headers. Not its
        # user_id: that was the sender's login, and RabbitMQ checks it against ours.
        original = delivery.properties
        properties = spec.Basic.Properties(
            content_type=original.content_type,
            message_type=original.message_type,
            message_id=original.message_id,
            correlation_id=original.correlation_id,
            reply_to=original.reply_to,
            delivery_mode=PERSISTENT,
            headers={
                **delivery.headers,
                topology.REASON_HEADER: reason,
                topology.DETAIL_HEADER: detail[:1000],
                topology.QUEUE_HEADER: self.queue,
                **(extra or {}),
            },
        )
        # The copy is confirmed before the original is acked: nothing is lost in between.
        try:
            await self.publisher.send(
                topology.DEAD_LETTER_EXCHANGE,
                self.queue,
                delivery.body,
                properties,
                timeout=self.settings.publish_timeout_s,
            )
        except PublishFailedError as exc:
            log.warning("could not move %s (%s); requeueing", delivery.message_id, exc)
            self.acks.nack(delivery.tag)
            return
        self.acks.ack(delivery.tag)


async def _settle(outcome: Awaitable[None]) -> None:
    # A channel lost between handling and ack is fine: the broker redelivers, and every
    # handler here is idempotent. Nothing else to do but note it.
    try:
        await outcome
    except BROKER_ERRORS as exc:
        log.info("could not settle a delivery (%s); the broker will redeliver it", exc)

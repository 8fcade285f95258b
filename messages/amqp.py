"""The broker at the edge: connect with retries, declare the topology, publish, consume.

aio-pika connects, opens channels and declares; the hot path (publish with confirms,
consume, ack several at once, dead-letter) goes through aiormq directly, without aio-pika's
message objects and its second task per delivery. Services hand this module decoded messages
and get back nothing AMQP-shaped, so the orchestrator and participant runtimes read as what
they do, not how the broker works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    ExchangeType,
)
from pamqp import commands as spec
from pamqp.common import FieldValue
from yarl import URL

from messages import topology, tracing
from messages.codec import Wire, decode, encode
from messages.errors import (
    AlreadyRunningError,
    BrokerUnavailableError,
    ConfigurationError,
    DecodeError,
    PublishFailedError,
    Rejected,
)
from messages.health import Health
from messages.logs import saga_context
from messages.metrics import DEAD_LETTERED
from messages.models import AnyMessage, Envelope
from messages.settings import BrokerSettings, tls_context
from messages.settings import redact as redact  # re-exported: services log URLs through amqp

log = logging.getLogger(__name__)

PERSISTENT = 2  # delivery_mode: written to disk by the broker

# What a lost connection or channel looks like from aio-pika: the broker's trouble, not ours.
BROKER_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


async def connect(settings: BrokerSettings, name: str) -> AbstractConnection:
    """Connect to the broker, retrying with a clear log line until it answers.

    For one-shot tools (provision, tests). Long-lived services use ``run_connected``, which
    also starts over when the connection is lost.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _open(settings, name)
        except _TRANSIENT as exc:
            await _pause_before_retry(settings, attempt, str(exc) or type(exc).__name__)


# What failing to reach the broker looks like: worth another try after a pause.
_TRANSIENT = (TimeoutError, aiormq.exceptions.AMQPConnectionError, OSError, *BROKER_ERRORS)


async def _pause_before_retry(settings: BrokerSettings, attempt: int, why: str) -> None:
    log.warning(
        "cannot reach RabbitMQ at %s (attempt %d): %s; retrying in %.1fs",
        redact(settings.amqp_url),
        attempt,
        why,
        settings.connect_retry_s,
    )
    await asyncio.sleep(settings.connect_retry_s)


async def _open(settings: BrokerSettings, name: str) -> AbstractConnection:
    """One bounded attempt at a connection; login and vhost refusals are ConfigurationErrors."""
    try:
        return await asyncio.wait_for(
            aio_pika.connect(
                settings.amqp_url,
                client_properties={"connection_name": name},
                ssl_context=tls_context(settings.amqp_url, settings.ca_file),
            ),
            settings.connect_timeout_s,
        )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise ConfigurationError(
            f"RabbitMQ at {redact(settings.amqp_url)} refused the login: {exc}"
        ) from exc
    except aiormq.exceptions.InvalidFrameError as exc:
        # The broker closes a connection to a vhost it does not have, or we may not use.
        raise ConfigurationError(
            f"RabbitMQ at {redact(settings.amqp_url)} refused the connection: does the vhost "
            "exist, and may this user use it?"
        ) from exc


class Session:
    """One connection and the channels and consumers a service set up on it.

    ``lost()`` returns (with the reason) as soon as the connection or any channel closes, or
    the broker cancels a consumer: the service then starts over on a new connection, rather
    than carrying on half-connected.
    """

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.consuming: list[str] = []
        # Held for the life of the session: aio-pika's robust connection kept its channels only
        # weakly (aio-pika#594), so a garbage collection during an outage lost the consumers.
        self.channels: list[AbstractChannel] = []
        self._lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        connection.close_callbacks.add(lambda _, exc: self.lose(f"connection closed: {exc}"))

    def lose(self, why: str) -> None:
        if not self._lost.done():
            self._lost.set_result(why)

    async def lost(self) -> str:
        return await asyncio.shield(self._lost)

    async def channel(self, *, confirms: bool = False, prefetch: int = 0) -> AbstractChannel:
        """A channel whose loss ends the session."""
        channel = await self.connection.channel(publisher_confirms=confirms)
        self.channels.append(channel)
        channel.close_callbacks.add(lambda _, exc: self.lose(f"channel closed: {exc}"))
        if prefetch:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def consume(
        self,
        queue_name: str,
        publisher: Publisher,
        handler: Handler,
        settings: BrokerSettings,
        *,
        exclusive: bool = False,
    ) -> None:
        """``consume`` on a channel of its own; the session ends if the broker cancels it."""
        channel = await self.channel(prefetch=settings.prefetch)
        underlay = await channel.get_underlay_channel()
        await consume(underlay, queue_name, publisher, handler, settings, exclusive=exclusive)
        underlay.on_consumer_cancel_callbacks.add(
            lambda _: self.lose(f"the broker cancelled the consumer of {queue_name}")
        )
        self.consuming.append(queue_name)


Setup = Callable[[Session], Awaitable[None]]
STABLE_S = 10.0  # a session that lasted this long was a real recovery, not a flap


async def run_connected(
    settings: BrokerSettings,
    name: str,
    setup: Setup,
    health: Health,
    on_lost: Callable[[], None] = lambda: None,
) -> None:
    """Connect, ``setup`` the session, and start over whenever it is lost; never returns.

    Every attempt (connect, declare, consume) is bounded by SAGA_CONNECT_TIMEOUT_S. When
    the broker stays out of reach for SAGA_BROKER_GIVE_UP_S, raise BrokerUnavailableError,
    so the process exits and its supervisor restarts it, instead of hanging while it looks
    alive.
    """
    down_since = time.monotonic()
    ever_up = False
    attempt = 0
    while True:
        attempt += 1
        session: Session | None = None
        try:
            session = Session(await _open(settings, name))
            await asyncio.wait_for(setup(session), settings.connect_timeout_s)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            await _close(session)
            raise ConfigurationError(
                f"RabbitMQ refused {amqp_user(settings)!r} what this service needs ({exc}): give "
                "the user those permissions, or run `saga provision` and start the service with "
                "SAGA_DECLARE_TOPOLOGY=false"
            ) from exc
        except (*_TRANSIENT, AlreadyRunningError) as exc:
            if isinstance(exc, AlreadyRunningError) and not ever_up:
                raise  # at start: another instance really is there
            # After a reconnect the broker may not have noticed our old connection is gone.
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            await _close(session)
            health.down(f"cannot reach RabbitMQ: {why}")
            _give_up_after(settings, down_since, why)
            await _pause_before_retry(settings, attempt, why)
            continue
        except BaseException:
            await _close(session)
            raise
        if ever_up:
            log.warning(
                "reconnected to RabbitMQ after %.1fs; consuming %s",
                time.monotonic() - down_since,
                ", ".join(session.consuming) or "nothing",
            )
        ever_up, attempt = True, 0
        health.up(session.consuming)
        up_since = time.monotonic()
        try:
            why = await session.lost()
        except BaseException:  # stopping: no more deliveries while the rest shuts down
            on_lost()
            await _close(session)
            raise
        on_lost()
        log.warning("connection to RabbitMQ lost (%s); reconnecting", why)
        health.down(f"connection lost: {why}")
        await _close(session)
        if time.monotonic() - up_since >= STABLE_S:
            down_since = time.monotonic()
        else:
            # A session that keeps dropping at once counts as down, and is not retried in a
            # tight loop: the give-up applies to it too.
            _give_up_after(settings, down_since, why)
            await asyncio.sleep(settings.connect_retry_s)


def _give_up_after(settings: BrokerSettings, down_since: float, why: str) -> None:
    """Raise BrokerUnavailableError once there has been no working session for too long."""
    down_for = time.monotonic() - down_since
    if down_for > settings.broker_give_up_s:
        raise BrokerUnavailableError(
            f"no working session with RabbitMQ at {redact(settings.amqp_url)} for "
            f"{down_for:.0f}s (SAGA_BROKER_GIVE_UP_S={settings.broker_give_up_s:g}); last: {why}"
        )


def amqp_user(settings: BrokerSettings) -> str:
    """The login of the broker URL: what RabbitMQ checks a message's user_id against."""
    return URL(settings.amqp_url).user or "guest"


async def _close(session: Session | None) -> None:
    if session is None:
        return
    try:
        await asyncio.wait_for(session.connection.close(), 5)
    except Exception as exc:  # it is being thrown away: nothing else to do
        log.debug("closing a lost connection: %r", exc)


async def declare_topology(channel: AbstractChannel, declare: bool = True) -> None:
    """Declare every exchange and queue (idempotent: same arguments every time).

    With ``declare`` off, only check that they exist: passive declarations need no
    permissions, so a least-privileged service can start once `saga provision` has run.
    """
    if not declare:
        await _existing_topology(channel)
        return
    direct, topic = ExchangeType.DIRECT, ExchangeType.TOPIC
    for name in (topology.REQUESTS_EXCHANGE, topology.COMMANDS_EXCHANGE, topology.REPLIES_EXCHANGE):
        await channel.declare_exchange(name, direct, durable=True)
    await channel.declare_exchange(topology.EVENTS_EXCHANGE, topic, durable=True)
    dead = await channel.declare_exchange(topology.DEAD_LETTER_EXCHANGE, direct, durable=True)
    for queue_name, exchange_name, routing_key in topology.consumed_queues():
        dlq_name = topology.dead_letter_queue(queue_name)
        dlq = await channel.declare_queue(dlq_name, durable=True)
        await dlq.bind(dead, routing_key=queue_name)
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={
                # Rejections the broker dead-letters itself land in the same DLQ.
                "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": queue_name,
            },
        )
        await queue.bind(exchange_name, routing_key=routing_key)


async def _existing_topology(channel: AbstractChannel) -> None:
    names = (
        topology.REQUESTS_EXCHANGE,
        topology.COMMANDS_EXCHANGE,
        topology.REPLIES_EXCHANGE,
        topology.EVENTS_EXCHANGE,
        topology.DEAD_LETTER_EXCHANGE,
    )
    try:
        for name in names:
            await channel.get_exchange(name, ensure=True)
        for queue_name, _, _ in topology.consumed_queues():
            await channel.get_queue(queue_name, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise ConfigurationError(
            f"the saga topology is not there ({exc.args[0] if exc.args else exc}): run "
            "`saga provision` first, or let services declare it with SAGA_DECLARE_TOPOLOGY=true"
        ) from exc


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


Handler = Callable[[AnyMessage, Delivery], Awaitable[None]]


async def consume(
    channel: aiormq.abc.AbstractChannel,
    queue_name: str,
    publisher: Publisher,
    handler: Handler,
    settings: BrokerSettings,
    *,
    exclusive: bool = False,
) -> None:
    """Consume ``queue_name``: decode each delivery, hand it to ``handler``, then ack.

    This is the one place deliveries are acked or dead-lettered; the channel must be this
    consumer's alone (acks are sent several at a time). A message that does not decode, or
    that the handler rejects, goes to the DLQ with the reason and is logged once; the
    consumer keeps going. A handler that raises gets the message again (requeued after a
    pause) up to SAGA_MAX_DELIVERIES times; then it is dead-lettered with the error.
    """
    consumer = _Consumer(queue_name, publisher, handler, settings, _Acks(channel))
    try:
        await channel.queue_declare(queue_name, passive=True)
        await channel.basic_consume(queue_name, consumer.on_message, exclusive=exclusive)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise AlreadyRunningError(
            f"another consumer holds {queue_name} exclusively on this vhost ({exc}): "
            "is another instance running against the same RabbitMQ vhost?"
        ) from exc


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
        self._frames: deque[tuple[int, bool, bool]] = deque()  # (tag, ack?, multiple?)
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
        self._send(tag, ack=False, multiple=False)

    def _flush(self) -> None:
        self._flushing = False
        head = None
        while self._open and self._open[0] in self._settled:
            tag = self._open.popleft()
            if self._settled.pop(tag) == "ack":
                head = tag
        if head is not None:
            self._send(head, ack=True, multiple=True)
        for tag in self._fresh:
            if self._settled.get(tag) == "ack":  # behind one still in hand: on its own
                self._settled[tag] = "sent"
                self._send(tag, ack=True, multiple=False)
        self._fresh.clear()

    def _send(self, tag: int, *, ack: bool, multiple: bool) -> None:
        self._frames.append((tag, ack, multiple))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_in_order())

    async def _send_in_order(self) -> None:
        while self._frames:
            tag, ack, multiple = self._frames.popleft()
            if ack:
                await _settle(self.channel.basic_ack(tag, multiple=multiple, wait=False))
            else:
                await _settle(self.channel.basic_nack(tag, requeue=True, wait=False))


class _Consumer:
    def __init__(
        self,
        queue: str,
        publisher: Publisher,
        handler: Handler,
        settings: BrokerSettings,
        acks: _Acks,
    ) -> None:
        self.queue = queue
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
            except Exception as exc:
                await self._failed(delivery, exc)
            else:
                self.acks.ack(tag)

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """Requeue a delivery whose handler raised, or give up on it after max_deliveries."""
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

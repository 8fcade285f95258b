"""The broker at the edge: connect with retries (to any of several nodes), reconnect (to
another node), declare the topology (classic or quorum queues).

aio-pika connects, opens channels and declares; the hot path (publish with confirms,
consume, ack, dead-letter) is messages.plumbing.delivery, re-exported here. Services hand this
module decoded messages and get back nothing AMQP-shaped, so the orchestrator and
participant runtimes read as what they do, not how the broker works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
    ExchangeType,
)
from pamqp.common import FieldValue
from yarl import URL

from messages.contract import topology
from messages.contract.models import MESSAGE_TYPES, MessageTypes
from messages.errors import (
    AlreadyRunningError,
    BrokerUnavailableError,
    ConfigurationError,
    NoNodeAnsweredError,
)
from messages.plumbing.delivery import BROKER_ERRORS as BROKER_ERRORS  # re-exported: the hot path
from messages.plumbing.delivery import Delivery as Delivery
from messages.plumbing.delivery import Handler as Handler
from messages.plumbing.delivery import Publisher as Publisher
from messages.plumbing.delivery import consume as consume
from messages.plumbing.health import Health
from messages.plumbing.settings import BrokerSettings, tls_context
from messages.plumbing.settings import (
    redact as redact,  # re-exported: services log URLs through amqp
)

log = logging.getLogger(__name__)


# The settings of the connection this task made (connect, run_connected), for what it
# declares on it: the queue type and delivery limit come with the broker settings.


async def connect(settings: BrokerSettings, name: str) -> AbstractConnection:
    """Connect to the broker, retrying with a clear log line until a node answers.

    For one-shot tools (provision, tests). Long-lived services use ``run_connected``, which
    also starts over when the connection is lost.
    """
    nodes = Nodes(settings.amqp_urls)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await nodes.open(settings, name)
        except _TRANSIENT as exc:
            await _pause_before_retry(settings, attempt, _why(exc))


# What failing to reach the broker looks like: worth another try after a pause.
_TRANSIENT = (
    TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    OSError,
    NoNodeAnsweredError,
    *BROKER_ERRORS,
)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _pause_before_retry(settings: BrokerSettings, attempt: int, why: str) -> None:
    log.warning(
        "cannot reach RabbitMQ at %s (attempt %d): %s; retrying in %.1fs",
        redact(settings.amqp_url),
        attempt,
        why,
        settings.connect_retry_s,
    )
    await asyncio.sleep(settings.connect_retry_s)


class Nodes:
    """The broker's node URLs (SAGA_AMQP_URL), tried round robin.

    The first attempt starts with the first URL; once connected, the next attempt (after a
    lost connection) starts with the node after the one that was lost, so a service whose
    node went away moves to another at once instead of waiting for that one to come back.
    """

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.current: str | None = None
        """The URL of the node of the last connection opened."""
        self._next = 0

    async def open(self, settings: BrokerSettings, name: str) -> AbstractConnection:
        """One round: each node once, from the next in turn; the first that answers.

        NoNodeAnsweredError (or, with one URL, its error) when none does.
        """
        failures = []
        for _ in self.urls:
            url = self.urls[self._next]
            self._next = (self._next + 1) % len(self.urls)
            try:
                connection = await _open(settings, name, url)
            except _TRANSIENT as exc:
                if len(self.urls) == 1:
                    raise
                log.warning("RabbitMQ node %s does not answer: %s", redact(url), _why(exc))
                failures.append(f"{redact(url)}: {_why(exc)}")
                continue
            if len(self.urls) > 1:
                log.info("connected to RabbitMQ node %s", redact(url))
            self.current = url
            return connection
        raise NoNodeAnsweredError("no node answered: " + "; ".join(failures))


async def _open(settings: BrokerSettings, name: str, url: str) -> AbstractConnection:
    """One bounded attempt at a connection; login and vhost refusals are ConfigurationErrors."""
    try:
        return await asyncio.wait_for(
            aio_pika.connect(
                url,
                client_properties={"connection_name": name},
                ssl_context=tls_context(url, settings.ca_file),
            ),
            settings.connect_timeout_s,
        )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise ConfigurationError(f"RabbitMQ at {redact(url)} refused the login: {exc}") from exc
    except aiormq.exceptions.InvalidFrameError as exc:
        # The broker closes a connection to a vhost it does not have, or we may not use.
        raise ConfigurationError(
            f"RabbitMQ at {redact(url)} refused the connection: does the vhost "
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
        types: MessageTypes = MESSAGE_TYPES,
    ) -> None:
        """``consume`` on a channel of its own; the session ends if the broker cancels it."""
        channel = await self.channel(prefetch=settings.prefetch)
        underlay = await channel.get_underlay_channel()
        await consume(
            underlay, queue_name, publisher, handler, settings, exclusive=exclusive, types=types
        )
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
    nodes = Nodes(settings.amqp_urls)
    down_since = time.monotonic()
    ever_up = False
    attempt = 0
    while True:
        attempt += 1
        session: Session | None = None
        try:
            session = Session(await nodes.open(settings, name))
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
            why = _why(exc)
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
    return URL(settings.amqp_urls[0]).user or "guest"  # the same in every node URL


async def _close(session: Session | None) -> None:
    if session is None:
        return
    try:
        await asyncio.wait_for(session.connection.close(), 5)
    except Exception as exc:  # it is being thrown away: nothing else to do
        log.debug("closing a lost connection: %r", exc)


def queue_arguments(settings: BrokerSettings | None, queue_name: str) -> dict[str, FieldValue]:
    """The arguments ``queue_name`` (a consumed queue) is declared with, for the queue type.

    Both types send rejections the broker dead-letters to the queue's DLQ. A quorum queue
    also counts deliveries itself: one whose handling failed SAGA_MAX_DELIVERIES times is
    dead-lettered by the broker (reason ``delivery_limit`` in its x-death header), at least
    once (the broker keeps it until the DLQ confirms it, which needs reject-publish overflow).
    """
    arguments: dict[str, FieldValue] = {
        "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": queue_name,
    }
    if settings is not None and settings.queue_type == "quorum":
        arguments.update(
            {
                "x-queue-type": "quorum",
                # Dead-lettered once it has been returned more times than this: after
                # max_deliveries deliveries.
                "x-delivery-limit": settings.max_deliveries - 1,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        )
    return arguments


def dead_letter_queue_arguments(settings: BrokerSettings | None) -> dict[str, FieldValue] | None:
    """The arguments of a DLQ: of the same type as its queue, and dead-lettering nowhere."""
    if settings is not None and settings.queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return None


async def declare_topology(
    channel: AbstractChannel, settings: BrokerSettings, *, declare: bool | None = None
) -> None:
    """Declare every exchange and queue (idempotent: same arguments every time).

    The queues are of the settings' SAGA_QUEUE_TYPE. A queue that exists with other
    arguments (another type, say) is a ConfigurationError saying what to do.

    With ``declare`` off (SAGA_DECLARE_TOPOLOGY by default), only check that they exist:
    passive declarations need no permissions, so a least-privileged service can start once
    `saga provision` has run.
    """
    if not (settings.declare_topology if declare is None else declare):
        await _existing_topology(channel)
        return
    direct, topic = ExchangeType.DIRECT, ExchangeType.TOPIC
    for name in (topology.REQUESTS_EXCHANGE, topology.COMMANDS_EXCHANGE, topology.REPLIES_EXCHANGE):
        await channel.declare_exchange(name, direct, durable=True)
    await channel.declare_exchange(topology.EVENTS_EXCHANGE, topic, durable=True)
    dead = await channel.declare_exchange(topology.DEAD_LETTER_EXCHANGE, direct, durable=True)
    for queue_name, exchange_name, routing_key in topology.consumed_queues():
        dlq_name = topology.dead_letter_queue(queue_name)
        dlq = await _declare_queue(
            channel, dlq_name, dead_letter_queue_arguments(settings), settings
        )
        await dlq.bind(dead, routing_key=queue_name)
        arguments = queue_arguments(settings, queue_name)
        queue = await _declare_queue(channel, queue_name, arguments, settings)
        await queue.bind(exchange_name, routing_key=routing_key)


async def _declare_queue(
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, FieldValue] | None,
    settings: BrokerSettings | None,
) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise _queue_mismatch(name, settings, exc) from exc


def _queue_mismatch(
    name: str, settings: BrokerSettings | None, exc: Exception
) -> ConfigurationError:
    """What to do when the broker has ``name`` with other arguments than we declare."""
    queue_type = settings.queue_type if settings else "classic"
    other = "classic" if queue_type == "quorum" else "quorum"
    wanted = f"SAGA_QUEUE_TYPE={queue_type}"
    if queue_type == "quorum":
        wanted += f" (and SAGA_MAX_DELIVERIES={settings.max_deliveries if settings else '?'})"
    return ConfigurationError(
        f"queue {name} exists on the broker with other arguments than {wanted} asks for: "
        f"{exc.args[0] if exc.args else exc}. A queue's type and arguments cannot change: "
        f"keep the settings it was declared with (SAGA_QUEUE_TYPE={other}, if that is its "
        "type), or move its messages elsewhere, delete the queue and start the services again "
        "so that they declare it anew"
    )


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

"""The orchestrator's I/O: consume requests and replies, fire deadlines, relay the outbox.

Every event follows the same path: load the saga, ask the engine, commit the new state and
its outgoing messages in one transaction, then ack. The outbox relay publishes what was
committed, with confirms, and deletes each row only once the broker has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from messages import amqp, topology
from messages.amqp import Exchanges
from messages.codec import encode
from messages.errors import PublishFailedError, Rejected
from messages.logs import saga_context
from messages.models import AnyMessage, PlaceOrder, Reply
from orchestrator import engine
from orchestrator.definition import RetryPolicy, SagaDefinition, order_saga
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import OutboxMessage, SagaStore

log = logging.getLogger(__name__)

RELAY_BATCH = 256


def definition_from(settings: OrchestratorSettings) -> SagaDefinition:
    """The order saga with the time-outs and retry bounds from settings."""

    def policy(attempts: int) -> RetryPolicy:
        return RetryPolicy(
            settings.step_timeout_s, attempts, settings.retry_backoff, settings.max_retry_wait_s
        )

    return order_saga(
        policy(settings.step_max_attempts), policy(settings.compensation_max_attempts)
    )


def to_outbox(decision: engine.Decision) -> list[OutboxMessage]:
    """Where each decided message goes on the broker."""
    rows = []
    for out in decision.outbox:
        if isinstance(out, engine.SendCommand):
            rows.append(
                OutboxMessage(topology.COMMANDS_EXCHANGE, out.participant, encode(out.command))
            )
            continue
        wire = encode(out.event)
        # Nobody may be listening for results: unroutable is fine, not an error.
        rows.append(
            OutboxMessage(
                topology.EVENTS_EXCHANGE,
                topology.event_routing_key(out.event.status),
                wire,
                mandatory=False,
            )
        )
        if out.reply_to:
            rows.append(OutboxMessage("", out.reply_to, wire, mandatory=False))
    return rows


class Orchestrator:
    """One orchestrator process: consumers, the deadline timer and the outbox relay."""

    def __init__(self, settings: OrchestratorSettings, store: SagaStore) -> None:
        self.settings = settings
        self.store = store
        self.definition = definition_from(settings)
        self._outbox_ready = asyncio.Event()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def run(self) -> None:
        """Run until cancelled."""
        connection = await amqp.connect(self.settings, "orchestrator")
        async with connection:
            publish_channel = await connection.channel(publisher_confirms=True)
            exchanges = await amqp.declare_topology(publish_channel)
            consume_channel = await connection.channel()
            await consume_channel.set_qos(prefetch_count=self.settings.prefetch)
            depth = self.store.outbox_depth()
            if depth:
                log.info("resuming: %d outbox message(s) to republish", depth)
            self._outbox_ready.set()
            tasks = [
                asyncio.create_task(self._relay(exchanges), name="outbox-relay"),
                asyncio.create_task(self._timer(), name="deadline-timer"),
            ]
            await amqp.consume(
                consume_channel, topology.REQUESTS_QUEUE, exchanges, self.on_request, self.settings
            )
            await amqp.consume(
                consume_channel, topology.REPLIES_QUEUE, exchanges, self.on_reply, self.settings
            )
            log.info(
                "orchestrator ready: consuming %s and %s",
                topology.REQUESTS_QUEUE,
                topology.REPLIES_QUEUE,
            )
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

    async def on_request(self, message: AnyMessage, incoming: AbstractIncomingMessage) -> None:
        """A PlaceOrder starts a saga; a repeated one (same saga id) is dropped."""
        if not isinstance(message, PlaceOrder):
            raise Rejected("unexpected_type", f"{message.type} does not belong on requests")
        existing = self.store.get(message.saga_id)
        if existing is not None:
            log.info("dropping repeated request: saga is already %s", existing.status)
            return
        self._apply(engine.start(self.definition, message, incoming.reply_to, self.now()))

    async def on_reply(self, message: AnyMessage, incoming: AbstractIncomingMessage) -> None:
        """Apply a participant's reply to its saga."""
        if not isinstance(message, Reply):
            raise Rejected("unexpected_type", f"{message.type} does not belong on replies")
        state = self.store.get(message.saga_id)
        if state is None:
            raise Rejected("unknown_saga", f"no saga {message.saga_id}")
        decision = engine.on_reply(self.definition, state, message, self.now())
        self._apply(decision, len(state.history))

    def _apply(self, decision: engine.Decision, seen: int = 0) -> None:
        """Commit a decision; ``seen`` is how many history entries were logged before."""
        if decision.ignored:
            log.info("event dropped: %s", decision.ignored)
            return
        self.store.commit(decision.state, to_outbox(decision))
        for entry in decision.state.history[seen:]:
            log.info("%s: %s %s", entry.step, entry.event, entry.detail)
        self._outbox_ready.set()

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            now = self.now()
            for state in self.store.due(now, limit=RELAY_BATCH):
                with saga_context(state.saga_id):
                    decision = engine.on_deadline(self.definition, state, now)
                    self._apply(decision, len(state.history))

    async def _relay(self, exchanges: Exchanges) -> None:
        by_name = {
            topology.COMMANDS_EXCHANGE: exchanges.commands,
            topology.EVENTS_EXCHANGE: exchanges.events,
            "": exchanges.default,
        }
        backoff = self.settings.connect_retry_s
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while batch := self.store.outbox(RELAY_BATCH):
                sent = await self._publish_all(by_name, batch)
                self.store.outbox_done(sent)
                if len(sent) < len(batch):
                    # The broker is away or refusing: try again shortly, keeping the rest.
                    await asyncio.sleep(backoff)

    async def _publish_all(
        self, by_name: dict[str, AbstractExchange], batch: Sequence[OutboxMessage]
    ) -> list[int]:
        """Publish a batch concurrently (confirms arrive asynchronously); return what landed."""

        async def one(row: OutboxMessage) -> int | None:
            try:
                await amqp.publish(
                    by_name[row.exchange],
                    row.wire,
                    row.routing_key,
                    mandatory=row.mandatory,
                    reply_to=row.reply_to,
                )
            except PublishFailedError as exc:
                with saga_context(row.wire.correlation_id):
                    log.warning("outbox publish failed, will retry: %s", exc)
                return None
            return row.id

        results = await asyncio.gather(*(one(row) for row in batch))
        return [i for i in results if i is not None]

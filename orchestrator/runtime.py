"""The orchestrator's I/O: consume requests and replies, fire deadlines, relay the outbox.

Every event follows the same path: load the saga, ask the engine, commit the new state and
its outgoing messages in one transaction, then ack. Events that arrive in the same loop turn
share one transaction (group commit). The outbox relay publishes what was committed, with
confirms, and deletes each row only once the broker has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from aio_pika.abc import AbstractIncomingMessage

from messages import amqp, topology, tracing
from messages.amqp import Exchanges
from messages.batching import GroupCommit
from messages.codec import encode
from messages.errors import Rejected, SagaNotFoundError
from messages.logs import saga_context
from messages.metrics import serve as serve_metrics
from messages.models import (
    AbortSaga,
    ActionRefused,
    AnyMessage,
    OperatorAction,
    PlaceOrder,
    Reply,
)
from orchestrator import engine, metrics
from orchestrator.definition import RetryPolicy, SagaDefinition, order_saga
from orchestrator.relay import OutboxRelay
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import OutboxMessage, SagaStore

log = logging.getLogger(__name__)

DUE_BATCH = 256  # sagas whose deadline passed, handled per timer tick


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
    trace = decision.state.traceparent
    rows = []
    for out in decision.outbox:
        if isinstance(out, engine.SendCommand):
            command = encode(out.command)
            rows.append(
                OutboxMessage(topology.COMMANDS_EXCHANGE, out.participant, command, True, trace)
            )
            continue
        # Nobody may be listening for results: unroutable is fine, not an error.
        wire = encode(out.event)
        key = topology.event_routing_key(out.event.status)
        rows.append(OutboxMessage(topology.EVENTS_EXCHANGE, key, wire, False, trace))
        if out.reply_to:
            rows.append(OutboxMessage("", out.reply_to, wire, False, trace))
    return rows


class Orchestrator:
    """One orchestrator process: consumers, the deadline timer and the outbox relay."""

    def __init__(self, settings: OrchestratorSettings, store: SagaStore) -> None:
        self.settings = settings
        self.store = store
        self.definition = definition_from(settings)
        self._group: GroupCommit[engine.Decision, None] = GroupCommit(self._commit)
        # Decided but not yet committed: a second event for the same saga in the same
        # batch must build on the first one's state, not on the stored one.
        self._uncommitted: dict[UUID, engine.SagaState] = {}
        self._relay: OutboxRelay | None = None
        self._exchanges: Exchanges | None = None

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def run(self) -> None:
        """Run until cancelled."""
        if self.settings.metrics_port:
            metrics.register_store(self.settings.db_path)
            serve_metrics(self.settings.metrics_port)
        connection = await amqp.connect(self.settings, "orchestrator")
        async with connection:
            publish_channel = await connection.channel(publisher_confirms=True)
            exchanges = self._exchanges = await amqp.declare_topology(
                publish_channel, self.settings.declare_topology
            )
            consume_channel = await connection.channel()
            await consume_channel.set_qos(prefetch_count=self.settings.prefetch)
            depth = self.store.outbox_depth()
            if depth:
                log.info("resuming: %d outbox message(s) to republish", depth)
            self._relay = OutboxRelay(
                self.store,
                {
                    topology.COMMANDS_EXCHANGE: exchanges.commands,
                    topology.EVENTS_EXCHANGE: exchanges.events,
                    "": exchanges.default,
                },
                self.settings.connect_retry_s,
            )
            tasks = [
                asyncio.create_task(self._relay.run(), name="outbox-relay"),
                asyncio.create_task(self._timer(), name="deadline-timer"),
            ]
            for queue, handler in (
                (topology.REQUESTS_QUEUE, self.on_request),
                (topology.REPLIES_QUEUE, self.on_reply),
            ):
                await amqp.consume(consume_channel, queue, exchanges, handler, self.settings)
            log.info(
                "orchestrator ready: consuming %s and %s on %s",
                topology.REQUESTS_QUEUE,
                topology.REPLIES_QUEUE,
                amqp.redact(self.settings.amqp_url),
            )
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

    async def on_request(self, message: AnyMessage, incoming: AbstractIncomingMessage) -> None:
        """A PlaceOrder starts a saga (a repeated one is dropped); operators abort or retry."""
        if isinstance(message, OperatorAction):
            await self._operator_action(message, incoming.reply_to)
            return
        if not isinstance(message, PlaceOrder):
            raise Rejected("unexpected_type", f"{message.type} does not belong on requests")

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is not None:
                return engine.Decision(state, ignored=f"repeated request: saga is {state.status}")
            trace = tracing.outgoing().get(tracing.HEADER)
            return engine.start(self.definition, message, incoming.reply_to, self.now(), trace)

        await self._decide(message.saga_id, decide)

    async def on_reply(self, message: AnyMessage, incoming: AbstractIncomingMessage) -> None:
        """Apply a participant's reply to its saga."""
        if not isinstance(message, Reply):
            raise Rejected("unexpected_type", f"{message.type} does not belong on replies")

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is None:
                raise Rejected("unknown_saga", f"no saga {message.saga_id}")
            return engine.on_reply(self.definition, state, message, self.now())

        await self._decide(message.saga_id, decide)

    async def _operator_action(self, action: OperatorAction, reply_to: str | None) -> None:
        """Abort or retry, as the engine allows; a refusal goes back to the operator."""
        act = engine.on_abort if isinstance(action, AbortSaga) else engine.on_retry

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is None:
                raise SagaNotFoundError(f"no saga {action.saga_id}")
            return act(self.definition, state, action.reason, action.requested_by, self.now())

        log.info("%s requested by %s: %s", action.type, action.requested_by, action.reason)
        try:
            refusal = await self._decide(action.saga_id, decide)
        except SagaNotFoundError as exc:
            refusal = str(exc)
        if refusal and reply_to and self._exchanges:
            answer = ActionRefused(saga_id=action.saga_id, action=action.type, detail=refusal)
            await amqp.publish(self._exchanges.default, answer, reply_to, mandatory=False)

    async def _decide(
        self, saga_id: UUID, decide: Callable[[engine.SagaState | None], engine.Decision]
    ) -> str | None:
        """Run the engine on the saga's latest state; return once the result is committed.

        Returns why nothing changed, when the engine ignored the event.
        """
        state = self._uncommitted.get(saga_id) or self.store.get(saga_id)
        decision = decide(state)
        if decision.ignored:
            log.info("event dropped: %s", decision.ignored)
            return decision.ignored
        seen = len(state.history) if state else 0
        for entry in decision.state.history[seen:]:
            log.info("%s: %s %s", entry.step, entry.event, entry.detail, extra={"step": entry.step})
        new = decision.state
        self._uncommitted[saga_id] = new.model_copy(update={"version": new.version + 1})
        await self._group.submit(decision)
        metrics.observe(new.history, seen)
        return None

    def _commit(self, decisions: list[engine.Decision]) -> list[Exception | None]:
        assert self._relay is not None, "decisions come only from consumers run() started"
        # Deleting published outbox rows here spares them a transaction (an fsync) of their own.
        published = self._relay.take_confirmed()
        results: list[Exception | None] = [None] * len(decisions)
        try:
            self.store.commit_many([(d.state, to_outbox(d)) for d in decisions], published)
        except Exception:
            self._relay.give_back(published)
            # One bad decision must not fail its neighbours: commit each on its own.
            results = [self._commit_one(d) for d in decisions]
        finally:
            self._uncommitted.clear()  # committed, or failed and to be redelivered
        self._relay.wake()
        return results

    def _commit_one(self, decision: engine.Decision) -> Exception | None:
        try:
            self.store.commit_many([(decision.state, to_outbox(decision))])
        except Exception as exc:
            return exc
        return None

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            now = self.now()
            due = self.store.due(now, limit=DUE_BATCH)
            await asyncio.gather(*(self._expire(state.saga_id, now) for state in due))

    async def _expire(self, saga_id: UUID, now: datetime) -> None:
        def decide(state: engine.SagaState | None) -> engine.Decision:
            assert state is not None, "the store listed it as due"
            return engine.on_deadline(self.definition, state, now)

        with saga_context(saga_id):
            await self._decide(saga_id, decide)

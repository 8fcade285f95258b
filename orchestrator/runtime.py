"""The orchestrator's I/O: consume requests and replies, fire deadlines, relay the outbox.

Every event follows the same path: take the saga's latest state (kept in memory while it
runs), ask the engine, commit the new state and its outgoing messages in one transaction,
then ack. Commits run in a writer thread; the events that arrive during one commit share
the next (group commit). Once a commit is on disk, its messages go to the outbox relay from
memory, which publishes them with confirms and deletes each row only once the broker has
it; the confirm times of commands are kept, so a deadline counts from when the broker took
the command.

On SQLite this process owns every saga in its store (a lock file, and exclusive consumers,
make sure it is the only one), which is what lets it keep running sagas in memory. On a
shared store (PostgreSQL) several orchestrators take events from the same queues: each reads
the saga from the store, and the store's version check on commit decides between them (the
loser decides again from what the winner stored); each publishes its own outbox rows and
holds a lease on them, and rows whose writer's lease ran out are claimed by another.
A lost connection is set up again from scratch (``amqp.run_connected``); the timer and the
store carry on meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from messages.contract import topology
from messages.contract.codec import encode
from messages.contract.models import (
    MESSAGE_TYPES,
    AbortSaga,
    ActionRefused,
    ActionTaken,
    Envelope,
    MessageTypes,
    OperatorAction,
    Reply,
    RetrySaga,
    message_types,
)
from messages.errors import (
    ConcurrentUpdateError,
    PublishFailedError,
    Rejected,
    SagaNotFoundError,
    StoreTransientError,
    StoreUnavailableError,
    UnreadableSagaError,
)
from messages.plumbing import amqp, tracing
from messages.plumbing import health as liveness
from messages.plumbing.batching import GroupCommit
from messages.plumbing.logs import saga_context
from messages.plumbing.metrics import serve as serve_metrics
from messages.plumbing.service import run_all as run_service_tasks
from orchestrator import engine, metrics
from orchestrator.definition import SagaDefinition, order_saga
from orchestrator.relay import OutboxRelay
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import OutboxMessage, SagaStore, open_store
from orchestrator.store.base import LEASE_S

log = logging.getLogger(__name__)

CONFLICT_ATTEMPTS = 5  # decisions of one event lost to another orchestrator before giving up
DUE_BATCH = 256  # sagas whose deadline passed, handled per timer tick
PRUNE_EVERY_S = 3600.0  # how often finished sagas past the retention are deleted
PRUNE_BATCH = 1000  # sagas deleted per transaction, so commits never wait long behind it
# Kept a day past the retention before they go: requests older than the retention are
# refused, and a client whose clock runs a little ahead must not slip between the two.
PRUNE_MARGIN = timedelta(days=1)
# Queues a client owns: server-named ones, and RabbitMQ's direct reply-to pseudo-queue.
REPLY_QUEUE_PREFIXES = ("amq.gen-", "amq.rabbitmq.reply-to")
# What the engine makes of each operator action: (definition, state, reason, by, now).
Act = Callable[[SagaDefinition, engine.SagaState, str, str, datetime], engine.Decision]
OPERATOR_ACTIONS: dict[type[OperatorAction], Act] = {
    AbortSaga: engine.on_abort,
    RetrySaga: engine.on_retry,
}


def definition_from(settings: OrchestratorSettings) -> SagaDefinition:
    """The order saga with the time-outs and retry bounds from settings."""
    return order_saga(
        settings.step_timeout_s,
        settings.step_max_attempts,
        settings.retry_backoff,
        settings.max_retry_wait_s,
        settings.stuck_after_s,
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
        if out.announce:
            key = topology.event_routing_key(out.event.status)
            rows.append(OutboxMessage(topology.EVENTS_EXCHANGE, key, wire, False, trace))
        rows += [OutboxMessage("", queue, wire, False, trace) for queue in out.reply_to]
    return rows


def check_reply_to(reply_to: str | None) -> None:
    """A result may go only to a client's own queue: refuse anything else (Rejected)."""
    if reply_to is None or reply_to.startswith(REPLY_QUEUE_PREFIXES):
        return
    raise Rejected(
        "bad_reply_to",
        f"reply_to {reply_to[:100]!r} is not a client's own queue (amq.gen-* or direct reply-to)",
    )


class Orchestrator:
    """One orchestrator process: consumers, the deadline timer and the outbox relay."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        store: SagaStore,
        definitions: Sequence[SagaDefinition] = (),
    ) -> None:
        """Run ``definitions`` (the order saga, from settings, when none are given)."""
        self.settings = settings
        self.store = store
        self.definitions = {d.name: d for d in definitions or [definition_from(settings)]}
        # A request starts the saga whose definition names its type.
        self._starts = {d.request_type: d for d in self.definitions.values()}
        self.message_types: MessageTypes = {
            **MESSAGE_TYPES,
            **message_types(*(m for d in self.definitions.values() for m in d.messages())),
        }
        self.reply_users = settings.reply_users
        self._group: GroupCommit[engine.Decision, list[OutboxMessage]] = GroupCommit(
            self._write, self._committed, name="saga-writer"
        )
        # Decided but not yet committed, with the commit to wait for: a second event for the
        # same saga in the same batch must build on the first one's state, not the stored one.
        self._uncommitted: dict[
            UUID, tuple[engine.SagaState, asyncio.Future[list[OutboxMessage]]]
        ] = {}
        # Running sagas as last committed, so an event need not read and parse its saga back
        # from the store. Only when this process alone writes the store (SQLite's lock): in a
        # shared store every event reads its saga, and the version check on commit decides
        # between orchestrators.
        self._cache = not store.shared
        self._running: dict[UUID, engine.SagaState] = {}
        # When the broker confirmed each running saga's latest command: its wait counts from
        # there. Lost in a crash, and then counted from this process's start instead.
        self._confirmed: dict[UUID, tuple[str, datetime]] = {}
        self._started_at = self.now()
        self._relay = OutboxRelay(
            store,
            self._on_confirmed,
            self._still_wanted,
            settings.publish_timeout_s,
            settings.max_retry_wait_s,
            self._group.run,
        )
        self._publisher: amqp.Publisher | None = None

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def run(self) -> None:
        """Run until cancelled, or until the broker stays away too long (raises)."""
        if self.settings.metrics_port:
            reader = functools.partial(open_store, self.settings, readonly=True)
            metrics.register_store(reader, self.settings.stuck_after_s)
            serve_metrics(self.settings.metrics_port)
        if not self.reply_users:
            log.info("SAGA_PARTICIPANT_USERS is not set: replies are not checked for their sender")
        depth = self.store.outbox_depth()
        if depth:
            log.info("resuming: %d outbox message(s) to republish", depth)
        health = liveness.Health(
            liveness.path(self.settings.data_dir, "orchestrator"),
            [topology.REQUESTS_QUEUE, topology.REPLIES_QUEUE],
        )
        connected = amqp.run_connected(
            self.settings, "orchestrator", self._setup, health, self._relay.detach
        )
        try:
            await run_service_tasks(
                {
                    "outbox-relay": self._relay.run(),
                    "deadline-timer": self._timer(),
                    "pruner": self._pruner(),
                    "health": health.run(),
                    **({"lease": self._lease()} if self.store.shared else {}),
                    "connection": connected,
                }
            )
        finally:
            self._group.close()  # the commit in progress finishes before the store closes

    async def _setup(self, session: amqp.Session) -> None:
        """On each new connection: declare, consume (exclusively), and let the relay publish."""
        publish_channel = await session.channel(confirms=True)
        await amqp.declare_topology(publish_channel, self.settings)
        publisher = self._publisher = await amqp.Publisher.on(publish_channel)
        for queue, handler in (
            (topology.REQUESTS_QUEUE, self.on_request),
            (topology.REPLIES_QUEUE, self.on_reply),
        ):
            # Exclusive unless the store is shared: a second orchestrator on this vhost is
            # refused instead of splitting the sagas with a store that knows nothing of them.
            await session.consume(
                queue,
                publisher,
                handler,
                self.settings,
                exclusive=not self.store.shared,
                types=self.message_types,
            )
        self._relay.attach(publisher)
        log.info(
            "orchestrator ready: consuming %s and %s on %s",
            topology.REQUESTS_QUEUE,
            topology.REPLIES_QUEUE,
            amqp.redact(self.settings.amqp_url),
        )

    async def on_request(self, message: Envelope, incoming: amqp.Delivery) -> None:
        """A request starts its saga (a repeated one gets the result too); operators steer."""
        check_reply_to(incoming.reply_to)
        if isinstance(message, OperatorAction) and type(message) in OPERATOR_ACTIONS:
            await self._act(message, incoming.reply_to)
            return
        definition = self._starts.get(message.type)
        if definition is None:
            raise Rejected("unexpected_type", f"{message.type} does not belong on requests")

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is not None:
                return engine.on_repeat(state, incoming.reply_to, self.now())
            if message.created_at < self.now() - self.settings.retention:
                # Its saga may have ended and been pruned: starting it again could charge
                # the customer twice.
                raise Rejected(
                    "too_old",
                    f"placed at {message.created_at.isoformat()}, longer ago than the "
                    f"retention (SAGA_RETENTION_DAYS={self.settings.retention_days:g})",
                )
            trace = tracing.outgoing().get(tracing.HEADER)
            return engine.start(definition, message, incoming.reply_to, self.now(), trace)

        await self._decide(message.saga_id, decide)

    async def on_reply(self, message: Envelope, incoming: amqp.Delivery) -> None:
        """Apply a participant's reply to its saga, if it comes from that participant."""
        if not isinstance(message, Reply):
            raise Rejected("unexpected_type", f"{message.type} does not belong on replies")
        self._check_sender(message, incoming.user_id)

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is None:
                raise Rejected("unknown_saga", f"no saga {message.saga_id}")
            return engine.on_reply(self._definition(state), state, message, self.now())

        await self._decide(message.saga_id, decide)

    def _definition(self, state: engine.SagaState) -> SagaDefinition:
        try:
            return self.definitions[state.saga]
        except KeyError:
            raise Rejected(
                "unknown_definition", f"this orchestrator does not run {state.saga!r} sagas"
            ) from None

    def _check_sender(self, reply: Reply, user_id: str | None) -> None:
        """Only a participant whose step sends the command, as its own user, may answer it.

        The engine then takes only the answer to the saga's own pending command.
        """
        steps = [
            step
            for definition in self.definitions.values()
            if (step := definition.step_for(reply.command_type)) is not None
        ]
        if not steps:
            raise Rejected("unexpected_reply", f"no step sends {reply.command_type}")
        if reply.participant not in {step.participant for step in steps}:
            raise Rejected(
                "wrong_participant",
                f"{reply.command_type} is answered by {steps[0].participant}, "
                f"not {reply.participant}",
            )
        expected = self.reply_users.get(reply.participant)
        if expected is not None and user_id != expected:
            raise Rejected(
                "unauthenticated_reply",
                f"{reply.command_type} must come from RabbitMQ user {expected!r}; "
                f"it came from {user_id!r}",
            )

    async def _act(self, action: OperatorAction, reply_to: str | None) -> None:
        """An operator's action, as the engine allows; the answer goes back to the operator.

        ActionTaken goes only once the decision is committed: what it says is on disk.
        """
        act = OPERATOR_ACTIONS[type(action)]

        def decide(state: engine.SagaState | None) -> engine.Decision:
            if state is None:
                raise SagaNotFoundError(f"no saga {action.saga_id}")
            return act(
                self._definition(state), state, action.reason, action.requested_by, self.now()
            )

        log.info("%s requested by %s: %s", action.type, action.requested_by, action.reason)
        try:
            decision = await self._decide(action.saga_id, decide)
            refusal, done = decision.ignored, decision.done
        except SagaNotFoundError as exc:
            refusal, done = str(exc), None
        answer: ActionTaken | ActionRefused
        if refusal:
            log.info("%s by %s refused: %s", action.type, action.requested_by, refusal)
            answer = ActionRefused(saga_id=action.saga_id, action=action.type, detail=refusal)
        else:
            done = done or f"{action.type} taken"
            answer = ActionTaken(saga_id=action.saga_id, action=action.type, detail=done)
        await self._answer(answer, reply_to)

    async def _answer(self, answer: ActionTaken | ActionRefused, reply_to: str | None) -> None:
        """Tell the operator; if that fails the action stands (its history says what it did)."""
        if not reply_to or self._publisher is None:
            return
        try:
            await self._publisher.publish(
                "", answer, reply_to, mandatory=False, timeout=self.settings.publish_timeout_s
            )
        except PublishFailedError as exc:
            # Requeueing the action to answer it would take it a second time.
            log.warning("%s for %s not sent to %s: %s", answer.type, answer.action, reply_to, exc)

    def _on_confirmed(self, row: OutboxMessage) -> None:
        """The broker has a command: its wait for a reply counts from now (see _expire)."""
        if row.exchange == topology.COMMANDS_EXCHANGE:
            self._confirmed[UUID(row.wire.correlation_id)] = (row.wire.message_id, self.now())

    def _still_wanted(self, row: OutboxMessage) -> bool:
        """Whether a command row that failed to publish is still the one its saga waits for."""
        if row.exchange != topology.COMMANDS_EXCHANGE:
            return True
        try:
            state = self.store.get(UUID(row.wire.correlation_id))
        except Exception:  # unreadable, or the store is in trouble: keep it, decide later
            return True
        return state is not None and str(state.pending) == row.wire.message_id

    async def _decide(
        self,
        saga_id: UUID,
        decide: Callable[[engine.SagaState | None], engine.Decision],
    ) -> engine.Decision:
        """Run the engine on the saga's latest state; return once the result is committed.

        Returns the decision (committed, unless the engine ignored the event). When another
        orchestrator (or a quarantine) changed the saga first, decide again from the store.
        """
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await self._decide_once(saga_id, decide)
            except ConcurrentUpdateError as exc:
                self._running.pop(saga_id, None)
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("deciding again: %s", exc)
        raise AssertionError("unreachable")

    async def _decide_once(
        self,
        saga_id: UUID,
        decide: Callable[[engine.SagaState | None], engine.Decision],
    ) -> engine.Decision:
        uncommitted = self._uncommitted.get(saga_id)
        state = uncommitted[0] if uncommitted else self._load(saga_id)
        decision = decide(state)
        if decision.ignored:
            if uncommitted:
                # Ignored because of a state not on disk yet: it must be before this event
                # is acked; if that commit fails, so does this.
                await asyncio.shield(uncommitted[1])
            log.debug("event dropped: %s", decision.ignored)
            return decision
        new = decision.state
        commit = self._group.enqueue(decision)
        self._uncommitted[saga_id] = (new.model_copy(update={"version": new.version + 1}), commit)
        await commit
        if decision.warning:
            log.warning("%s", decision.warning)
        seen = len(state.history) if state else 0
        for entry in new.history[seen:]:
            log.info("%s: %s %s", entry.step, entry.event, entry.detail, extra={"step": entry.step})
        metrics.observe(new.history, seen)
        return decision

    def _load(self, saga_id: UUID) -> engine.SagaState | None:
        if saga_id in self._running:  # never filled when the store is shared
            return self._running[saga_id]
        try:
            return self.store.get(saga_id)
        except UnreadableSagaError as exc:  # the store has quarantined it
            raise Rejected("unreadable_saga", str(exc)) from exc

    def _write(self, decisions: list[engine.Decision]) -> list[list[OutboxMessage] | Exception]:
        """In the writer thread: commit a batch; one bad decision never fails its neighbours."""
        # Deleting published outbox rows here spares them a transaction (an fsync) of their own.
        confirmed = self._relay.take_confirmed()
        try:
            return list(
                self.store.commit_many([(d.state, to_outbox(d)) for d in decisions], confirmed)
            )
        except StoreTransientError as exc:
            # One by one would wait for the database once per decision: fail them all now.
            self._relay.done(confirmed)
            return [exc] * len(decisions)
        except Exception:
            self._relay.done(confirmed)
            return [self._write_one(d) for d in decisions]

    def _write_one(self, decision: engine.Decision) -> list[OutboxMessage] | Exception:
        try:
            return self.store.commit_many([(decision.state, to_outbox(decision))])[0]
        except Exception as exc:
            return exc

    def _committed(
        self,
        decisions: list[engine.Decision],
        results: Sequence[list[OutboxMessage] | Exception],
    ) -> None:
        """On the loop, once a batch is on disk (or failed): memory follows, messages go."""
        for decision, result in zip(decisions, results, strict=True):
            state = decision.state
            uncommitted = self._uncommitted.get(state.saga_id)
            if uncommitted and uncommitted[0].version == state.version + 1:
                stored = uncommitted[0]  # the state as stored, made when it was decided
                del self._uncommitted[state.saga_id]
            else:  # a later decision's entry stays
                stored = state.model_copy(update={"version": state.version + 1})
            if isinstance(result, Exception) or state.status.finished:
                # Failed (to be redelivered; the store has the truth), or done with.
                self._running.pop(state.saga_id, None)
                if state.status.finished:
                    self._confirmed.pop(state.saga_id, None)
            elif self._cache:
                self._running[state.saga_id] = stored
            if not isinstance(result, Exception):
                self._relay.send(result)

    async def _lease(self) -> None:
        """Renew this orchestrator's lease on its outbox rows; exit if it cannot for long.

        Past the lease another orchestrator publishes those rows: better to stop (and be
        restarted by the supervisor) than to go on as a second publisher of them.
        """
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(LEASE_S / 5)
            try:
                await self._group.run(self.store.heartbeat)
                renewed = time.monotonic()
            except Exception as exc:
                silent = time.monotonic() - renewed
                if silent > LEASE_S * 0.6:
                    raise StoreUnavailableError(
                        f"the saga store has refused this orchestrator's lease for {silent:.0f}s"
                    ) from exc
                log.warning("renewing the outbox lease failed (%s); trying again", exc)

    async def _pruner(self) -> None:
        """Delete finished sagas once they are older than the retention, every hour."""
        while True:
            before = self.now() - self.settings.retention - PRUNE_MARGIN
            pruned = 0
            try:
                while True:
                    # In the writer thread, between commits: the loop never waits for it.
                    batch = await self._group.run(
                        functools.partial(self.store.prune, before, PRUNE_BATCH)
                    )
                    pruned += batch
                    if batch < PRUNE_BATCH:
                        break
            except Exception:
                log.exception("pruning finished sagas failed; trying again later")
            if pruned:
                log.info(
                    "pruned %d saga(s) that ended before %s (SAGA_RETENTION_DAYS=%g, + 1 day)",
                    pruned,
                    before.isoformat(timespec="seconds"),
                    self.settings.retention_days,
                )
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _timer(self) -> None:
        """Fire passed deadlines; an error with one saga never stops the others or the timer."""
        while True:
            await asyncio.sleep(self.settings.tick_s)
            now = self.now()
            try:
                due = self.store.due(now, limit=DUE_BATCH)
            except StoreTransientError as exc:
                log.warning("reading due sagas failed (%s); trying again next tick", exc)
                continue
            except Exception:
                log.exception("reading due sagas failed; trying again next tick")
                continue
            await asyncio.gather(*(self._expire(state, now) for state in due))

    def _confirmed_at(self, state: engine.SagaState) -> datetime | None:
        """When the broker confirmed the saga's pending command; None if it has not yet."""
        confirmed = self._confirmed.get(state.saga_id)
        # Every resend has the same id: only a confirm after this attempt's send is its own.
        if (
            confirmed
            and confirmed[0] == str(state.pending)
            and (state.sent_at is None or confirmed[1] >= state.sent_at)
        ):
            return confirmed[1]
        if state.pending is None or self.store.outbox_holds(str(state.pending)):
            return None  # still waiting in the outbox (broker away, or the row will not go)
        # Gone from the outbox, so confirmed: before this process started, as a rule.
        return max(self._started_at, state.sent_at or self._started_at)

    async def _expire(self, due: engine.SagaState, now: datetime) -> None:
        saga_id = due.saga_id

        def decide(state: engine.SagaState | None) -> engine.Decision:
            assert state is not None, "the store listed it as due"
            try:
                definition = self._definition(state)
                return engine.on_deadline(definition, state, now, self._confirmed_at(state))
            except Exception as exc:
                # A saga the engine cannot decide would fail again on every tick.
                self._running.pop(saga_id, None)
                self.store.quarantine(saga_id, f"its deadline could not be handled: {exc!r}")
                raise Rejected("undecidable_saga", repr(exc)) from exc

        with (
            saga_context(saga_id, step="deadline", message_id=due.pending),
            tracing.continuing(due.traceparent, "deadline"),
        ):
            try:
                await self._decide(saga_id, decide)
            except Rejected as exc:
                log.error("deadline not handled: %s", exc)
            except Exception:
                log.exception("deadline not handled; trying again next tick")

"""The saga engine: a pure function of (definition, state, event, now) -> decision.

No I/O, no clock, no randomness: command ids are derived from the saga id, so deciding the
same thing twice produces the same commands, and every transition is a plain unit test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict

from messages.models import (
    Command,
    CommandFailed,
    CommandSucceeded,
    Envelope,
    HistoryEntry,
    PlaceOrder,
    Reply,
    SagaFinished,
    SagaStatus,
)
from orchestrator.definition import RetryPolicy, SagaDefinition

SAGA = "saga"  # the `step` of history entries about the saga as a whole


class SagaState(BaseModel):
    """Everything the orchestrator knows about one saga; what the store persists."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga_id: UUID
    request: PlaceOrder
    reply_to: str | None = None
    traceparent: str | None = None  # the request's W3C trace context, carried by every command
    status: SagaStatus = SagaStatus.RUNNING
    step: int = 0  # the step running, or the step being compensated
    attempt: int = 0  # sends of the pending command so far
    pending: UUID | None = None  # id of the command whose reply we wait for
    deadline: datetime | None = None
    to_compensate: tuple[int, ...] = ()  # steps still to undo after the current one
    unanswered: tuple[str, ...] = ()  # compensations that never succeeded, and why
    failed_compensations: tuple[int, ...] = ()  # their steps, for an operator's retry
    generation: int = 0  # operator retries so far; part of every command id after one
    reason: str | None = None
    history: tuple[HistoryEntry, ...] = ()
    created_at: datetime
    updated_at: datetime
    version: int = 0  # bumped by every commit; lets a store detect concurrent writers

    @property
    def outcome(self) -> str | None:
        """Why the saga is where it is: the cause, and any compensation that did not succeed."""
        if not self.unanswered:
            return self.reason
        return "; then ".join([self.reason or "compensation", *self.unanswered])


@dataclass(frozen=True)
class SendCommand:
    """Publish ``command`` to ``participant``'s command queue."""

    participant: str
    command: Command


@dataclass(frozen=True)
class PublishResult:
    """Announce the saga's end on saga.events and to the requester's reply_to."""

    event: SagaFinished
    reply_to: str | None


Outgoing = SendCommand | PublishResult


@dataclass(frozen=True)
class Decision:
    """The new state and what to send; ``ignored`` says why an event changed nothing."""

    state: SagaState
    outbox: tuple[Outgoing, ...] = ()
    ignored: str | None = None


def start(
    definition: SagaDefinition,
    request: PlaceOrder,
    reply_to: str | None,
    now: datetime,
    traceparent: str | None = None,
) -> Decision:
    """A new saga for ``request``: send the first step's command."""
    state = SagaState(
        saga_id=request.saga_id,
        request=request,
        reply_to=reply_to,
        traceparent=traceparent,
        created_at=now,
        updated_at=now,
    )
    state = _record(
        state,
        now,
        SAGA,
        "started",
        f"{request.quantity} x {request.sku} for {request.customer_id}, {request.amount}",
    )
    return _send(definition, state, 0, 1, now)


def on_reply(definition: SagaDefinition, state: SagaState, reply: Reply, now: datetime) -> Decision:
    """Apply a participant's reply; duplicates, late and stray replies change nothing.

    One late reply does count: the answer to a last step that timed out and left the saga
    FAILED with its effect unknown. It settles the question, so the saga goes on from it.
    """
    if state.status is SagaStatus.FAILED and state.pending and reply.command_id == state.pending:
        state = _record(state, now, SAGA, "late_reply", f"{reply.command_type} answered at last")
        state = state.model_copy(
            update={
                "status": SagaStatus.RUNNING,
                "reason": None,
                "generation": state.generation + 1,
            }
        )
    if state.status.finished:
        return Decision(state, ignored=f"saga is already {state.status}")
    if reply.command_id != state.pending:
        return Decision(
            state,
            ignored=f"reply to {reply.command_type} {reply.command_id} "
            "is not the one awaited (duplicate or late)",
        )
    step = definition.steps[state.step]
    if state.status is SagaStatus.RUNNING:
        if isinstance(reply, CommandSucceeded):
            state = _record(state, now, step.name, "succeeded", reply.detail)
            if state.step + 1 == len(definition.steps):
                return _finish(state, SagaStatus.COMPLETED, now, None)
            return _send(definition, state, state.step + 1, 1, now)
        assert isinstance(reply, CommandFailed)
        state = _record(state, now, step.name, "failed", _reason_text(reply))
        # The participant says nothing happened, so only the earlier steps need undoing.
        return _compensate(definition, state, range(state.step), now, reply.reason)
    # COMPENSATING
    if isinstance(reply, CommandSucceeded):
        state = _record(state, now, step.name, "compensated", reply.detail)
    else:
        assert isinstance(reply, CommandFailed)
        state = _record(state, now, step.name, "compensation_failed", _reason_text(reply))
        state = _give_up_compensation(state, f"{reply.command_type} refused: {_reason_text(reply)}")
    return _next_compensation(definition, state, now)


def on_deadline(definition: SagaDefinition, state: SagaState, now: datetime) -> Decision:
    """The pending command got no reply in time: resend it, or give up on it."""
    if state.status.finished or state.deadline is None or now < state.deadline:
        return Decision(state, ignored="no deadline has passed")
    step = definition.steps[state.step]
    compensating = state.status is SagaStatus.COMPENSATING
    policy = definition.compensation_retry if compensating else step.retry
    command = _command_type(definition, state.step, compensating).__name__
    state = _record(state, now, step.name, "timed_out", f"{command} attempt {state.attempt}")
    if state.attempt < policy.max_attempts:
        return _send(definition, state, state.step, state.attempt + 1, now)
    if compensating:
        # Keep going with the others, as Temporal's samples do, and report this one.
        state = _give_up_compensation(state, f"{command} unanswered after {state.attempt} attempts")
        return _next_compensation(definition, state, now)
    if step.compensation is None:
        # Its effect is unknown and cannot be undone: only a person can decide.
        detail = (
            f"{command} unanswered after {state.attempt} attempts; its effect is "
            "unknown and it has no compensation"
        )
        return _finish(state, SagaStatus.FAILED, now, detail, keep_pending=True)
    # Its effect is unknown, so undo it too (a compensation of nothing is a no-op).
    return _compensate(definition, state, range(state.step + 1), now, f"{step.name}_timed_out")


def on_abort(
    definition: SagaDefinition, state: SagaState, reason: str, by: str, now: datetime
) -> Decision:
    """An operator stops a RUNNING saga: compensate what is done and what is in flight."""
    if state.status is not SagaStatus.RUNNING:
        return Decision(state, ignored=f"only a RUNNING saga can be aborted; it is {state.status}")
    step = definition.steps[state.step]
    if step.compensation is None:
        return Decision(
            state,
            ignored=f"{step.name} is in flight and cannot be undone; wait for it to finish",
        )
    state = _record(state, now, SAGA, "abort_requested", f"by {by}: {reason}")
    # The pending command may still be applied, so its step is compensated too.
    return _compensate(definition, state, range(state.step + 1), now, f"aborted: {reason}")


def on_retry(
    definition: SagaDefinition, state: SagaState, reason: str, by: str, now: datetime
) -> Decision:
    """An operator re-drives a FAILED saga from where it stopped.

    A saga that failed compensating resends the compensations that never succeeded; one
    whose last step's effect was unknown resends that step. Commands get new ids, so a
    participant that refused before decides again.
    """
    if state.status is not SagaStatus.FAILED:
        return Decision(state, ignored=f"only a FAILED saga can be retried; it is {state.status}")
    state = _record(state, now, SAGA, "retry_requested", f"by {by}: {reason}")
    state = state.model_copy(update={"generation": state.generation + 1})
    if state.failed_compensations:
        state = state.model_copy(
            update={
                "status": SagaStatus.COMPENSATING,
                "to_compensate": state.failed_compensations,
                "failed_compensations": (),
                "unanswered": (),
            }
        )
        return _next_compensation(definition, state, now)
    state = state.model_copy(update={"status": SagaStatus.RUNNING, "reason": None})
    return _send(definition, state, state.step, 1, now)


def command_id(saga_id: UUID, step: str, compensating: bool, generation: int = 0) -> UUID:
    """The idempotency key of a step's command: the same for every resend."""
    name = f"{step}/{'compensation' if compensating else 'command'}"
    return uuid5(saga_id, f"{name}/{generation}" if generation else name)


def _give_up_compensation(state: SagaState, why: str) -> SagaState:
    return state.model_copy(
        update={
            "unanswered": (*state.unanswered, why),
            "failed_compensations": (*state.failed_compensations, state.step),
        }
    )


def _command_type(definition: SagaDefinition, index: int, compensating: bool) -> type[Command]:
    step = definition.steps[index]
    command = step.compensation if compensating else step.command
    assert command is not None, f"step {step.name} has no compensation"
    return command


def _build(
    command: type[Command], state: SagaState, step: str, compensating: bool, now: datetime
) -> Command:
    # Commands take their payload from the order by field name: the saga stays data.
    fields: dict[str, Any] = {
        name: getattr(state.request, name)
        for name in command.model_fields
        if name not in Envelope.model_fields and name != "type"
    }
    return command(
        message_id=command_id(state.saga_id, step, compensating, state.generation),
        saga_id=state.saga_id,
        created_at=now,
        **fields,
    )


def _send(
    definition: SagaDefinition, state: SagaState, index: int, attempt: int, now: datetime
) -> Decision:
    step = definition.steps[index]
    compensating = state.status is SagaStatus.COMPENSATING
    policy: RetryPolicy = definition.compensation_retry if compensating else step.retry
    command = _build(
        _command_type(definition, index, compensating), state, step.name, compensating, now
    )
    state = state.model_copy(
        update={
            "step": index,
            "attempt": attempt,
            "pending": command.message_id,
            "deadline": policy.deadline(now, attempt),
        }
    )
    state = _record(state, now, step.name, "sent", f"{command.type} attempt {attempt}", attempt)
    return Decision(state, (SendCommand(step.participant, command),))


def _compensate(
    definition: SagaDefinition, state: SagaState, done: range, now: datetime, reason: str
) -> Decision:
    undo = tuple(i for i in reversed(done) if definition.steps[i].compensation is not None)
    state = state.model_copy(
        update={"status": SagaStatus.COMPENSATING, "reason": reason, "to_compensate": undo}
    )
    state = _record(state, now, SAGA, "compensating", reason)
    return _next_compensation(definition, state, now)


def _next_compensation(definition: SagaDefinition, state: SagaState, now: datetime) -> Decision:
    if not state.to_compensate:
        status = SagaStatus.FAILED if state.unanswered else SagaStatus.COMPENSATED
        return _finish(state, status, now, state.reason)
    index, *rest = state.to_compensate
    state = state.model_copy(update={"to_compensate": tuple(rest)})
    return _send(definition, state, index, 1, now)


def _finish(
    state: SagaState,
    status: SagaStatus,
    now: datetime,
    reason: str | None,
    keep_pending: bool = False,  # a late reply to it can still settle the saga
) -> Decision:
    state = state.model_copy(
        update={
            "status": status,
            "reason": reason,
            "pending": state.pending if keep_pending else None,
            "deadline": None,
            "to_compensate": (),
        }
    )
    state = _record(state, now, SAGA, status.lower(), state.outcome or "")
    event = SagaFinished(
        message_id=uuid5(state.saga_id, f"finished/{state.generation}"),
        saga_id=state.saga_id,
        created_at=now,
        status=status,
        reason=state.outcome,
        history=state.history,
    )
    return Decision(state, (PublishResult(event, state.reply_to),))


def _record(
    state: SagaState, now: datetime, step: str, event: str, detail: str, attempt: int | None = None
) -> SagaState:
    entry = HistoryEntry(
        at=now, step=step, event=event, detail=detail[:500], status=state.status, attempt=attempt
    )
    return state.model_copy(update={"history": (*state.history, entry), "updated_at": now})


def _reason_text(reply: CommandFailed) -> str:
    return f"{reply.reason}: {reply.detail}" if reply.detail else reply.reason

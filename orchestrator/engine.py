"""The saga engine: a pure function of (definition, state, event, now) -> decision.

No I/O, no clock, no randomness: command ids are derived from the saga id, so deciding the
same thing twice produces the same commands, and every transition is a plain unit test.

A command's wait counts from the broker's confirm of it, not from the decision: when a
deadline passes, ``on_deadline`` is told when (or whether) the broker took the command, and
postpones the deadline if the broker had it for less than the whole wait. So a broker outage
or an outbox backlog never counts against a participant, at no cost on the hot path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict, model_validator

from messages.contract.models import (
    Command,
    CommandFailed,
    CommandSucceeded,
    Envelope,
    HistoryEntry,
    Reply,
    SagaFinished,
    SagaStatus,
)
from orchestrator.definition import Call, RetryPolicy, SagaDefinition, StepKind

SAGA = "saga"  # the `step` of history entries about the saga as a whole
# A step resent for hours would fill its history with "sent"/"timed_out" pairs; past the first
# few, only every tenth attempt is recorded (the state still counts every one).
_RECORD_EVERY = 10
_RECORD_FIRST = 5
# Fields of earlier versions that no longer mean anything; dropped when an old state is read.
_RETIRED_FIELDS = ("generation", "failed_compensations")


class SagaState(BaseModel):
    """Everything the orchestrator knows about one saga; what the store persists."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga_id: UUID
    saga: str = "order"  # the name of its definition
    input: dict[str, Any]  # the saga's input as JSON data; its definition builds commands from it
    reply_to: str | None = None
    watchers: tuple[str, ...] = ()  # reply_to queues of repeated requests: they get the result too
    traceparent: str | None = None  # the request's W3C trace context, carried by every command
    status: SagaStatus = SagaStatus.RUNNING
    step: int = 0  # the step running, or the step being compensated
    attempt: int = 0  # sends of the pending command so far
    pending: UUID | None = None  # id of the command whose reply we wait for
    wait_s: float = 0.0  # how long the pending attempt waits once the broker has it
    deadline: datetime | None = None  # at the earliest; see on_deadline
    waiting_since: datetime | None = None  # first send of the pending command: for "stuck"
    sent_at: datetime | None = None  # this attempt's send: a confirm before it was an earlier one's
    to_compensate: tuple[int, ...] = ()  # steps still to undo after the current one
    unanswered: tuple[str, ...] = ()  # compensations that did not succeed, and why
    reason: str | None = None
    history: tuple[HistoryEntry, ...] = ()
    created_at: datetime
    updated_at: datetime
    version: int = 0  # bumped by every commit; lets a store detect concurrent writers

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if any(k in data for k in (*_RETIRED_FIELDS, "request")):
            data = {k: v for k, v in data.items() if k not in _RETIRED_FIELDS}
        if isinstance(data.get("request"), dict):
            # Before sagas were generic, the state held the whole PlaceOrder.
            request = data.pop("request")
            data["input"] = {k: v for k, v in request.items() if k not in Envelope.model_fields}
        return data

    @property
    def outcome(self) -> str | None:
        """Why the saga is where it is: the cause, and any compensation that did not succeed."""
        if not self.unanswered:
            return self.reason
        return "; then ".join([self.reason or "compensation", *self.unanswered])

    def stuck_for(self, now: datetime, after_s: float) -> float | None:
        """Seconds the pending command has waited, if that is ``after_s`` or more."""
        if self.status.finished or self.waiting_since is None:
            return None
        waited = (now - self.waiting_since).total_seconds()
        return waited if waited >= after_s else None


@dataclass(frozen=True)
class SendCommand:
    """Publish ``command`` to ``participant``'s command queue."""

    participant: str
    command: Command


@dataclass(frozen=True)
class PublishResult:
    """Send the saga's result to ``reply_to`` queues, and announce it on saga.events.

    ``announce`` is False when the result goes to a repeated request only: saga.events
    carries exactly one terminal event per saga.
    """

    event: SagaFinished
    reply_to: tuple[str, ...]
    announce: bool = True


Outgoing = SendCommand | PublishResult


@dataclass(frozen=True)
class Decision:
    """The new state and what to send.

    ``ignored`` says why an event changed nothing; ``warning`` is something an operator
    should hear about (the runtime logs it at WARNING); ``done`` says what an operator's
    action did, in a line for the answer to it.
    """

    state: SagaState
    outbox: tuple[Outgoing, ...] = ()
    ignored: str | None = None
    warning: str | None = None
    done: str | None = None


def start(
    definition: SagaDefinition,
    request: Envelope,
    reply_to: str | None,
    now: datetime,
    traceparent: str | None = None,
) -> Decision:
    """A new saga for ``request``: send the first step's command."""
    data = definition.input(request)
    state = SagaState(
        saga_id=request.saga_id,
        saga=definition.name,
        input=data,
        reply_to=reply_to,
        traceparent=traceparent,
        created_at=now,
        updated_at=now,
    )
    state = _record(state, now, SAGA, "started", definition.describe(data))
    return _send(definition, state, 0, 1, now)


def on_repeat(state: SagaState, reply_to: str | None, now: datetime) -> Decision:
    """The same PlaceOrder again (a client republishing): its new reply_to gets the result."""
    if reply_to is None or reply_to == state.reply_to or reply_to in state.watchers:
        return Decision(state, ignored=f"repeated request: saga is {state.status}")
    if state.status.finished:
        return Decision(state, (PublishResult(result(state), (reply_to,), announce=False),))
    state = state.model_copy(update={"watchers": (*state.watchers, reply_to)})
    return Decision(_record(state, now, SAGA, "repeated_request", f"result also to {reply_to}"))


def on_reply(definition: SagaDefinition, state: SagaState, reply: Reply, now: datetime) -> Decision:
    """Apply a participant's reply; duplicates, late and stray replies change nothing.

    A late answer to the command a FAILED saga was waiting for is recorded in its history,
    and changes nothing else: FAILED is terminal.
    """
    if reply.command_id != state.pending:
        return Decision(
            state,
            ignored=f"reply to {reply.command_type} {reply.command_id} "
            "is not the one awaited (duplicate or late)",
        )
    if state.status is SagaStatus.FAILED:
        state = _record(state, now, SAGA, "late_reply", f"{reply.type}: {_reply_text(reply)}")
        return Decision(state.model_copy(update={"pending": None}))
    if state.status.finished:
        return Decision(state, ignored=f"saga is already {state.status}")
    step = definition.steps[state.step]
    if state.status is SagaStatus.RUNNING:
        if isinstance(reply, CommandSucceeded):
            state = _record(state, now, step.name, "succeeded", reply.detail)
            if state.step + 1 == len(definition.steps):
                return _finish(state, SagaStatus.COMPLETED, now, None)
            return _send(definition, state, state.step + 1, 1, now)
        assert isinstance(reply, CommandFailed)
        state = _record(state, now, step.name, "failed", _reply_text(reply))
        if step.kind is StepKind.RETRIABLE:
            # Past the pivot there is no way back: only a person can sort this out.
            detail = f"{reply.command_type} refused after the point of no return: {reply.reason}"
            return _finish(state, SagaStatus.FAILED, now, detail)
        # The participant says nothing happened, so only the earlier steps need undoing.
        return _compensate(definition, state, range(state.step), now, reply.reason)
    # COMPENSATING
    if isinstance(reply, CommandSucceeded):
        state = _record(state, now, step.name, "compensated", reply.detail)
    else:
        assert isinstance(reply, CommandFailed)
        state = _record(state, now, step.name, "compensation_failed", _reply_text(reply))
        why = f"{reply.command_type} refused: {_reply_text(reply)}"
        state = state.model_copy(update={"unanswered": (*state.unanswered, why)})
    return _next_compensation(definition, state, now)


def on_deadline(
    definition: SagaDefinition, state: SagaState, now: datetime, confirmed_at: datetime | None
) -> Decision:
    """The pending command got no reply in time: resend it, or (before the pivot) undo it.

    ``confirmed_at`` is when the broker confirmed the pending command, None if it has not
    yet. The wait counts from there: if the broker has not had the command for the whole
    wait, the deadline moves instead.
    """
    if state.status.finished or state.deadline is None or now < state.deadline:
        return Decision(state, ignored="no deadline has passed")
    wait = timedelta(seconds=state.wait_s)
    if confirmed_at is None or confirmed_at + wait > now:
        return Decision(state.model_copy(update={"deadline": (confirmed_at or now) + wait}))
    step = definition.steps[state.step]
    policy = _policy(definition, state)
    command = _call(definition, state.step, _compensating(state)).type
    if _recorded(state.attempt):
        state = _record(state, now, step.name, "timed_out", f"{command} attempt {state.attempt}")
    if policy.max_attempts is None or state.attempt < policy.max_attempts:
        decision = _send(definition, state, state.step, state.attempt + 1, now)
        resent_forever = policy.max_attempts is None
        # Said once: with the first resend whose wait is the longest it will get.
        first_capped = state.attempt == 1 or not policy.capped(state.attempt)
        if resent_forever and policy.capped(state.attempt + 1) and first_capped:
            warning = (
                f"{command} unanswered after {state.attempt} attempts; resending every "
                f"{policy.max_wait_s:g}s until {step.participant} answers"
            )
            return Decision(decision.state, decision.outbox, warning=warning)
        return decision
    # A compensatable step out of attempts: its effect is unknown, so undo it too (a
    # compensation of nothing is a no-op, and leaves a tombstone against the late command).
    return _compensate(definition, state, range(state.step + 1), now, f"{step.name}_timed_out")


def on_abort(
    definition: SagaDefinition, state: SagaState, reason: str, by: str, now: datetime
) -> Decision:
    """An operator stops a saga.

    Before the pivot: compensate what is done and what is in flight. Past it, or while
    compensating, only a stuck saga can be stopped, and it ends FAILED for a person to settle.
    """
    if state.status.finished:
        return Decision(state, ignored=f"saga is already {state.status}")
    step = definition.steps[state.step]
    if state.status is SagaStatus.RUNNING and step.kind is StepKind.COMPENSATABLE:
        state = _record(state, now, SAGA, "abort_requested", f"by {by}: {reason}")
        # The pending command may still be applied, so its step is compensated too.
        undo = range(state.step + 1)
        return _aborted(_compensate(definition, state, undo, now, f"aborted: {reason}"))
    command = _call(definition, state.step, _compensating(state)).type
    if state.stuck_for(now, definition.stuck_after_s) is None:
        if state.status is SagaStatus.RUNNING:
            why = f"{command} is past the point of no return: the saga can only complete"
        else:
            why = f"{command} is on its way: compensations finish by themselves"
        return Decision(
            state,
            ignored=f"{why}; it can be aborted once stuck "
            f"(unanswered for {definition.stuck_after_s:g}s)",
        )
    state = _record(state, now, SAGA, "abort_requested", f"by {by}: {reason}")
    if state.status is SagaStatus.RUNNING:
        detail = f"aborted: {reason}; {command} unanswered, its effect is unknown"
        return _aborted(_finish(state, SagaStatus.FAILED, now, detail, keep_pending=True))
    left = [command] + [_call(definition, i, True).type for i in state.to_compensate]
    why = f"aborted: {reason}; not compensated: {', '.join(left)}"
    state = state.model_copy(update={"unanswered": (*state.unanswered, why)})
    # Pending stays set, so a late answer to it is still recorded in the history.
    return _aborted(_finish(state, SagaStatus.FAILED, now, state.reason, keep_pending=True))


def on_retry(
    definition: SagaDefinition, state: SagaState, reason: str, by: str, now: datetime
) -> Decision:
    """An operator has the pending command sent again now, rather than at its deadline.

    For a participant back from an outage while the next resend is still far off: the same
    command (same id) goes out as the next attempt, exactly as a deadline would send it.
    A finished saga has nothing to retry (FAILED is final), and a step whose bounded
    attempts are used up is left to its deadline, which compensates it.
    """
    if state.status is SagaStatus.FAILED:
        return Decision(
            state,
            ignored="saga is FAILED, which is final: nothing is sent again; a person settles "
            "it (its timeline says what is unknown)",
        )
    if state.status.finished:
        return Decision(state, ignored=f"saga is already {state.status}: nothing to retry")
    if state.pending is None:
        return Decision(state, ignored=f"saga is {state.status} but waits for no reply")
    step = definition.steps[state.step]
    policy = _policy(definition, state)
    command = _call(definition, state.step, _compensating(state)).type
    if policy.max_attempts is not None and state.attempt >= policy.max_attempts:
        return Decision(
            state,
            ignored=f"{command} has had all {policy.max_attempts} of its attempts: unless "
            f"answered by its deadline, {step.name} is compensated then",
        )
    state = _record(state, now, SAGA, "retry_requested", f"by {by}: {reason}")
    attempt = state.attempt + 1
    # Recorded whatever the attempt: an operator's resend belongs on the timeline.
    decision = _send(definition, state, state.step, attempt, now, always_record=True)
    return dataclasses.replace(decision, done=f"{command} sent again, attempt {attempt}")


def result(state: SagaState) -> SagaFinished:
    """The SagaFinished event of a finished saga (the same message id every time)."""
    assert state.status.finished, "only a finished saga has a result"
    return SagaFinished(
        message_id=uuid5(state.saga_id, "finished"),
        saga_id=state.saga_id,
        created_at=state.updated_at,
        status=state.status,
        reason=state.outcome,
        history=state.history,
    )


def command_id(saga_id: UUID, step: str, compensating: bool) -> UUID:
    """The idempotency key of a step's command: the same for every resend, forever."""
    return uuid5(saga_id, f"{step}/{'compensation' if compensating else 'command'}")


def _compensating(state: SagaState) -> bool:
    return state.status is SagaStatus.COMPENSATING


def _policy(definition: SagaDefinition, state: SagaState) -> RetryPolicy:
    if _compensating(state):
        return definition.compensation_retry
    return definition.steps[state.step].retry


def _recorded(attempt: int) -> bool:
    return attempt <= _RECORD_FIRST or attempt % _RECORD_EVERY == 0


def _call(definition: SagaDefinition, index: int, compensating: bool) -> Call:
    step = definition.steps[index]
    call = step.compensation if compensating else step.command
    assert call is not None, f"step {step.name} has no compensation"
    return call


def _build(call: Call, state: SagaState, step: str, compensating: bool, now: datetime) -> Command:
    return call.command(
        message_id=command_id(state.saga_id, step, compensating),
        saga_id=state.saga_id,
        created_at=now,
        **call.payload(state.input),
    )


def _send(
    definition: SagaDefinition,
    state: SagaState,
    index: int,
    attempt: int,
    now: datetime,
    always_record: bool = False,
) -> Decision:
    step = definition.steps[index]
    compensating = _compensating(state)
    command = _build(_call(definition, index, compensating), state, step.name, compensating, now)
    state = state.model_copy(update={"step": index})
    state = state.model_copy(
        update={
            "attempt": attempt,
            "pending": command.message_id,
            "wait_s": _policy(definition, state).wait_s(attempt),
            # A first guess: on_deadline moves it if the broker took the command later.
            "deadline": now + timedelta(seconds=_policy(definition, state).wait_s(attempt)),
            "waiting_since": now if attempt == 1 else state.waiting_since,
            "sent_at": now,
        }
    )
    if always_record or _recorded(attempt):
        state = _record(state, now, step.name, "sent", f"{command.type} attempt {attempt}", attempt)
    return Decision(state, (SendCommand(step.participant, command),))


def _aborted(decision: Decision) -> Decision:
    """An accepted abort, saying what it did: the compensation sent, or how the saga ended."""
    state = decision.state
    if state.status.finished:
        done = f"saga ended {state.status}"
    else:
        commands = [out.command.type for out in decision.outbox if isinstance(out, SendCommand)]
        done = f"{state.status.lower()}: {', '.join(commands)} sent"
    return dataclasses.replace(decision, done=done)


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
    keep_pending: bool = False,  # a late reply to it is still recorded
) -> Decision:
    state = state.model_copy(
        update={
            "status": status,
            "reason": reason,
            "pending": state.pending if keep_pending else None,
            "deadline": None,
            "waiting_since": None,
            "sent_at": None,
            "to_compensate": (),
        }
    )
    state = _record(state, now, SAGA, status.lower(), state.outcome or "")
    reply_to = (state.reply_to, *state.watchers) if state.reply_to else state.watchers
    return Decision(state, (PublishResult(result(state), reply_to),))


def _record(
    state: SagaState, now: datetime, step: str, event: str, detail: str, attempt: int | None = None
) -> SagaState:
    entry = HistoryEntry(
        at=now, step=step, event=event, detail=detail[:500], status=state.status, attempt=attempt
    )
    return state.model_copy(update={"history": (*state.history, entry), "updated_at": now})


def _reply_text(reply: Reply) -> str:
    if isinstance(reply, CommandFailed):
        return f"{reply.reason}: {reply.detail}" if reply.detail else reply.reason
    assert isinstance(reply, CommandSucceeded)
    return reply.detail or "succeeded"

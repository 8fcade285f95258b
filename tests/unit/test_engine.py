"""The saga engine as scenarios: an order placed, participants answering (or not), time passing.

The engine is pure, so every test drives it by hand: it passes ``now`` explicitly, confirms
each command as the broker would (deadlines start there), builds the participants' replies
from the commands the engine decided to send, and checks what a user would see: the status,
what was sent to whom, the reason and the timeline.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from uuid import UUID, uuid4, uuid5

import pytest

from messages.contract.models import (
    ChargePayment,
    Command,
    CommandFailed,
    CommandSucceeded,
    CompleteOrder,
    Money,
    PlaceOrder,
    RefundPayment,
    ReleaseStock,
    Reply,
    ReserveStock,
    SagaStatus,
)
from orchestrator import engine
from orchestrator.definition import (
    Call,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
    order_saga,
    pick,
)
from orchestrator.engine import (
    Decision,
    PublishResult,
    SagaState,
    SendCommand,
    command_id,
    on_abort,
    on_deadline,
    on_repeat,
    on_reply,
    start,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
STEP_TIMEOUT_S = 10.0
STEP_ATTEMPTS = 3
MAX_WAIT_S = 60.0  # reached by the 4th attempt: 10, 20, 40, 60
STUCK_AFTER_S = 300.0
SAGA = order_saga(STEP_TIMEOUT_S, STEP_ATTEMPTS, 2.0, MAX_WAIT_S, STUCK_AFTER_S)
# Charge on delivery: the card is charged after the order is complete, so charging is retriable.
CHARGE_ON_DELIVERY = SagaDefinition(
    name="charge_on_delivery",
    request=PlaceOrder,
    steps=(
        Step(
            "reserve_stock",
            "inventory",
            StepKind.COMPENSATABLE,
            Call(ReserveStock, pick("sku", "quantity")),
            Call(ReleaseStock, pick("sku", "quantity")),
            RetryPolicy(STEP_TIMEOUT_S, STEP_ATTEMPTS),
        ),
        Step(
            "complete_order",
            "order",
            StepKind.PIVOT,
            Call(CompleteOrder, pick("customer_id", "sku", "quantity", "amount")),
            None,
            RetryPolicy(STEP_TIMEOUT_S),
        ),
        Step(
            "charge_payment",
            "payment",
            StepKind.RETRIABLE,
            Call(ChargePayment, pick("customer_id", "amount")),
            None,
            RetryPolicy(STEP_TIMEOUT_S),
        ),
    ),
    compensation_retry=RetryPolicy(STEP_TIMEOUT_S),
)
SAGA_ID = UUID("0b7d3c1e-5f43-4c3a-9a53-1d2f0c9e8a77")
REPLY_TO = "amq.gen-requester"
OTHER_CLIENT = "amq.gen-second-client"
OPERATOR = "alice@ops"


# --- helpers ---------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    """``seconds`` after the order was placed."""
    return T0 + timedelta(seconds=seconds)


def after(state: SagaState, seconds: float = 1.0) -> datetime:
    """``seconds`` after the saga's last recorded transition."""
    return state.updated_at + timedelta(seconds=seconds)


def place_order(saga_id: UUID = SAGA_ID) -> PlaceOrder:
    return PlaceOrder(
        saga_id=saga_id,
        created_at=T0,
        customer_id="cust-42",
        sku="SKU-RED-MUG",
        quantity=3,
        amount=Money(amount=Decimal("25.50"), currency="EUR"),
    )


def sent(decision: Decision) -> SendCommand:
    """The one command a decision sends (fails the test if there is not exactly one)."""
    commands = [out for out in decision.outbox if isinstance(out, SendCommand)]
    assert len(commands) == 1, f"expected one command, got {decision.outbox!r}"
    return commands[0]


def result(decision: Decision) -> PublishResult:
    """The saga's result, which must be the only thing the decision sends."""
    assert len(decision.outbox) == 1, f"expected only the result, got {decision.outbox!r}"
    (out,) = decision.outbox
    assert isinstance(out, PublishResult)
    return out


def announced(decision: Decision) -> list[PublishResult]:
    """The results a decision announces on saga.events."""
    return [out for out in decision.outbox if isinstance(out, PublishResult) and out.announce]


def succeeded(command: SendCommand, detail: str = "") -> CommandSucceeded:
    """The participant's reply: it applied ``command``."""
    return CommandSucceeded(
        saga_id=command.command.saga_id,
        command_id=command.command.message_id,
        command_type=command.command.type,  # type: ignore[attr-defined]
        participant=command.participant,
        detail=detail,
    )


def failed(command: SendCommand, reason: str, detail: str = "") -> CommandFailed:
    """The participant's reply: it refused ``command`` for ``reason``."""
    return CommandFailed(
        saga_id=command.command.saga_id,
        command_id=command.command.message_id,
        command_type=command.command.type,  # type: ignore[attr-defined]
        participant=command.participant,
        reason=reason,
        detail=detail,
    )


def sent_types(*decisions: Decision) -> list[tuple[str, type[Command]]]:
    """(participant, command type) of everything the decisions sent, in order."""
    return [
        (out.participant, type(out.command))
        for decision in decisions
        for out in decision.outbox
        if isinstance(out, SendCommand)
    ]


def events(state: SagaState) -> list[tuple[str, str]]:
    """The timeline as (step, event) pairs."""
    return [(entry.step, entry.event) for entry in state.history]


def entries(state: SagaState, event: str) -> list[str]:
    """The details of the saga-level history entries named ``event``."""
    return [e.detail for e in state.history if e.step == "saga" and e.event == event]


def due(state: SagaState) -> datetime:
    """The moment the pending command times out."""
    assert state.deadline is not None, "no deadline: nothing is pending"
    return state.deadline


def begin(definition: SagaDefinition = SAGA, reply_to: str | None = REPLY_TO) -> Decision:
    """A new saga, its first command sent at T0."""
    return start(definition, place_order(), reply_to, T0)


def answer(
    decision: Decision, reply: Reply, now: datetime, definition: SagaDefinition = SAGA
) -> Decision:
    """Apply ``reply``."""
    return on_reply(definition, decision.state, reply, now)


def time_out(decision: Decision, times: int = 1, definition: SagaDefinition = SAGA) -> Decision:
    """Let the pending command's deadline pass ``times`` times in a row, each command
    confirmed by the broker as soon as it was sent."""
    for _ in range(times):
        now = due(decision.state)
        sent_at = now - timedelta(seconds=decision.state.wait_s)
        decision = on_deadline(definition, decision.state, now, sent_at)
    return decision


def run_until(
    command_type: type[Command], definition: SagaDefinition = SAGA
) -> tuple[Decision, float]:
    """Start the saga and let every step succeed, a second apart, until ``command_type`` is
    the pending command. Returns that decision and the time it was taken."""
    decision = begin(definition)
    clock = 0.0
    while not isinstance(sent(decision).command, command_type):
        clock += 1
        decision = answer(decision, succeeded(sent(decision)), at(clock), definition)
    return decision, clock


def refunding() -> tuple[Decision, float]:
    """The order service refused the order: the payment is being refunded."""
    completing, clock = run_until(CompleteOrder)
    decision = answer(completing, failed(sent(completing), "order_rejected"), at(clock + 1))
    assert isinstance(sent(decision).command, RefundPayment)
    return decision, clock + 1


def left_until_stuck(decision: Decision) -> Decision:
    """Let the pending command go unanswered until the saga is stuck at its next deadline."""
    for _ in range(20):  # 10 + 20 + 40 + 60 + ... passes STUCK_AFTER_S well before this
        if decision.state.stuck_for(due(decision.state), STUCK_AFTER_S) is not None:
            return decision
        decision = time_out(decision)
    raise AssertionError(
        f"not stuck after 20 time-outs: waiting since {decision.state.waiting_since}"
    )


def stuck_on_complete_order() -> tuple[Decision, SendCommand]:
    """CompleteOrder resent, unanswered, for longer than the stuck threshold.
    Returns that decision and the CompleteOrder command."""
    completing, _ = run_until(CompleteOrder)
    return left_until_stuck(completing), sent(completing)


def failed_by_abort() -> tuple[Decision, SendCommand]:
    """An operator aborted a saga stuck on CompleteOrder: FAILED, effect unknown.
    Returns that decision and the CompleteOrder still unanswered."""
    stuck, complete = stuck_on_complete_order()
    aborted = on_abort(SAGA, stuck.state, "order service gone", OPERATOR, due(stuck.state))
    assert aborted.state.status is SagaStatus.FAILED
    return aborted, complete


# --- starting and the happy path -------------------------------------------------------------


def test_start_sends_reserve_stock_to_inventory_and_waits_for_its_reply() -> None:
    order = place_order()

    decision = start(SAGA, order, REPLY_TO, T0)

    command = sent(decision)
    assert command.participant == "inventory"
    assert isinstance(command.command, ReserveStock)
    assert command.command.saga_id == order.saga_id
    assert (command.command.sku, command.command.quantity) == ("SKU-RED-MUG", 3)
    state = decision.state
    assert state.status is SagaStatus.RUNNING
    assert state.pending == command.command.message_id
    assert state.attempt == 1
    # a first deadline, moved later if the broker takes the command late (on_deadline)
    assert state.deadline == at(STEP_TIMEOUT_S)
    assert state.wait_s == STEP_TIMEOUT_S
    assert state.waiting_since == T0
    assert state.reply_to == REPLY_TO
    assert decision.ignored is None
    assert events(state) == [("saga", "started"), ("reserve_stock", "sent")]


def test_happy_path_charges_completes_and_publishes_the_full_history() -> None:
    # Given an order whose stock was reserved
    started = begin()
    reserved = answer(started, succeeded(sent(started)), at(1))

    # Then the card is charged with the order's customer and amount
    charge = sent(reserved)
    assert charge.participant == "payment"
    assert isinstance(charge.command, ChargePayment)
    assert charge.command.customer_id == "cust-42"
    assert charge.command.amount == Money(amount=Decimal("25.50"), currency="EUR")
    assert reserved.state.deadline == at(1 + STEP_TIMEOUT_S)

    # When the payment succeeds, the order is completed with all of the order's fields
    charged = answer(reserved, succeeded(charge), at(2))
    complete = sent(charged)
    assert complete.participant == "order"
    assert isinstance(complete.command, CompleteOrder)
    assert (complete.command.customer_id, complete.command.sku, complete.command.quantity) == (
        "cust-42",
        "SKU-RED-MUG",
        3,
    )
    assert complete.command.amount.amount == Decimal("25.50")

    # When the order service confirms, the saga is COMPLETED and announced once
    done = on_reply(SAGA, charged.state, succeeded(complete, "order #7"), at(3))
    state = done.state
    assert state.status is SagaStatus.COMPLETED
    assert state.pending is None and state.deadline is None and state.waiting_since is None
    published = result(done)
    assert published.reply_to == (REPLY_TO,)
    assert published.announce
    assert published.event.saga_id == SAGA_ID
    assert published.event.status is SagaStatus.COMPLETED
    assert published.event.reason is None
    assert published.event.history == state.history
    assert events(state) == [
        ("saga", "started"),
        ("reserve_stock", "sent"),
        ("reserve_stock", "succeeded"),
        ("charge_payment", "sent"),
        ("charge_payment", "succeeded"),
        ("complete_order", "sent"),
        ("complete_order", "succeeded"),
        ("saga", "completed"),
    ]
    assert state.history[-2].detail == "order #7"


# --- a participant says no -------------------------------------------------------------------


def test_payment_declined_releases_the_stock_and_ends_compensated() -> None:
    # Given stock reserved and the card being charged
    charging, clock = run_until(ChargePayment)

    # When the payment service declines the card
    declined = answer(
        charging, failed(sent(charging), "payment_declined", "insufficient funds"), at(clock + 1)
    )

    # Then only the stock is released (nothing was charged, so nothing is refunded)
    assert declined.state.status is SagaStatus.COMPENSATING
    assert sent_types(declined) == [("inventory", ReleaseStock)]
    release = sent(declined).command
    assert isinstance(release, ReleaseStock)
    assert (release.sku, release.quantity) == ("SKU-RED-MUG", 3)
    assert declined.state.deadline == at(clock + 1 + STEP_TIMEOUT_S)

    # When the release succeeds, the saga is COMPENSATED, saying why
    released = on_reply(SAGA, declined.state, succeeded(sent(declined)), at(clock + 2))
    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.reason == "payment_declined"
    event = result(released).event
    assert (event.status, event.reason) == (SagaStatus.COMPENSATED, "payment_declined")
    assert ("charge_payment", "failed") in events(released.state)
    assert ("reserve_stock", "compensated") in events(released.state)


def test_out_of_stock_on_the_first_step_compensates_without_sending_anything() -> None:
    started = begin()

    refused = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))

    assert refused.state.status is SagaStatus.COMPENSATED
    assert refused.state.reason == "out_of_stock"
    assert sent_types(refused) == []
    assert result(refused).event.status is SagaStatus.COMPENSATED
    assert events(refused.state)[-3:] == [
        ("reserve_stock", "failed"),
        ("saga", "compensating"),
        ("saga", "compensated"),
    ]


def test_a_refused_pivot_refunds_then_releases_in_that_order() -> None:
    # Given stock reserved, card charged and the order refused by the order service
    refused, clock = refunding()

    # Then the payment is refunded first (the pivot itself did nothing, so is not undone)...
    assert refused.state.status is SagaStatus.COMPENSATING
    refund = sent(refused)
    assert refund.participant == "payment"
    assert isinstance(refund.command, RefundPayment)
    assert refund.command.amount.amount == Decimal("25.50")

    # ...and the stock released only once the refund is confirmed
    refunded = answer(refused, succeeded(refund), at(clock + 1))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), at(clock + 2))

    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.reason == "order_rejected"
    assert result(released).event.status is SagaStatus.COMPENSATED


def test_a_refused_step_after_the_pivot_ends_failed_and_undoes_nothing() -> None:
    # Given a charge-on-delivery order: completed, the card now being charged
    charging, clock = run_until(ChargePayment, CHARGE_ON_DELIVERY)

    # When the payment service declines the card
    declined = on_reply(
        CHARGE_ON_DELIVERY,
        charging.state,
        failed(sent(charging), "payment_declined"),
        at(clock + 1),
    )

    # Then the completed order stands: no stock released, FAILED for a person to settle
    assert declined.state.status is SagaStatus.FAILED
    assert sent_types(declined) == []
    reason = declined.state.outcome or ""
    assert "ChargePayment refused after the point of no return" in reason
    assert "payment_declined" in reason
    assert result(declined).event.status is SagaStatus.FAILED
    assert ("saga", "compensating") not in events(declined.state)


# --- duplicate, late and stray replies -------------------------------------------------------


def test_a_duplicate_reply_changes_nothing_the_second_time() -> None:
    started = begin()
    reply = succeeded(sent(started))
    first = on_reply(SAGA, started.state, reply, at(1))

    again = on_reply(SAGA, first.state, reply, at(2))

    assert again.ignored
    assert again.outbox == ()
    assert again.state == first.state


def test_a_late_reply_to_an_earlier_step_is_ignored() -> None:
    # Given ReserveStock was answered and the card is being charged
    started = begin()
    reserve = sent(started)
    charging = answer(started, succeeded(reserve), at(1))

    # When a contradicting answer to ReserveStock arrives (a duplicate from a redelivery)
    late = on_reply(SAGA, charging.state, failed(reserve, "out_of_stock"), at(2))

    # Then it is ignored: still charging the card, nothing compensated
    assert late.ignored
    assert late.outbox == ()
    assert late.state == charging.state
    assert late.state.status is SagaStatus.RUNNING


def test_a_reply_that_arrives_after_its_step_timed_out_and_compensation_began_is_ignored() -> None:
    # Given ChargePayment timed out for good and the saga is refunding
    charging, _ = run_until(ChargePayment)
    giving_up = time_out(charging, STEP_ATTEMPTS)
    assert giving_up.state.status is SagaStatus.COMPENSATING

    # When the payment service finally says the charge went through
    late = on_reply(SAGA, giving_up.state, succeeded(sent(charging)), after(giving_up.state))

    # Then the refund stays pending
    assert late.ignored
    assert late.state == giving_up.state
    assert isinstance(sent(giving_up).command, RefundPayment)


def test_a_reply_for_a_finished_saga_is_ignored() -> None:
    started = begin()
    finished = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))
    assert finished.state.status.finished

    stray = on_reply(SAGA, finished.state, succeeded(sent(started)), at(2))

    assert stray.ignored
    assert stray.outbox == ()
    assert stray.state == finished.state


# --- deadlines count from the broker's confirm -----------------------------------------------


def test_the_wait_counts_from_the_brokers_confirm_not_from_the_decision() -> None:
    # Given ReserveStock decided at T0, but confirmed by the broker only at 3 s
    started = start(SAGA, place_order(), REPLY_TO, T0)
    assert started.state.deadline == at(STEP_TIMEOUT_S)

    # When its first deadline passes
    moved = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S), confirmed_at=at(3))

    # Then nothing is resent: the deadline moves to a full wait after the confirm
    assert moved.ignored is None and moved.outbox == ()
    assert moved.state.deadline == at(3 + STEP_TIMEOUT_S)
    assert moved.state.attempt == 1 and events(moved.state) == events(started.state)
    assert moved.state.waiting_since == T0  # stuck still counts from the send


def test_a_broker_outage_before_the_confirm_never_times_out_a_step() -> None:
    # Given ReserveStock decided, but the broker down for an hour so nothing is confirmed
    started = start(SAGA, place_order(), REPLY_TO, T0)
    decision = started
    while due(decision.state) < at(3600):
        decision = on_deadline(SAGA, decision.state, due(decision.state), confirmed_at=None)
        assert decision.outbox == (), due(decision.state)
    assert decision.state.attempt == 1

    # When the broker is back, confirms the command and the participant answers
    reserved = on_reply(SAGA, decision.state, succeeded(sent(started)), at(3605))

    # Then the saga goes on as if nothing happened
    assert reserved.state.status is SagaStatus.RUNNING
    assert isinstance(sent(reserved).command, ChargePayment)
    assert ("reserve_stock", "timed_out") not in events(reserved.state)


def test_a_command_the_broker_had_for_the_whole_wait_times_out() -> None:
    started = begin()

    resent = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S), confirmed_at=T0)

    assert isinstance(sent(resent).command, ReserveStock)
    assert resent.state.attempt == 2
    assert ("reserve_stock", "timed_out") in events(resent.state)


def test_a_resend_waits_its_own_full_wait_and_stuck_counts_from_the_first_send() -> None:
    started = begin()

    resent = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S), confirmed_at=T0)

    assert resent.state.wait_s == 2 * STEP_TIMEOUT_S
    assert resent.state.deadline == at(3 * STEP_TIMEOUT_S)
    assert resent.state.waiting_since == T0
    # the resend itself waits in the outbox: its deadline moves, nothing more is sent
    moved = on_deadline(SAGA, resent.state, at(3 * STEP_TIMEOUT_S), confirmed_at=None)
    assert moved.outbox == () and moved.state.attempt == 2


def test_each_attempt_remembers_when_it_was_sent() -> None:
    # the runtime tells a resend's confirm from an earlier attempt's by it (same command id)
    started = begin()
    resent = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S), confirmed_at=T0)
    refused = on_reply(SAGA, resent.state, failed(sent(resent), "out_of_stock"), at(6))

    assert started.state.sent_at == T0
    assert resent.state.sent_at == at(STEP_TIMEOUT_S)
    assert refused.state.status is SagaStatus.COMPENSATED and refused.state.sent_at is None


def test_the_next_step_starts_a_wait_of_its_own() -> None:
    started = begin()
    resent = time_out(started)

    charging = answer(resent, succeeded(sent(resent)), at(20))

    assert charging.state.attempt == 1
    assert charging.state.waiting_since == at(20)
    assert charging.state.deadline == at(20 + STEP_TIMEOUT_S)


# --- time-outs before the pivot: resend, then undo -------------------------------------------


def test_a_deadline_that_has_not_passed_is_ignored() -> None:
    started = begin()

    early = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S - 0.001), confirmed_at=T0)

    assert early.ignored
    assert early.outbox == ()
    assert early.state == started.state


def test_a_deadline_on_a_finished_saga_is_ignored() -> None:
    started = begin()
    finished = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))

    later = on_deadline(SAGA, finished.state, at(3600), confirmed_at=T0)

    assert later.ignored
    assert later.state == finished.state


def test_a_timed_out_command_is_resent_with_the_same_id_and_a_longer_wait() -> None:
    started = begin()
    first = sent(started).command

    # When the first deadline passes, the same command goes out again
    second = time_out(started)
    resend = sent(second)
    assert resend.participant == "inventory"
    assert resend.command.message_id == first.message_id
    assert resend.command.model_dump(exclude={"created_at"}) == first.model_dump(
        exclude={"created_at"}
    )
    assert second.state.attempt == 2
    assert second.state.status is SagaStatus.RUNNING
    # and waits twice as long (backoff 2)
    assert second.state.deadline == at(STEP_TIMEOUT_S + 2 * STEP_TIMEOUT_S)

    # When that one passes too, the third attempt waits longer still
    third = time_out(second)
    assert sent(third).command.message_id == first.message_id
    assert third.state.attempt == 3
    assert third.state.deadline == at(3 * STEP_TIMEOUT_S + 4 * STEP_TIMEOUT_S)
    assert [e.detail for e in third.state.history if e.event == "timed_out"] == [
        "ReserveStock attempt 1",
        "ReserveStock attempt 2",
    ]


def test_a_compensatable_step_that_never_answers_is_compensated_too() -> None:
    # Given stock reserved and ChargePayment sent
    charging, _ = run_until(ChargePayment)
    charge_id = sent(charging).command.message_id

    # When every attempt times out
    resends = [time_out(charging)]
    for _ in range(STEP_ATTEMPTS - 1):
        resends.append(time_out(resends[-1]))

    # Then it was resent up to max_attempts with the same id, then the saga compensates:
    # the charge may have happened, so it is refunded, then the stock is released
    assert [sent(d).command.message_id for d in resends[:-1]] == [charge_id] * (STEP_ATTEMPTS - 1)
    giving_up = resends[-1]
    assert giving_up.state.status is SagaStatus.COMPENSATING
    assert giving_up.state.reason == "charge_payment_timed_out"
    assert sent_types(giving_up) == [("payment", RefundPayment)]
    refunded = answer(giving_up, succeeded(sent(giving_up)), after(giving_up.state))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), after(refunded.state))
    assert released.state.status is SagaStatus.COMPENSATED
    assert result(released).event.reason == "charge_payment_timed_out"


# --- after the pivot, and compensations: resent until answered -------------------------------


def test_the_pivot_is_resent_with_the_same_id_until_the_order_service_answers() -> None:
    # Given the order is being completed, and the order service is down for a long time
    completing, _ = run_until(CompleteOrder)
    complete_id = sent(completing).command.message_id

    # When 30 deadlines pass in a row
    decisions = [time_out(completing)]
    for _ in range(29):
        decisions.append(time_out(decisions[-1]))

    # Then the saga never gives up: the same CompleteOrder goes out every time, the wait
    # growing to the cap and staying there
    assert all(d.state.status is SagaStatus.RUNNING for d in decisions)
    assert {sent(d).command.message_id for d in decisions} == {complete_id}
    assert sent_types(decisions[-1]) == [("order", CompleteOrder)]
    assert [d.state.wait_s for d in decisions[:4]] == [20, 40, 60, 60]
    assert decisions[-1].state.wait_s == MAX_WAIT_S
    assert decisions[-1].state.attempt == 31

    # When the order service is back and answers, the saga completes
    done = on_reply(SAGA, decisions[-1].state, succeeded(sent(completing)), at(99_999))
    assert done.state.status is SagaStatus.COMPLETED
    assert result(done).event.status is SagaStatus.COMPLETED


def test_reaching_the_longest_wait_warns_the_operator_once() -> None:
    completing, _ = run_until(CompleteOrder)

    decisions = [time_out(completing)]
    for _ in range(5):
        decisions.append(time_out(decisions[-1]))

    # the 4th attempt is the first to wait MAX_WAIT_S: its resend says so, no other does
    warnings = [d.warning for d in decisions]
    assert [attempt for attempt, w in enumerate(warnings, start=2) if w] == [4]
    warning = warnings[2] or ""
    assert "CompleteOrder" in warning
    assert "3 attempts" in warning
    assert f"every {MAX_WAIT_S:g}s" in warning
    assert "order" in warning


def test_a_step_that_will_give_up_does_not_say_it_is_resent_until_answered() -> None:
    # ReserveStock may be sent 6 times and waits at most 30 s: the cap comes before the end
    patient = order_saga(STEP_TIMEOUT_S, 6, 2.0, 30.0)

    capped = time_out(begin(patient), 2, patient)

    assert capped.state.wait_s == 30
    assert "until inventory answers" not in (capped.warning or "")
    assert time_out(capped, 4, patient).state.status is SagaStatus.COMPENSATING


def test_a_step_resent_for_hours_keeps_a_short_history() -> None:
    completing, _ = run_until(CompleteOrder)

    resent = time_out(completing, 24)

    # every attempt is counted, but past the fifth only every tenth is on the timeline
    assert resent.state.attempt == 25
    pivot = [e for e in resent.state.history if e.step == "complete_order"]
    assert [e.attempt for e in pivot if e.event == "sent"] == [1, 2, 3, 4, 5, 10, 20]
    assert [e.detail for e in pivot if e.event == "timed_out"] == [
        f"CompleteOrder attempt {n}" for n in (1, 2, 3, 4, 5, 10, 20)
    ]


def test_a_retriable_step_is_resent_until_answered() -> None:
    charging, _ = run_until(ChargePayment, CHARGE_ON_DELIVERY)

    resent = time_out(charging, 10, CHARGE_ON_DELIVERY)

    assert resent.state.status is SagaStatus.RUNNING
    assert sent(resent).command.message_id == sent(charging).command.message_id
    done = on_reply(CHARGE_ON_DELIVERY, resent.state, succeeded(sent(resent)), at(99_999))
    assert done.state.status is SagaStatus.COMPLETED


def test_an_unanswered_compensation_is_resent_until_answered_and_then_the_rest_run() -> None:
    # Given the order was refused, so the payment is being refunded
    refused, _ = refunding()
    refund = sent(refused)

    # When the payment service stays silent through 10 deadlines
    resent = time_out(refused, 10)

    # Then the saga keeps refunding, always the same command, and releases nothing yet
    assert resent.state.status is SagaStatus.COMPENSATING
    assert resent.state.attempt == 11
    assert sent_types(resent) == [("payment", RefundPayment)]
    assert sent(resent).command.message_id == refund.command.message_id
    assert resent.state.wait_s == MAX_WAIT_S

    # When the refund is answered at last, the stock is released and the saga COMPENSATED
    refunded = answer(resent, succeeded(refund), after(resent.state))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), after(refunded.state))
    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.outcome == "order_rejected"


# --- compensations that are refused ----------------------------------------------------------


def test_a_refused_compensation_ends_failed_after_the_remaining_compensations() -> None:
    # Given the order was refused, so the payment is being refunded
    refused, clock = refunding()

    # When the payment service refuses the refund
    refund_refused = answer(
        refused, failed(sent(refused), "refund_rejected", "card closed"), at(clock + 1)
    )

    # Then the stock is still released, and the saga ends FAILED rather than COMPENSATED
    assert refund_refused.state.status is SagaStatus.COMPENSATING
    assert sent_types(refund_refused) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refund_refused.state, succeeded(sent(refund_refused)), at(clock + 2))
    assert released.state.status is SagaStatus.FAILED
    reason = released.state.outcome or ""
    assert "order_rejected" in reason
    assert "RefundPayment refused: refund_rejected: card closed" in reason
    assert ("charge_payment", "compensation_failed") in events(released.state)
    assert ("reserve_stock", "compensated") in events(released.state)
    assert result(released).event.reason == reason


def test_the_last_compensation_refused_also_ends_failed() -> None:
    charging, clock = run_until(ChargePayment)
    releasing = answer(charging, failed(sent(charging), "payment_declined"), at(clock + 1))

    done = on_reply(SAGA, releasing.state, failed(sent(releasing), "unknown_sku"), at(clock + 2))

    assert done.state.status is SagaStatus.FAILED
    assert "ReleaseStock refused: unknown_sku" in (done.state.outcome or "")
    assert result(done).event.status is SagaStatus.FAILED


# --- stuck sagas and the operator's abort ----------------------------------------------------


def test_a_saga_is_stuck_once_one_command_has_waited_long_enough() -> None:
    completing, clock = run_until(CompleteOrder)
    sent_at = at(clock)
    resent = time_out(completing, 3)

    # the wait counts from the first send of the command, across resends
    assert (
        resent.state.stuck_for(sent_at + timedelta(seconds=STUCK_AFTER_S - 1), STUCK_AFTER_S)
        is None
    )
    assert (
        resent.state.stuck_for(sent_at + timedelta(seconds=STUCK_AFTER_S), STUCK_AFTER_S)
        == STUCK_AFTER_S
    )
    assert resent.state.stuck_for(sent_at + timedelta(seconds=400), STUCK_AFTER_S) == 400
    # and a finished saga is never stuck
    done = on_reply(SAGA, resent.state, succeeded(sent(resent)), sent_at + timedelta(seconds=500))
    assert done.state.stuck_for(sent_at + timedelta(days=1), STUCK_AFTER_S) is None


def test_abort_while_charging_refunds_the_charge_in_flight_then_releases_the_stock() -> None:
    # Given stock reserved and the card being charged
    charging, clock = run_until(ChargePayment)
    charge = sent(charging)

    # When an operator aborts the saga
    aborted = on_abort(SAGA, charging.state, "customer cancelled", OPERATOR, at(clock + 1))

    # Then the request is on the timeline, saying who and why
    assert aborted.ignored is None
    (request,) = entries(aborted.state, "abort_requested")
    assert OPERATOR in request
    assert "customer cancelled" in request
    # and the charge in flight may still happen, so it is refunded first
    assert aborted.state.status is SagaStatus.COMPENSATING
    assert sent_types(aborted) == [("payment", RefundPayment)]
    refund = sent(aborted).command
    assert isinstance(refund, RefundPayment)
    assert refund.amount == Money(amount=Decimal("25.50"), currency="EUR")

    # When the charge's own answer arrives now, it changes nothing
    late = on_reply(SAGA, aborted.state, succeeded(charge), at(clock + 2))
    assert late.ignored
    assert late.state == aborted.state

    # When the refund succeeds, the stock is released
    refunded = answer(aborted, succeeded(sent(aborted)), at(clock + 3))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]

    # and once it is, the saga is COMPENSATED, the reason saying it was aborted and why
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), at(clock + 4))
    state = released.state
    assert state.status is SagaStatus.COMPENSATED
    reason = state.reason or ""
    assert reason.startswith("aborted:")
    assert "customer cancelled" in reason
    event = result(released).event
    assert (event.status, event.reason) == (SagaStatus.COMPENSATED, reason)
    assert ("charge_payment", "compensated") in events(state)
    assert ("reserve_stock", "compensated") in events(state)


def test_abort_past_the_point_of_no_return_is_refused_until_the_saga_is_stuck() -> None:
    completing, clock = run_until(CompleteOrder)
    resent = time_out(completing, 2)

    refused = on_abort(SAGA, resent.state, "customer cancelled", OPERATOR, at(clock + 100))

    assert refused.state == resent.state
    assert refused.outbox == ()
    why = refused.ignored or ""
    assert "CompleteOrder" in why
    assert "point of no return" in why
    assert f"{STUCK_AFTER_S:g}s" in why


def test_abort_of_a_stuck_pivot_ends_failed_and_sends_nothing_to_undo() -> None:
    # Given CompleteOrder unanswered for longer than the stuck threshold
    stuck, complete = stuck_on_complete_order()
    now = due(stuck.state)

    # When an operator aborts the saga
    aborted = on_abort(SAGA, stuck.state, "order service gone", OPERATOR, now)

    # Then it ends FAILED, nothing undone (the order may stand), saying why and by whom
    state = aborted.state
    assert aborted.ignored is None
    assert state.status is SagaStatus.FAILED
    assert sent_types(aborted) == []
    reason = state.outcome or ""
    assert "aborted: order service gone" in reason
    assert "CompleteOrder unanswered" in reason
    (request,) = entries(state, "abort_requested")
    assert OPERATOR in request
    event = result(aborted)
    assert event.announce
    assert event.reply_to == (REPLY_TO,)
    assert (event.event.status, event.event.reason) == (SagaStatus.FAILED, reason)
    # and it is no longer stuck, nor timed out again
    assert state.stuck_for(now + timedelta(days=1), STUCK_AFTER_S) is None
    assert on_deadline(SAGA, state, now + timedelta(days=1), confirmed_at=now).ignored
    assert state.pending == complete.command.message_id


def test_abort_while_compensating_is_refused_until_the_compensation_is_stuck() -> None:
    refused, _ = refunding()
    resent = time_out(refused, 2)

    not_yet = on_abort(SAGA, resent.state, "give up", OPERATOR, after(resent.state))

    assert not_yet.state == resent.state
    assert not_yet.outbox == ()
    assert "RefundPayment" in (not_yet.ignored or "")


def test_abort_of_a_stuck_compensation_ends_failed_naming_what_was_not_undone() -> None:
    # Given the refund unanswered for longer than the stuck threshold
    refused, _ = refunding()
    decision = left_until_stuck(refused)

    # When an operator aborts the saga
    aborted = on_abort(SAGA, decision.state, "card processor gone", OPERATOR, due(decision.state))

    # Then it is FAILED, naming the cause and both compensations left undone
    assert aborted.state.status is SagaStatus.FAILED
    assert sent_types(aborted) == []
    reason = aborted.state.outcome or ""
    assert reason.startswith("order_rejected")
    assert "aborted: card processor gone" in reason
    assert "not compensated: RefundPayment, ReleaseStock" in reason
    assert result(aborted).event.reason == reason


def test_abort_of_a_stuck_compensation_still_names_an_earlier_refused_one() -> None:
    # Given the refund refused (the payment service says the card is closed)...
    refused, clock = refunding()
    releasing = answer(
        refused, failed(sent(refused), "refund_rejected", "card closed"), at(clock + 1)
    )
    # ...and then the stock release unanswered until stuck
    decision = left_until_stuck(releasing)

    # When an operator aborts the saga
    aborted = on_abort(SAGA, decision.state, "inventory gone", OPERATOR, due(decision.state))

    # Then the outcome a person reads names both problems: the refused refund is not forgotten
    reason = aborted.state.outcome or ""
    assert "not compensated: ReleaseStock" in reason
    assert "RefundPayment refused: refund_rejected: card closed" in reason


def completed() -> SagaState:
    completing, clock = run_until(CompleteOrder)
    done = on_reply(SAGA, completing.state, succeeded(sent(completing)), at(clock + 1))
    assert done.state.status is SagaStatus.COMPLETED
    return done.state


def compensated() -> SagaState:
    started = begin()
    done = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))
    assert done.state.status is SagaStatus.COMPENSATED
    return done.state


def failed_saga() -> SagaState:
    return failed_by_abort()[0].state


@pytest.mark.parametrize(
    "saga", [completed, compensated, failed_saga], ids=lambda build: build.__name__
)
def test_abort_of_a_finished_saga_is_ignored(saga: Callable[[], SagaState]) -> None:
    state = saga()

    refused = on_abort(SAGA, state, "customer cancelled", OPERATOR, after(state, 3600))

    assert refused.ignored
    assert refused.outbox == ()
    assert refused.state == state


# --- FAILED is terminal ----------------------------------------------------------------------


def test_a_late_success_of_the_aborted_pivot_is_recorded_and_changes_nothing_else() -> None:
    # Given a saga aborted, FAILED, while CompleteOrder was unanswered
    aborted, complete = failed_by_abort()

    # When the order service's answer finally arrives, saying the order was completed
    late = on_reply(SAGA, aborted.state, succeeded(complete, "order #7"), after(aborted.state))

    # Then a person can see it on the timeline, and nothing else changes: still FAILED,
    # nothing sent, no second terminal event
    state = late.state
    assert state.status is SagaStatus.FAILED
    assert late.outbox == ()
    assert state.outcome == aborted.state.outcome
    (entry,) = entries(state, "late_reply")
    assert "order #7" in entry
    assert state.history[:-1] == aborted.state.history

    # and a second copy of the same answer is ignored
    again = on_reply(SAGA, state, succeeded(complete, "order #7"), after(state))
    assert again.ignored
    assert again.outbox == ()
    assert again.state == state


def test_a_late_refusal_of_the_aborted_pivot_is_recorded_and_undoes_nothing() -> None:
    aborted, complete = failed_by_abort()

    late = on_reply(SAGA, aborted.state, failed(complete, "customer_blocked"), after(aborted.state))

    assert late.state.status is SagaStatus.FAILED
    assert late.outbox == ()
    (entry,) = entries(late.state, "late_reply")
    assert "customer_blocked" in entry


def reply_to_reserve_stock() -> CommandSucceeded:
    return succeeded(sent(begin()))


def reply_to_charge_payment() -> CommandSucceeded:
    return succeeded(sent(run_until(ChargePayment)[0]))


def reply_to_an_unknown_command() -> CommandSucceeded:
    return reply_to_reserve_stock().model_copy(update={"command_id": uuid4()})


@pytest.mark.parametrize(
    "reply",
    [reply_to_reserve_stock, reply_to_charge_payment, reply_to_an_unknown_command],
    ids=lambda build: build.__name__,
)
def test_other_replies_to_a_failed_saga_are_ignored(reply: Callable[[], Reply]) -> None:
    aborted, _ = failed_by_abort()

    stray = on_reply(SAGA, aborted.state, reply(), after(aborted.state))

    assert stray.ignored
    assert stray.outbox == ()
    assert stray.state == aborted.state


def test_nothing_announces_a_failed_saga_a_second_time() -> None:
    aborted, complete = failed_by_abort()
    state = aborted.state
    later = after(state, 3600)

    followers = [
        on_reply(SAGA, state, succeeded(complete), later),
        on_deadline(SAGA, state, later, confirmed_at=later),
        on_abort(SAGA, state, "again", OPERATOR, later),
        on_repeat(state, OTHER_CLIENT, later),
    ]

    assert [announced(d) for d in followers] == [[]] * len(followers)
    assert all(d.state.status is SagaStatus.FAILED for d in followers)


# --- a repeated request gets the answer too --------------------------------------------------


def test_a_repeated_request_for_a_finished_saga_gets_its_result_without_a_second_event() -> None:
    completing, clock = run_until(CompleteOrder)
    done = on_reply(SAGA, completing.state, succeeded(sent(completing)), at(clock + 1))

    repeat = on_repeat(done.state, OTHER_CLIENT, at(clock + 60))

    out = result(repeat)
    assert out.reply_to == (OTHER_CLIENT,)
    assert out.announce is False
    # the same message as the first time, so a client that gets both sees one result
    assert out.event == result(done).event
    assert repeat.state == done.state


def test_a_repeated_request_for_a_running_saga_gets_the_result_when_it_finishes() -> None:
    # Given the card being charged, and the client asking again from another queue
    charging, clock = run_until(ChargePayment)
    repeat = on_repeat(charging.state, OTHER_CLIENT, at(clock + 1))
    assert repeat.outbox == ()
    assert repeat.state.watchers == (OTHER_CLIENT,)
    assert entries(repeat.state, "repeated_request") == [f"result also to {OTHER_CLIENT}"]

    # When the saga finishes
    charged = answer(repeat, succeeded(sent(charging)), at(clock + 2))
    done = on_reply(SAGA, charged.state, succeeded(sent(charged)), at(clock + 3))

    # Then both clients get the result, announced once on saga.events
    out = result(done)
    assert out.reply_to == (REPLY_TO, OTHER_CLIENT)
    assert out.announce


def test_a_repeated_request_for_a_saga_started_without_reply_to_is_answered() -> None:
    charging, clock = run_until(ChargePayment)
    state = charging.state.model_copy(update={"reply_to": None})

    repeat = on_repeat(state, OTHER_CLIENT, at(clock + 1))
    done = on_reply(SAGA, repeat.state, failed(sent(charging), "payment_declined"), at(clock + 2))
    released = on_reply(SAGA, done.state, succeeded(sent(done)), at(clock + 3))

    assert result(released).reply_to == (OTHER_CLIENT,)


@pytest.mark.parametrize("reply_to", [None, REPLY_TO], ids=["no reply_to", "same reply_to"])
def test_a_repeated_request_from_the_same_client_changes_nothing(reply_to: str | None) -> None:
    charging, clock = run_until(ChargePayment)

    repeat = on_repeat(charging.state, reply_to, at(clock + 1))

    assert repeat.ignored
    assert repeat.outbox == ()
    assert repeat.state == charging.state


def test_a_client_that_repeats_twice_gets_the_result_once() -> None:
    charging, clock = run_until(ChargePayment)
    first = on_repeat(charging.state, OTHER_CLIENT, at(clock + 1))

    second = on_repeat(first.state, OTHER_CLIENT, at(clock + 2))

    assert second.ignored
    assert second.state == first.state


def test_the_result_is_the_same_message_every_time() -> None:
    aborted, _ = failed_by_abort()

    assert engine.result(aborted.state) == result(aborted).event
    assert engine.result(aborted.state).message_id == uuid5(SAGA_ID, "finished")


# --- the timeline, ids and stored states -----------------------------------------------------


def test_every_transition_appends_to_the_history_in_time_order() -> None:
    # Given a saga driven through a time-out, a refusal and its compensation
    decisions = [begin()]
    decisions.append(time_out(decisions[-1]))
    decisions.append(answer(decisions[-1], succeeded(sent(decisions[-1])), at(11)))
    decisions.append(answer(decisions[-1], failed(sent(decisions[-1]), "payment_declined"), at(12)))
    decisions.append(answer(decisions[-1], succeeded(sent(decisions[-1])), at(13)))

    # Then each transition kept the earlier entries and added at least one
    for before, later in pairwise(decisions):
        old, new = before.state.history, later.state.history
        assert len(new) > len(old)
        assert new[: len(old)] == old
    # the timestamps never go backwards and the last one is the final transition's time
    history = decisions[-1].state.history
    stamps = [entry.at for entry in history]
    assert stamps == sorted(stamps)
    assert stamps[0] == T0 and stamps[-1] == at(13)
    # and each entry records the state the saga was in
    assert [(e.step, e.event, e.status) for e in history] == [
        ("saga", "started", SagaStatus.RUNNING),
        ("reserve_stock", "sent", SagaStatus.RUNNING),
        ("reserve_stock", "timed_out", SagaStatus.RUNNING),
        ("reserve_stock", "sent", SagaStatus.RUNNING),
        ("reserve_stock", "succeeded", SagaStatus.RUNNING),
        ("charge_payment", "sent", SagaStatus.RUNNING),
        ("charge_payment", "failed", SagaStatus.RUNNING),
        ("saga", "compensating", SagaStatus.COMPENSATING),
        ("reserve_stock", "sent", SagaStatus.COMPENSATING),
        ("reserve_stock", "compensated", SagaStatus.COMPENSATING),
        ("saga", "compensated", SagaStatus.COMPENSATED),
    ]
    assert decisions[-1].state.updated_at == at(13)


def test_command_ids_are_deterministic() -> None:
    # Given the same request started twice (e.g. a redelivered PlaceOrder)
    first = start(SAGA, place_order(), REPLY_TO, T0)
    second = start(SAGA, place_order(), REPLY_TO, at(5))

    # Then the first command has the same id both times, so participants see one command
    assert sent(first).command.message_id == sent(second).command.message_id
    charge_1 = on_reply(SAGA, first.state, succeeded(sent(first)), at(1))
    charge_2 = on_reply(SAGA, second.state, succeeded(sent(second)), at(6))
    assert sent(charge_1).command.message_id == sent(charge_2).command.message_id

    # but each step has its own id, and so does another saga
    assert sent(first).command.message_id != sent(charge_1).command.message_id
    other = start(SAGA, place_order(UUID("5d0c6c0b-9a76-4a4e-8f3e-2c51b7f4d0aa")), None, T0)
    assert sent(other).command.message_id != sent(first).command.message_id


def test_every_send_of_a_step_carries_one_id_forever() -> None:
    # one dedupe contract: whichever path resends a command, participants see the same id
    refused, _ = refunding()
    resent = time_out(refused, 40)

    assert sent(resent).command.message_id == command_id(SAGA_ID, "charge_payment", True)
    assert sent(run_until(CompleteOrder)[0]).command.message_id == command_id(
        SAGA_ID, "complete_order", False
    )


def test_a_compensation_has_an_id_of_its_own() -> None:
    # The participant must not take ReleaseStock for a repeat of ReserveStock.
    started = begin()
    compensating = time_out(started, STEP_ATTEMPTS)

    release = sent(compensating)
    assert isinstance(release.command, ReleaseStock)
    assert release.command.message_id != sent(started).command.message_id
    assert compensating.state.reason == "reserve_stock_timed_out"


def test_a_state_stored_by_the_previous_version_still_loads() -> None:
    state = begin().state
    old = state.model_dump(mode="json", exclude={"watchers", "wait_s", "waiting_since"})
    old |= {"generation": 2, "failed_compensations": [1]}

    loaded = SagaState.model_validate(old)

    assert loaded.saga_id == state.saga_id
    assert loaded.pending == state.pending
    assert loaded.history == state.history


# --- the saga's input is data ----------------------------------------------------------------


def test_commands_are_built_from_the_input_as_the_definition_says() -> None:
    # Given a definition whose first command takes its SKU from another field of the input
    renamed = Call(ReserveStock, lambda data: {"sku": data["replacement"], "quantity": 1})
    step = dataclasses.replace(SAGA.steps[0], command=renamed)
    definition = dataclasses.replace(
        SAGA,
        steps=(step, *SAGA.steps[1:]),
        input=lambda request: {"replacement": "SKU-BLUE-MUG"},
        describe=lambda data: f"swap for {data['replacement']}",
    )

    # When a saga starts
    decision = start(definition, place_order(), REPLY_TO, T0)

    # Then the command and the history come from the definition, not from PlaceOrder's fields
    command = sent(decision).command
    assert isinstance(command, ReserveStock)
    assert (command.sku, command.quantity) == ("SKU-BLUE-MUG", 1)
    assert decision.state.input == {"replacement": "SKU-BLUE-MUG"}
    assert entries(decision.state, "started") == ["swap for SKU-BLUE-MUG"]


def test_a_state_stored_before_sagas_were_generic_reads_back_as_an_order_saga() -> None:
    # Given a running saga as stored by an earlier version: the whole PlaceOrder, no saga name
    reserving = start(SAGA, place_order(), REPLY_TO, T0)
    old = reserving.state.model_dump(mode="json", exclude={"saga", "input"})
    old["request"] = place_order().model_dump(mode="json")

    # When it is read back and its reservation succeeds
    state = SagaState.model_validate_json(json.dumps(old))
    charging = on_reply(SAGA, state, succeeded(sent(reserving)), at(1))

    # Then it is an order saga whose input is the order, and it charges the right amount
    assert state.saga == "order"
    assert state.input == reserving.state.input
    command = sent(charging).command
    assert isinstance(command, ChargePayment)
    assert (command.customer_id, command.amount) == ("cust-42", place_order().amount)

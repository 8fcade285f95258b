"""The saga engine as scenarios: an order placed, participants answering (or not), time passing.

The engine is pure, so every test drives it by hand: it passes ``now`` explicitly, builds the
participants' replies from the commands the engine decided to send, and checks what a user
would see: the status, what was sent to whom, the reason and the timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from uuid import UUID, uuid4

import pytest

from messages.models import (
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
from orchestrator.definition import RetryPolicy, order_saga
from orchestrator.engine import (
    Decision,
    PublishResult,
    SagaState,
    SendCommand,
    on_abort,
    on_deadline,
    on_reply,
    on_retry,
    start,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
STEP_TIMEOUT_S = 10.0
STEP_ATTEMPTS = 3
COMPENSATION_TIMEOUT_S = 5.0
COMPENSATION_ATTEMPTS = 2
SAGA = order_saga(
    RetryPolicy(timeout_s=STEP_TIMEOUT_S, max_attempts=STEP_ATTEMPTS),
    RetryPolicy(timeout_s=COMPENSATION_TIMEOUT_S, max_attempts=COMPENSATION_ATTEMPTS),
)
SAGA_ID = UUID("0b7d3c1e-5f43-4c3a-9a53-1d2f0c9e8a77")
REPLY_TO = "amq.gen-requester"


# --- helpers ---------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    """``seconds`` after the order was placed."""
    return T0 + timedelta(seconds=seconds)


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


def due(state: SagaState) -> datetime:
    """The moment the pending command times out."""
    assert state.deadline is not None, "no command is pending"
    return state.deadline


def events(state: SagaState) -> list[tuple[str, str]]:
    """The timeline as (step, event) pairs."""
    return [(entry.step, entry.event) for entry in state.history]


def run_until(command_type: type[Command]) -> tuple[Decision, float]:
    """Start the saga and let every step succeed, a second apart, until ``command_type`` is
    the pending command. Returns that decision and the time it was taken."""
    decision = start(SAGA, place_order(), REPLY_TO, T0)
    clock = 0.0
    while not isinstance(sent(decision).command, command_type):
        clock += 1
        decision = on_reply(SAGA, decision.state, succeeded(sent(decision)), at(clock))
    return decision, clock


# --- starting and the happy path -------------------------------------------------------------


def test_start_sends_reserve_stock_to_inventory_with_a_deadline() -> None:
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
    assert state.deadline == T0 + timedelta(seconds=STEP_TIMEOUT_S)
    assert state.reply_to == REPLY_TO
    assert decision.ignored is None
    assert events(state) == [("saga", "started"), ("reserve_stock", "sent")]


def test_happy_path_charges_completes_and_publishes_the_full_history() -> None:
    # Given an order whose stock was reserved
    started = start(SAGA, place_order(), REPLY_TO, T0)
    reserved = on_reply(SAGA, started.state, succeeded(sent(started)), at(1))

    # Then the card is charged with the order's customer and amount
    charge = sent(reserved)
    assert charge.participant == "payment"
    assert isinstance(charge.command, ChargePayment)
    assert charge.command.customer_id == "cust-42"
    assert charge.command.amount == Money(amount=Decimal("25.50"), currency="EUR")
    assert reserved.state.deadline == at(1 + STEP_TIMEOUT_S)

    # When the payment succeeds, the order is completed with all of the order's fields
    charged = on_reply(SAGA, reserved.state, succeeded(charge), at(2))
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
    assert state.pending is None and state.deadline is None
    published = result(done)
    assert published.reply_to == REPLY_TO
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
    declined = on_reply(
        SAGA,
        charging.state,
        failed(sent(charging), "payment_declined", "insufficient funds"),
        at(clock + 1),
    )

    # Then only the stock is released (nothing was charged, so nothing is refunded)
    assert declined.state.status is SagaStatus.COMPENSATING
    assert sent_types(declined) == [("inventory", ReleaseStock)]
    release = sent(declined).command
    assert isinstance(release, ReleaseStock)
    assert (release.sku, release.quantity) == ("SKU-RED-MUG", 3)
    assert declined.state.deadline == at(clock + 1 + COMPENSATION_TIMEOUT_S)

    # When the release succeeds, the saga is COMPENSATED, saying why
    released = on_reply(SAGA, declined.state, succeeded(sent(declined)), at(clock + 2))
    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.reason == "payment_declined"
    event = result(released).event
    assert (event.status, event.reason) == (SagaStatus.COMPENSATED, "payment_declined")
    assert ("charge_payment", "failed") in events(released.state)
    assert ("reserve_stock", "compensated") in events(released.state)


def test_out_of_stock_on_the_first_step_compensates_without_sending_anything() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)

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


def test_failed_complete_order_refunds_then_releases_in_that_order() -> None:
    # Given stock reserved, card charged and the order being completed
    completing, clock = run_until(CompleteOrder)

    # When the order service refuses
    refused = on_reply(
        SAGA, completing.state, failed(sent(completing), "order_rejected"), at(clock + 1)
    )
    # Then the payment is refunded first...
    assert refused.state.status is SagaStatus.COMPENSATING
    refund = sent(refused)
    assert refund.participant == "payment"
    assert isinstance(refund.command, RefundPayment)
    assert refund.command.amount.amount == Decimal("25.50")

    # ...and the stock released only once the refund is confirmed
    refunded = on_reply(SAGA, refused.state, succeeded(refund), at(clock + 2))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), at(clock + 3))

    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.reason == "order_rejected"
    assert result(released).event.status is SagaStatus.COMPENSATED


# --- duplicate, late and stray replies -------------------------------------------------------


def test_a_duplicate_reply_changes_nothing_the_second_time() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)
    reply = succeeded(sent(started))
    first = on_reply(SAGA, started.state, reply, at(1))

    again = on_reply(SAGA, first.state, reply, at(2))

    assert again.ignored
    assert again.outbox == ()
    assert again.state == first.state


def test_a_late_reply_to_an_earlier_command_is_ignored() -> None:
    # Given ReserveStock was resent after a time-out and the first answer moved the saga on
    started = start(SAGA, place_order(), REPLY_TO, T0)
    resent = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S))
    reserve = sent(resent)
    charging = on_reply(SAGA, resent.state, succeeded(reserve), at(STEP_TIMEOUT_S + 1))

    # When the answer to the other send arrives, even a contradicting one
    late = on_reply(SAGA, charging.state, failed(reserve, "out_of_stock"), at(STEP_TIMEOUT_S + 2))

    # Then it is ignored: still charging the card, nothing compensated
    assert late.ignored
    assert late.outbox == ()
    assert late.state == charging.state
    assert late.state.status is SagaStatus.RUNNING


def test_a_reply_that_arrives_after_its_step_timed_out_and_compensation_began_is_ignored() -> None:
    # Given ChargePayment timed out for good and the saga is refunding
    charging, clock = run_until(ChargePayment)
    decision = charging
    for attempt in range(STEP_ATTEMPTS):
        clock += STEP_TIMEOUT_S * 2**attempt
        decision = on_deadline(SAGA, decision.state, at(clock))
    assert decision.state.status is SagaStatus.COMPENSATING

    # When the payment service finally says the charge went through
    late = on_reply(SAGA, decision.state, succeeded(sent(charging)), at(clock + 1))

    # Then the refund stays pending
    assert late.ignored
    assert late.state == decision.state
    assert isinstance(sent(decision).command, RefundPayment)


def test_a_reply_for_a_finished_saga_is_ignored() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)
    finished = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))
    assert finished.state.status.finished

    stray = on_reply(SAGA, finished.state, succeeded(sent(started)), at(2))

    assert stray.ignored
    assert stray.outbox == ()
    assert stray.state == finished.state


# --- time-outs -------------------------------------------------------------------------------


def test_a_deadline_that_has_not_passed_is_ignored() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)

    early = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S - 0.001))

    assert early.ignored
    assert early.outbox == ()
    assert early.state == started.state


def test_a_deadline_on_a_finished_saga_is_ignored() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)
    finished = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))

    later = on_deadline(SAGA, finished.state, at(3600))

    assert later.ignored
    assert later.state == finished.state


def test_a_timed_out_command_is_resent_with_the_same_id_and_a_longer_deadline() -> None:
    started = start(SAGA, place_order(), REPLY_TO, T0)
    first = sent(started).command

    # When the first deadline passes, the same command goes out again
    second = on_deadline(SAGA, started.state, at(STEP_TIMEOUT_S))
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
    third = on_deadline(SAGA, second.state, due(second.state))
    assert sent(third).command.message_id == first.message_id
    assert third.state.attempt == 3
    assert third.state.deadline == at(3 * STEP_TIMEOUT_S + 4 * STEP_TIMEOUT_S)
    assert [e.detail for e in third.state.history if e.event == "timed_out"] == [
        "ReserveStock attempt 1",
        "ReserveStock attempt 2",
    ]


def test_the_wait_between_resends_is_capped_by_max_wait() -> None:
    capped = order_saga(
        RetryPolicy(timeout_s=10, max_attempts=5, backoff=10, max_wait_s=30),
        RetryPolicy(timeout_s=5, max_attempts=2),
    )
    started = start(capped, place_order(), REPLY_TO, T0)

    resent = on_deadline(capped, started.state, at(10))

    assert resent.state.deadline == at(10 + 30)


def test_a_step_that_never_answers_is_compensated_too() -> None:
    # Given stock reserved and ChargePayment sent
    charging, clock = run_until(ChargePayment)
    charge_id = sent(charging).command.message_id

    # When every attempt times out
    decision = charging
    resends = []
    for attempt in range(1, STEP_ATTEMPTS + 1):
        clock += STEP_TIMEOUT_S * 2 ** (attempt - 1)
        assert decision.state.deadline == at(clock)
        decision = on_deadline(SAGA, decision.state, at(clock))
        resends.append(decision)

    # Then it was resent up to max_attempts with the same id, then the saga compensates:
    # the charge may have happened, so it is refunded, then the stock is released
    assert [sent(d).command.message_id for d in resends[:-1]] == [charge_id] * (STEP_ATTEMPTS - 1)
    giving_up = resends[-1]
    assert giving_up.state.status is SagaStatus.COMPENSATING
    assert giving_up.state.reason == "charge_payment_timed_out"
    assert sent_types(giving_up) == [("payment", RefundPayment)]
    refunded = on_reply(SAGA, giving_up.state, succeeded(sent(giving_up)), at(clock + 1))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), at(clock + 2))
    assert released.state.status is SagaStatus.COMPENSATED
    assert result(released).event.reason == "charge_payment_timed_out"


def test_a_complete_order_that_never_answers_ends_failed_with_its_effect_unknown() -> None:
    # Given the order is being completed
    completing, _ = run_until(CompleteOrder)

    # When every attempt times out
    decision = completing
    for _ in range(STEP_ATTEMPTS):
        decision = on_deadline(SAGA, decision.state, due(decision.state))

    # Then nothing is undone (CompleteOrder has no compensation): a person must look
    assert decision.state.status is SagaStatus.FAILED
    reason = decision.state.outcome or ""
    assert "CompleteOrder" in reason
    assert "unknown" in reason
    assert sent_types(decision) == []
    event = result(decision).event
    assert (event.status, event.reason) == (SagaStatus.FAILED, reason)


# --- compensations that go wrong -------------------------------------------------------------


def test_an_unanswered_compensation_is_resent_then_skipped_and_the_saga_fails() -> None:
    # Given the order was refused, so the payment is being refunded
    completing, clock = run_until(CompleteOrder)
    refunding = on_reply(
        SAGA, completing.state, failed(sent(completing), "order_rejected"), at(clock + 1)
    )
    refund = sent(refunding)
    assert isinstance(refund.command, RefundPayment)

    # When the refund is never answered
    decision = refunding
    decisions = []
    for _ in range(COMPENSATION_ATTEMPTS):
        decision = on_deadline(SAGA, decision.state, due(decision.state))
        decisions.append(decision)

    # Then it is resent (same id, compensation time-out with backoff) up to its max attempts
    resent = decisions[0]
    assert sent(resent).command.message_id == refund.command.message_id
    assert resent.state.attempt == 2
    assert resent.state.deadline == due(refunding.state) + timedelta(
        seconds=2 * COMPENSATION_TIMEOUT_S
    )
    # and then the engine moves on to releasing the stock
    moved_on = decisions[-1]
    assert moved_on.state.status is SagaStatus.COMPENSATING
    assert sent_types(moved_on) == [("inventory", ReleaseStock)]

    # When the release succeeds, the saga ends FAILED, naming the refund left unanswered
    released = on_reply(
        SAGA,
        moved_on.state,
        succeeded(sent(moved_on)),
        moved_on.state.updated_at + timedelta(seconds=1),
    )
    assert released.state.status is SagaStatus.FAILED
    reason = released.state.outcome or ""
    assert "order_rejected" in reason
    assert f"RefundPayment unanswered after {COMPENSATION_ATTEMPTS} attempts" in reason
    assert result(released).event.status is SagaStatus.FAILED


def test_a_refused_compensation_ends_failed_after_the_remaining_compensations() -> None:
    # Given the order was refused, so the payment is being refunded
    completing, clock = run_until(CompleteOrder)
    refunding = on_reply(
        SAGA, completing.state, failed(sent(completing), "order_rejected"), at(clock + 1)
    )

    # When the payment service refuses the refund
    refused = on_reply(
        SAGA,
        refunding.state,
        failed(sent(refunding), "refund_rejected", "card closed"),
        at(clock + 2),
    )

    # Then the stock is still released, and the saga ends FAILED rather than COMPENSATED
    assert refused.state.status is SagaStatus.COMPENSATING
    assert sent_types(refused) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refused.state, succeeded(sent(refused)), at(clock + 3))
    assert released.state.status is SagaStatus.FAILED
    reason = released.state.outcome or ""
    assert "order_rejected" in reason
    assert "RefundPayment refused: refund_rejected: card closed" in reason
    assert ("charge_payment", "compensation_failed") in events(released.state)
    assert ("reserve_stock", "compensated") in events(released.state)
    assert result(released).event.status is SagaStatus.FAILED


def test_the_last_compensation_left_unanswered_also_ends_failed() -> None:
    # Given the card was declined, so only the stock is being released
    charging, clock = run_until(ChargePayment)
    releasing = on_reply(
        SAGA, charging.state, failed(sent(charging), "payment_declined"), at(clock + 1)
    )

    # When the release is never answered
    decision = releasing
    for _ in range(COMPENSATION_ATTEMPTS):
        decision = on_deadline(SAGA, decision.state, due(decision.state))

    # Then there is nothing left to send and the saga is FAILED
    assert decision.state.status is SagaStatus.FAILED
    assert "ReleaseStock unanswered" in (decision.state.outcome or "")
    assert result(decision).event.status is SagaStatus.FAILED


# --- the timeline and determinism ------------------------------------------------------------


def test_every_transition_appends_to_the_history_in_time_order() -> None:
    # Given a saga driven through a time-out, a refusal and its compensation
    decisions = [start(SAGA, place_order(), REPLY_TO, T0)]
    decisions.append(on_deadline(SAGA, decisions[-1].state, at(STEP_TIMEOUT_S)))
    decisions.append(on_reply(SAGA, decisions[-1].state, succeeded(sent(decisions[-1])), at(11)))
    decisions.append(
        on_reply(SAGA, decisions[-1].state, failed(sent(decisions[-1]), "payment_declined"), at(12))
    )
    decisions.append(on_reply(SAGA, decisions[-1].state, succeeded(sent(decisions[-1])), at(13)))

    # Then each transition kept the earlier entries and added at least one
    for before, after in pairwise(decisions):
        old, new = before.state.history, after.state.history
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


def test_a_compensation_has_an_id_of_its_own() -> None:
    # The participant must not take ReleaseStock for a repeat of ReserveStock.
    started = start(SAGA, place_order(), REPLY_TO, T0)
    compensating = on_deadline(
        SAGA,
        on_deadline(SAGA, on_deadline(SAGA, started.state, at(10)).state, at(30)).state,
        at(70),
    )

    release = sent(compensating)
    assert isinstance(release.command, ReleaseStock)
    assert release.command.message_id != sent(started).command.message_id
    assert compensating.state.reason == "reserve_stock_timed_out"


# --- operator actions: abort and retry -------------------------------------------------------

OPERATOR = "alice@ops"


def after(state: SagaState, seconds: float = 1.0) -> datetime:
    """``seconds`` after the saga's last transition."""
    return state.updated_at + timedelta(seconds=seconds)


def entries(state: SagaState, event: str) -> list[str]:
    """The details of the saga-level history entries named ``event``."""
    return [e.detail for e in state.history if e.step == "saga" and e.event == event]


def time_out(decision: Decision, times: int) -> Decision:
    """Let the pending command's deadline pass ``times`` times in a row."""
    for _ in range(times):
        decision = on_deadline(SAGA, decision.state, due(decision.state))
    return decision


def failed_after_an_unanswered_refund() -> tuple[Decision, SendCommand]:
    """The order was refused, the refund never answered, the stock released: FAILED.
    Returns that decision and the RefundPayment that went unanswered."""
    completing, clock = run_until(CompleteOrder)
    refunding = on_reply(
        SAGA, completing.state, failed(sent(completing), "order_rejected"), at(clock + 1)
    )
    refund = sent(refunding)
    assert isinstance(refund.command, RefundPayment)
    releasing = time_out(refunding, COMPENSATION_ATTEMPTS)
    assert sent_types(releasing) == [("inventory", ReleaseStock)]
    done = on_reply(SAGA, releasing.state, succeeded(sent(releasing)), after(releasing.state))
    assert done.state.status is SagaStatus.FAILED
    assert "RefundPayment unanswered" in (done.state.outcome or "")
    return done, refund


def failed_after_an_unanswered_complete_order() -> tuple[Decision, SendCommand]:
    """CompleteOrder (the pivot, no compensation) never answered: FAILED, effect unknown.
    Returns that decision and the CompleteOrder that went unanswered."""
    completing, _ = run_until(CompleteOrder)
    done = time_out(completing, STEP_ATTEMPTS)
    assert done.state.status is SagaStatus.FAILED
    return done, sent(completing)


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
    refunded = on_reply(SAGA, aborted.state, succeeded(sent(aborted)), at(clock + 3))
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


def completing_order() -> SagaState:
    return run_until(CompleteOrder)[0].state


def completed() -> SagaState:
    completing, clock = run_until(CompleteOrder)
    done = on_reply(SAGA, completing.state, succeeded(sent(completing)), at(clock + 1))
    assert done.state.status is SagaStatus.COMPLETED
    return done.state


def compensated() -> SagaState:
    started = start(SAGA, place_order(), REPLY_TO, T0)
    done = on_reply(SAGA, started.state, failed(sent(started), "out_of_stock"), at(1))
    assert done.state.status is SagaStatus.COMPENSATED
    return done.state


def compensating() -> SagaState:
    charging, clock = run_until(ChargePayment)
    declined = on_reply(
        SAGA, charging.state, failed(sent(charging), "payment_declined"), at(clock + 1)
    )
    assert declined.state.status is SagaStatus.COMPENSATING
    return declined.state


def failed_saga() -> SagaState:
    return failed_after_an_unanswered_complete_order()[0].state


def running() -> SagaState:
    return run_until(ChargePayment)[0].state


@pytest.mark.parametrize(
    "saga",
    [completing_order, completed, compensated, failed_saga, compensating],
    ids=lambda build: build.__name__,
)
def test_abort_is_refused_when_there_is_nothing_it_could_undo(
    saga: Callable[[], SagaState],
) -> None:
    state = saga()

    refused = on_abort(SAGA, state, "customer cancelled", OPERATOR, after(state))

    assert refused.ignored
    assert refused.outbox == ()
    assert refused.state == state
    assert entries(refused.state, "abort_requested") == []


def test_abort_while_completing_the_order_says_to_wait_for_it() -> None:
    state = completing_order()

    refused = on_abort(SAGA, state, "customer cancelled", OPERATOR, after(state))

    assert "complete_order" in (refused.ignored or "")


def test_retry_after_an_unanswered_refund_resends_it_under_a_new_id_and_can_compensate() -> None:
    # Given a saga that ended FAILED because RefundPayment was never answered
    failed_saga, first_refund = failed_after_an_unanswered_refund()
    first_result = result(failed_saga).event
    assert first_result.status is SagaStatus.FAILED

    # When an operator retries it
    now = after(failed_saga.state)
    retried = on_retry(SAGA, failed_saga.state, "payment service is back", OPERATOR, now)

    # Then the refund (and only the refund: the stock was released) goes out again, under a
    # new id so that the payment service decides afresh
    assert retried.ignored is None
    assert retried.state.status is SagaStatus.COMPENSATING
    refund = sent(retried)
    assert refund.participant == "payment"
    assert isinstance(refund.command, RefundPayment)
    assert refund.command.message_id != first_refund.command.message_id
    assert refund.command.model_dump(exclude={"message_id", "created_at"}) == (
        first_refund.command.model_dump(exclude={"message_id", "created_at"})
    )
    assert retried.state.pending == refund.command.message_id
    assert retried.state.deadline == now + timedelta(seconds=COMPENSATION_TIMEOUT_S)
    (request,) = entries(retried.state, "retry_requested")
    assert OPERATOR in request
    assert "payment service is back" in request

    # When the refund succeeds this time, the saga is COMPENSATED, not FAILED
    done = on_reply(SAGA, retried.state, succeeded(refund), after(retried.state))
    state = done.state
    assert state.status is SagaStatus.COMPENSATED
    assert sent_types(done) == []
    # and announced anew: a different message, not a duplicate of the FAILED one
    event = result(done).event
    assert event.status is SagaStatus.COMPENSATED
    assert event.message_id != first_result.message_id
    # with the original cause, and no trace of the failure that is now resolved
    assert state.outcome == "order_rejected"
    assert event.reason == "order_rejected"
    assert "unanswered" not in (state.outcome or "")


def test_retry_after_an_unanswered_complete_order_resends_it_and_can_complete() -> None:
    # Given a saga that ended FAILED because CompleteOrder was never answered
    failed_saga, first = failed_after_an_unanswered_complete_order()
    first_result = result(failed_saga).event

    # When an operator retries it
    now = after(failed_saga.state)
    retried = on_retry(SAGA, failed_saga.state, "order service fixed", OPERATOR, now)

    # Then CompleteOrder goes out again, as a first attempt under a new id
    assert retried.ignored is None
    assert retried.state.status is SagaStatus.RUNNING
    assert retried.state.reason is None
    complete = sent(retried)
    assert complete.participant == "order"
    assert isinstance(complete.command, CompleteOrder)
    assert complete.command.message_id != first.command.message_id
    assert retried.state.pending == complete.command.message_id
    assert retried.state.attempt == 1
    assert retried.state.deadline == now + timedelta(seconds=STEP_TIMEOUT_S)
    (request,) = entries(retried.state, "retry_requested")
    assert OPERATOR in request
    assert "order service fixed" in request

    # When the order service confirms, the saga is COMPLETED and announced anew
    done = on_reply(SAGA, retried.state, succeeded(complete), after(retried.state))
    assert done.state.status is SagaStatus.COMPLETED
    assert done.state.outcome is None
    event = result(done).event
    assert (event.status, event.reason) == (SagaStatus.COMPLETED, None)
    assert event.message_id != first_result.message_id


@pytest.mark.parametrize(
    "saga",
    [running, completing_order, compensating, completed, compensated],
    ids=lambda build: build.__name__,
)
def test_retry_is_refused_unless_the_saga_failed(saga: Callable[[], SagaState]) -> None:
    state = saga()

    refused = on_retry(SAGA, state, "try again", OPERATOR, after(state))

    assert refused.ignored
    assert refused.outbox == ()
    assert refused.state == state
    assert entries(refused.state, "retry_requested") == []


def test_a_late_success_of_the_timed_out_complete_order_completes_the_failed_saga() -> None:
    # Given a saga that ended FAILED because CompleteOrder was never answered
    failed_saga, complete = failed_after_an_unanswered_complete_order()
    first_result = result(failed_saga).event

    # When the order service's answer finally arrives, saying the order was completed
    late = on_reply(
        SAGA, failed_saga.state, succeeded(complete, "order #7"), after(failed_saga.state)
    )

    # Then the question is settled: the saga is COMPLETED, and says how
    state = late.state
    assert late.ignored is None
    assert state.status is SagaStatus.COMPLETED
    assert state.outcome is None
    assert state.pending is None
    assert sent_types(late) == []
    assert entries(state, "late_reply")
    assert ("complete_order", "succeeded") in events(state)
    event = result(late).event
    assert (event.status, event.reason) == (SagaStatus.COMPLETED, None)
    assert event.message_id != first_result.message_id

    # and the same answer again changes nothing
    again = on_reply(SAGA, state, succeeded(complete, "order #7"), after(state))
    assert again.ignored
    assert again.outbox == ()
    assert again.state == state


def test_a_late_refusal_of_the_timed_out_complete_order_compensates_the_failed_saga() -> None:
    # Given a saga that ended FAILED because CompleteOrder was never answered
    failed_saga, complete = failed_after_an_unanswered_complete_order()

    # When the order service's answer finally arrives, saying it refused the order
    late = on_reply(
        SAGA, failed_saga.state, failed(complete, "customer_blocked"), after(failed_saga.state)
    )

    # Then what was done is undone: the payment refunded, then the stock released
    assert late.ignored is None
    assert late.state.status is SagaStatus.COMPENSATING
    assert entries(late.state, "late_reply")
    assert sent_types(late) == [("payment", RefundPayment)]
    refunded = on_reply(SAGA, late.state, succeeded(sent(late)), after(late.state))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]
    released = on_reply(SAGA, refunded.state, succeeded(sent(refunded)), after(refunded.state))
    assert released.state.status is SagaStatus.COMPENSATED
    assert released.state.outcome == "customer_blocked"
    assert result(released).event.status is SagaStatus.COMPENSATED


def reply_to_reserve_stock() -> CommandSucceeded:
    return succeeded(sent(start(SAGA, place_order(), REPLY_TO, T0)))


def reply_to_charge_payment() -> CommandSucceeded:
    return succeeded(sent(run_until(ChargePayment)[0]))


def reply_to_an_unknown_command() -> CommandSucceeded:
    return succeeded(sent(start(SAGA, place_order(), REPLY_TO, T0))).model_copy(
        update={"command_id": uuid4()}
    )


@pytest.mark.parametrize(
    "reply",
    [reply_to_reserve_stock, reply_to_charge_payment, reply_to_an_unknown_command],
    ids=lambda build: build.__name__,
)
def test_other_replies_to_a_failed_saga_are_still_ignored(reply: Callable[[], Reply]) -> None:
    failed_saga, _ = failed_after_an_unanswered_complete_order()

    stray = on_reply(SAGA, failed_saga.state, reply(), after(failed_saga.state))

    assert stray.ignored
    assert stray.outbox == ()
    assert stray.state == failed_saga.state


def test_a_late_answer_to_an_unanswered_compensation_does_not_reopen_a_failed_saga() -> None:
    # Given a saga that ended FAILED because RefundPayment was never answered
    failed_saga, refund = failed_after_an_unanswered_refund()

    # When the refund's answer arrives after all, it is ignored: an operator retries instead
    late = on_reply(SAGA, failed_saga.state, succeeded(refund), after(failed_saga.state))

    assert late.ignored
    assert late.outbox == ()
    assert late.state == failed_saga.state

"""The operator's "retry now": the pending command sent again at once, as its next attempt.

A participant back from an outage should not wait for a resend that backoff has pushed up to
a minute away. Scenarios in the style of test_engine.py, whose helpers they use.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from messages.contract.models import (
    ChargePayment,
    CompleteOrder,
    RefundPayment,
    ReleaseStock,
    SagaStatus,
)
from orchestrator import metrics
from orchestrator.engine import SagaState, on_abort, on_deadline, on_reply, on_retry
from tests.unit.test_engine import (
    OPERATOR,
    SAGA,
    STEP_ATTEMPTS,
    after,
    compensated,
    completed,
    due,
    entries,
    failed_saga,
    refunding,
    run_until,
    sent,
    sent_types,
    stuck_on_complete_order,
    succeeded,
    time_out,
)

WHY = "payment service is back"


def test_retry_sends_the_pending_command_now_as_its_next_attempt_with_the_same_id() -> None:
    # Given ChargePayment timed out once, its second attempt waiting 20 s for an answer
    charging, _ = run_until(ChargePayment)
    resent = time_out(charging)
    before = resent.state
    assert before.attempt == 2
    now = after(before, 2)

    # When an operator retries it, long before its deadline
    retried = on_retry(SAGA, before, WHY, OPERATOR, now)

    # Then the same command goes to the payment service at once, as attempt 3
    assert retried.ignored is None
    assert sent_types(retried) == [("payment", ChargePayment)]
    assert sent(retried).command.message_id == sent(charging).command.message_id
    state = retried.state
    assert state.status is SagaStatus.RUNNING
    assert (state.attempt, state.pending) == (3, before.pending)
    assert retried.done == "ChargePayment sent again, attempt 3"
    # timed as a resend: its own wait from now, stuck still counted from the first send
    assert state.sent_at == now
    assert state.wait_s == SAGA.steps[1].retry.wait_s(3)
    assert state.deadline == now + timedelta(seconds=state.wait_s)
    assert state.waiting_since == before.waiting_since
    # and the timeline says who asked and why, then the resend as the next attempt
    (requested,) = entries(state, "retry_requested")
    assert requested == f"by {OPERATOR}: {WHY}"
    last = state.history[-2:]
    assert [(e.step, e.event) for e in last] == [
        ("saga", "retry_requested"),
        ("charge_payment", "sent"),
    ]
    assert (last[1].detail, last[1].attempt) == ("ChargePayment attempt 3", 3)


def test_the_deadline_of_the_attempt_a_retry_replaced_no_longer_fires() -> None:
    charging, _ = run_until(ChargePayment)
    old_deadline = due(charging.state)

    retried = on_retry(SAGA, charging.state, WHY, OPERATOR, after(charging.state))

    assert on_deadline(SAGA, retried.state, old_deadline, old_deadline).ignored
    assert due(retried.state) > old_deadline


def test_the_answer_to_a_retried_command_moves_the_saga_on() -> None:
    charging, _ = run_until(ChargePayment)
    retried = on_retry(SAGA, charging.state, WHY, OPERATOR, after(charging.state))

    charged = on_reply(SAGA, retried.state, succeeded(sent(retried)), after(retried.state))

    assert sent_types(charged) == [("order", CompleteOrder)]


def test_a_retry_of_the_pivot_resent_for_long_is_on_the_timeline_and_counted() -> None:
    # Given CompleteOrder resent until its 7th attempt, which the history no longer records
    completing, _ = run_until(CompleteOrder)
    resent = time_out(completing, 6)
    assert resent.state.attempt == 7
    recorded = [e.attempt for e in resent.state.history if e.event == "sent"]
    assert 7 not in recorded
    retries_before = retries("complete_order")

    # When an operator retries it
    retried = on_retry(SAGA, resent.state, WHY, OPERATOR, after(resent.state))

    # Then the 8th attempt is recorded all the same, and counted as a retry
    assert retried.done == "CompleteOrder sent again, attempt 8"
    assert [e.attempt for e in retried.state.history if e.event == "sent"][-1] == 8
    metrics.observe(retried.state.history, len(resent.state.history))
    assert retries("complete_order") == retries_before + 1


def test_a_retry_while_compensating_resends_the_compensation() -> None:
    # Given the order refused, and the refund unanswered twice
    refused, _ = refunding()
    resent = time_out(refused, 2)

    retried = on_retry(SAGA, resent.state, WHY, OPERATOR, after(resent.state))

    assert retried.state.status is SagaStatus.COMPENSATING
    assert sent_types(retried) == [("payment", RefundPayment)]
    assert sent(retried).command.message_id == sent(refused).command.message_id
    assert retried.state.attempt == 4
    assert retried.done == "RefundPayment sent again, attempt 4"
    # and once the refund is answered, the rest of the compensation runs as always
    refunded = on_reply(SAGA, retried.state, succeeded(sent(retried)), after(retried.state))
    assert sent_types(refunded) == [("inventory", ReleaseStock)]


def test_a_retry_uses_up_an_attempt_of_a_step_that_gives_up_then_is_refused() -> None:
    # Given ChargePayment on its next-to-last attempt (it may be sent STEP_ATTEMPTS times)
    charging, _ = run_until(ChargePayment)
    resent = time_out(charging, STEP_ATTEMPTS - 2)

    # When an operator retries it, that is its last attempt
    last = on_retry(SAGA, resent.state, WHY, OPERATOR, after(resent.state))
    assert last.state.attempt == STEP_ATTEMPTS

    # Then a second retry is refused, and the deadline compensates it as always
    again = on_retry(SAGA, last.state, "once more", OPERATOR, after(last.state))
    assert again.state == last.state
    assert again.outbox == ()
    why = again.ignored or ""
    assert f"ChargePayment has had all {STEP_ATTEMPTS} of its attempts" in why
    assert "charge_payment is compensated" in why
    assert time_out(last).state.status is SagaStatus.COMPENSATING


def test_a_retry_of_a_failed_saga_is_refused_failed_is_final() -> None:
    state = failed_saga()
    assert state.pending is not None  # the aborted CompleteOrder: still, nothing is resent

    refused = on_retry(SAGA, state, WHY, OPERATOR, after(state))

    assert refused.state == state
    assert refused.outbox == ()
    assert "FAILED, which is final" in (refused.ignored or "")
    assert "a person settles it" in (refused.ignored or "")


@pytest.mark.parametrize("saga", [completed, compensated], ids=lambda build: build.__name__)
def test_a_retry_of_a_saga_that_ended_well_is_refused(saga: Callable[[], SagaState]) -> None:
    state = saga()

    refused = on_retry(SAGA, state, WHY, OPERATOR, after(state))

    assert refused.state == state
    assert refused.outbox == ()
    assert refused.ignored == f"saga is already {state.status}: nothing to retry"


def test_a_retry_of_a_saga_waiting_for_nothing_is_refused() -> None:
    charging, _ = run_until(ChargePayment)
    idle = charging.state.model_copy(update={"pending": None})

    refused = on_retry(SAGA, idle, WHY, OPERATOR, after(idle))

    assert refused.state == idle
    assert refused.ignored == "saga is RUNNING but waits for no reply"


# --- what an accepted abort says it did (the operator's answer) ------------------------------


def test_an_abort_before_the_pivot_says_which_compensation_it_sent() -> None:
    charging, _ = run_until(ChargePayment)

    aborted = on_abort(SAGA, charging.state, "customer called", OPERATOR, after(charging.state))

    assert aborted.done == "compensating: RefundPayment sent"


def test_an_abort_of_a_stuck_saga_says_how_it_ended() -> None:
    stuck, _ = stuck_on_complete_order()

    aborted = on_abort(SAGA, stuck.state, "order service gone", OPERATOR, due(stuck.state))

    assert aborted.done == "saga ended FAILED"


def test_a_refused_abort_says_nothing_was_done() -> None:
    state = completed()

    assert on_abort(SAGA, state, "too late", OPERATOR, after(state)).done is None


def retries(step: str) -> float:
    return REGISTRY.get_sample_value("saga_retries_total", {"step": step}) or 0.0

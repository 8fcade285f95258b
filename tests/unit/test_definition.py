"""The saga as data: step kinds around the pivot, and the retry policy's growing wait.

A definition the engine could not run safely is refused when it is built, with an error
that names the saga and the step, before a single order is placed.
"""

from __future__ import annotations

import pytest

from messages.contract.models import (
    ChargePayment,
    CompleteOrder,
    PlaceOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)
from messages.errors import ConfigurationError, DefinitionError
from orchestrator.definition import (
    Call,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
    order_saga,
    pick,
)

BOUNDED = RetryPolicy(timeout_s=10, max_attempts=3)
UNTIL_ANSWERED = RetryPolicy(timeout_s=10)
RESERVE = Call(ReserveStock, pick("sku", "quantity"))
RELEASE = Call(ReleaseStock, pick("sku", "quantity"))
CHARGE = Call(ChargePayment, pick("customer_id", "amount"))
REFUND = Call(RefundPayment, pick("customer_id", "amount"))
COMPLETE = Call(CompleteOrder, pick("customer_id", "sku", "quantity", "amount"))


def reserve(retry: RetryPolicy = BOUNDED) -> Step:
    return Step("reserve_stock", "inventory", StepKind.COMPENSATABLE, RESERVE, RELEASE, retry)


def charge(kind: StepKind = StepKind.COMPENSATABLE, retry: RetryPolicy = BOUNDED) -> Step:
    compensation = REFUND if kind is StepKind.COMPENSATABLE else None
    return Step("charge_payment", "payment", kind, CHARGE, compensation, retry)


def complete(kind: StepKind = StepKind.PIVOT, retry: RetryPolicy = UNTIL_ANSWERED) -> Step:
    return Step("complete_order", "order", kind, COMPLETE, None, retry)


def saga(*steps: Step, compensation_retry: RetryPolicy = UNTIL_ANSWERED) -> SagaDefinition:
    return SagaDefinition("shop", PlaceOrder, tuple(steps), compensation_retry)


# --- what is accepted ------------------------------------------------------------------------


def test_the_order_saga_is_two_compensatable_steps_then_the_pivot() -> None:
    order = order_saga(step_timeout_s=2, step_max_attempts=4, backoff=3, max_wait_s=30)

    assert [(s.name, s.kind) for s in order.steps] == [
        ("reserve_stock", StepKind.COMPENSATABLE),
        ("charge_payment", StepKind.COMPENSATABLE),
        ("complete_order", StepKind.PIVOT),
    ]
    # before the pivot a step gives up after its attempts; the pivot and compensations never do
    assert [s.retry.max_attempts for s in order.steps] == [4, 4, None]
    assert order.compensation_retry.max_attempts is None
    assert {(s.retry.timeout_s, s.retry.backoff, s.retry.max_wait_s) for s in order.steps} == {
        (2, 3, 30)
    }


def test_a_retriable_step_after_the_pivot_is_accepted() -> None:
    charge_on_delivery = saga(reserve(), complete(), charge(StepKind.RETRIABLE, UNTIL_ANSWERED))

    assert charge_on_delivery.steps[-1].kind is StepKind.RETRIABLE


def test_a_saga_without_a_pivot_is_accepted() -> None:
    assert len(saga(reserve(), charge()).steps) == 2


# --- what is refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "complaint"),
    [
        ((), "has no steps"),
        ((reserve(), complete(), charge()), "compensatable step cannot follow the pivot"),
        ((reserve(), charge(StepKind.RETRIABLE, UNTIL_ANSWERED), complete()), "must follow"),
        ((reserve(), complete(), complete()), "more than one pivot"),
        (
            (
                Step(
                    "reserve_stock",
                    "inventory",
                    StepKind.COMPENSATABLE,
                    RESERVE,
                    None,
                    BOUNDED,
                ),
            ),
            "needs a compensation",
        ),
        (
            (
                reserve(),
                Step(
                    "complete_order",
                    "order",
                    StepKind.PIVOT,
                    COMPLETE,
                    REFUND,
                    UNTIL_ANSWERED,
                ),
            ),
            "cannot be compensated",
        ),
        ((reserve(), complete(retry=BOUNDED)), "retried until answered"),
        (
            (reserve(), complete(), charge(StepKind.RETRIABLE, BOUNDED)),
            "retried until answered",
        ),
    ],
    ids=[
        "no steps",
        "compensatable after the pivot",
        "retriable before the pivot",
        "two pivots",
        "compensatable without compensation",
        "pivot with a compensation",
        "pivot that gives up",
        "retriable that gives up",
    ],
)
def test_a_definition_the_engine_cannot_run_safely_is_refused(
    steps: tuple[Step, ...], complaint: str
) -> None:
    with pytest.raises(DefinitionError, match=complaint) as refused:
        saga(*steps)

    assert "'shop'" in str(refused.value)


def test_compensations_that_give_up_are_refused() -> None:
    with pytest.raises(DefinitionError, match="compensations must be retried until answered"):
        saga(reserve(), complete(), compensation_retry=BOUNDED)


def test_the_refusal_names_the_offending_step() -> None:
    with pytest.raises(DefinitionError, match="step 'charge_payment'"):
        saga(reserve(), complete(), charge())


def test_a_bad_definition_is_a_configuration_error() -> None:
    # the services report configuration errors in one line and exit, not with a traceback
    assert issubclass(DefinitionError, ConfigurationError)


# --- the retry policy ------------------------------------------------------------------------


def test_the_wait_grows_by_the_backoff_until_the_cap() -> None:
    policy = RetryPolicy(timeout_s=10, backoff=2, max_wait_s=60)

    assert [policy.wait_s(attempt) for attempt in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert [policy.capped(attempt) for attempt in range(1, 6)] == [False, False, False, True, True]


def test_a_step_resent_for_days_still_has_a_wait() -> None:
    policy = RetryPolicy(timeout_s=1, backoff=2, max_wait_s=60)

    assert policy.wait_s(1_000_000) == 60

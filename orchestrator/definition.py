"""The order saga, declared as data: three steps, each with its kind, command and compensation.

The kinds are those of Garcia-Molina and Salem's sagas: *compensatable* steps can be undone,
the *pivot* is the point of no return, and *retriable* steps after it must eventually
succeed. Before the pivot a step that keeps failing is compensated; once the pivot has been
sent the saga can only go forward, so the pivot and everything after it are resent until
answered. Compensations are resent until answered too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from messages.contract.models import (
    ChargePayment,
    Command,
    CompleteOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)
from messages.errors import DefinitionError


class StepKind(enum.StrEnum):
    """Where a step stands relative to the point of no return."""

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for a reply, and how often to resend the same command.

    ``max_attempts`` None means: resend until answered (the wait grows to ``max_wait_s``).
    """

    timeout_s: float
    max_attempts: int | None = None
    backoff: float = 2.0
    max_wait_s: float = 60.0

    def wait_s(self, attempt: int) -> float:
        """How long attempt number ``attempt`` (1-based) waits for its reply."""
        # min() before the power would overflow for a step resent for days.
        exponent = min(attempt - 1, 64)
        return min(self.timeout_s * self.backoff**exponent, self.max_wait_s)

    def capped(self, attempt: int) -> bool:
        """True once the wait has stopped growing."""
        return self.wait_s(attempt) >= self.max_wait_s


@dataclass(frozen=True)
class Step:
    """One local transaction of the saga, run by one participant."""

    name: str
    participant: str
    kind: StepKind
    command: type[Command]
    compensation: type[Command] | None
    retry: RetryPolicy


@dataclass(frozen=True)
class SagaDefinition:
    """Ordered steps, the retry policy of compensations, and when a wait counts as stuck."""

    name: str
    steps: tuple[Step, ...]
    compensation_retry: RetryPolicy
    stuck_after_s: float = 300.0

    def __post_init__(self) -> None:
        check(self)

    def step_for(self, command_type: str) -> Step | None:
        """The step whose command or compensation has this type."""
        for step in self.steps:
            if command_type in (step.command.__name__, getattr(step.compensation, "__name__", "")):
                return step
        return None


def check(definition: SagaDefinition) -> None:
    """Refuse a definition the engine could not run safely (raises DefinitionError)."""
    name = definition.name
    if not definition.steps:
        raise DefinitionError(f"saga {name!r} has no steps")
    if definition.compensation_retry.max_attempts is not None:
        raise DefinitionError(f"saga {name!r}: compensations must be retried until answered")
    kinds = [step.kind for step in definition.steps]
    if kinds.count(StepKind.PIVOT) > 1:
        raise DefinitionError(f"saga {name!r} has more than one pivot")
    seen_pivot = False
    for step in definition.steps:
        where = f"saga {name!r}, step {step.name!r}"
        if step.kind is StepKind.COMPENSATABLE:
            if seen_pivot:
                raise DefinitionError(f"{where}: a compensatable step cannot follow the pivot")
            if step.compensation is None:
                raise DefinitionError(f"{where}: a compensatable step needs a compensation")
            continue
        if step.kind is StepKind.RETRIABLE and not seen_pivot:
            raise DefinitionError(f"{where}: a retriable step must follow the pivot")
        if step.compensation is not None:
            raise DefinitionError(f"{where}: a {step.kind} step cannot be compensated")
        if step.retry.max_attempts is not None:
            raise DefinitionError(f"{where}: a {step.kind} step must be retried until answered")
        seen_pivot = True


def order_saga(
    step_timeout_s: float,
    step_max_attempts: int,
    backoff: float = 2.0,
    max_wait_s: float = 60.0,
    stuck_after_s: float = 300.0,
) -> SagaDefinition:
    """Reserve stock, charge the card, complete the order."""
    before_pivot = RetryPolicy(step_timeout_s, step_max_attempts, backoff, max_wait_s)
    until_answered = RetryPolicy(step_timeout_s, None, backoff, max_wait_s)
    kind = StepKind
    return SagaDefinition(
        name="order",
        steps=(
            Step(
                "reserve_stock",
                "inventory",
                kind.COMPENSATABLE,
                ReserveStock,
                ReleaseStock,
                before_pivot,
            ),
            Step(
                "charge_payment",
                "payment",
                kind.COMPENSATABLE,
                ChargePayment,
                RefundPayment,
                before_pivot,
            ),
            # Once the order is complete there is nothing left to undo.
            Step("complete_order", "order", kind.PIVOT, CompleteOrder, None, until_answered),
        ),
        compensation_retry=until_answered,
        stuck_after_s=stuck_after_s,
    )

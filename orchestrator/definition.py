"""Sagas declared as data: what starts one, its input, and its steps; the order saga is one.

A saga's input is plain JSON data taken from the request that starts it, and stored with
its state; each step says how its command (and compensation) is built from that input.

The kinds are those of Garcia-Molina and Salem's sagas: *compensatable* steps can be undone,
the *pivot* is the point of no return, and *retriable* steps after it must eventually
succeed. Before the pivot a step that keeps failing is compensated; once the pivot has been
sent the saga can only go forward, so the pivot and everything after it are resent until
answered. Compensations are resent until answered too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from messages.contract.models import (
    ChargePayment,
    Command,
    CompleteOrder,
    Envelope,
    Money,
    PlaceOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)
from messages.errors import DefinitionError

Input = Mapping[str, Any]  # a saga's input: JSON data, stored with its state
Payload = Callable[[Input], Mapping[str, Any]]


def pick(*names: str) -> Payload:
    """A payload of these fields of the input, under the same names."""

    def payload(data: Input) -> dict[str, Any]:
        return {name: data[name] for name in names}

    return payload


def input_of(request: Envelope) -> dict[str, Any]:
    """A request's payload (everything but its envelope) as JSON data."""
    return request.model_dump(mode="json", exclude=set(Envelope.model_fields))


def as_text(data: Input) -> str:
    """An input as one line for the history, when a definition says nothing better."""
    return ", ".join(f"{key}={value}" for key, value in data.items())


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
class Call:
    """A command, and how its payload is built from the saga's input."""

    command: type[Command]
    payload: Payload

    @property
    def type(self) -> str:
        """The command's type tag, as replies name it in ``command_type``."""
        tag: str = self.command.model_fields["type"].default
        return tag


@dataclass(frozen=True)
class Step:
    """One local transaction of the saga, run by one participant."""

    name: str
    participant: str
    kind: StepKind
    command: Call
    compensation: Call | None
    retry: RetryPolicy


@dataclass(frozen=True)
class SagaDefinition:
    """What starts the saga, its ordered steps, and how it retries and counts as stuck.

    ``input`` takes the saga's input from the request; ``describe`` says it in one line.
    """

    name: str
    request: type[Envelope]
    steps: tuple[Step, ...]
    compensation_retry: RetryPolicy
    stuck_after_s: float = 300.0
    input: Callable[[Envelope], dict[str, Any]] = field(default=input_of)
    describe: Callable[[Input], str] = field(default=as_text)

    def __post_init__(self) -> None:
        check(self)

    @property
    def request_type(self) -> str:
        """The type tag of the message that starts this saga."""
        tag: str = self.request.model_fields["type"].default
        return tag

    def step_for(self, command_type: str) -> Step | None:
        """The step whose command or compensation has this type."""
        for step in self.steps:
            calls = (step.command, step.compensation)
            if any(call is not None and call.type == command_type for call in calls):
                return step
        return None

    def messages(self) -> list[type[Envelope]]:
        """Every message this saga starts from or sends, for the decoder's registry."""
        calls = [c for s in self.steps for c in (s.command, s.compensation) if c is not None]
        return [self.request, *(call.command for call in calls)]


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


def describe_order(order: Input) -> str:
    """'2 x SKU-1 for cust-42, 25.00 EUR'."""
    amount = Money.model_validate(order["amount"])
    return f"{order['quantity']} x {order['sku']} for {order['customer_id']}, {amount}"


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
    stock = pick("sku", "quantity")
    money = pick("customer_id", "amount")
    order = pick("customer_id", "sku", "quantity", "amount")
    kind = StepKind
    return SagaDefinition(
        name="order",
        request=PlaceOrder,
        describe=describe_order,
        steps=(
            Step(
                "reserve_stock",
                "inventory",
                kind.COMPENSATABLE,
                Call(ReserveStock, stock),
                Call(ReleaseStock, stock),
                before_pivot,
            ),
            Step(
                "charge_payment",
                "payment",
                kind.COMPENSATABLE,
                Call(ChargePayment, money),
                Call(RefundPayment, money),
                before_pivot,
            ),
            # Once the order is complete there is nothing left to undo.
            Step(
                "complete_order",
                "order",
                kind.PIVOT,
                Call(CompleteOrder, order),
                None,
                until_answered,
            ),
        ),
        compensation_retry=until_answered,
        stuck_after_s=stuck_after_s,
    )

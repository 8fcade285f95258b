"""The order saga, declared as data: three steps, each with its command and compensation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from messages.models import (
    ChargePayment,
    Command,
    CompleteOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for a reply, and how often to resend the same command."""

    timeout_s: float
    max_attempts: int
    backoff: float = 2.0
    max_wait_s: float = 60.0

    def deadline(self, now: datetime, attempt: int) -> datetime:
        """When attempt number ``attempt`` (1-based) times out."""
        wait = min(self.timeout_s * self.backoff ** (attempt - 1), self.max_wait_s)
        return now + timedelta(seconds=wait)


@dataclass(frozen=True)
class Step:
    """One local transaction of the saga, run by one participant."""

    name: str
    participant: str
    command: type[Command]
    compensation: type[Command] | None
    retry: RetryPolicy


@dataclass(frozen=True)
class SagaDefinition:
    """Ordered steps, and the retry policy used for compensations."""

    name: str
    steps: tuple[Step, ...]
    compensation_retry: RetryPolicy


def order_saga(step_retry: RetryPolicy, compensation_retry: RetryPolicy) -> SagaDefinition:
    """Reserve stock, charge the card, complete the order."""
    return SagaDefinition(
        name="order",
        steps=(
            Step("reserve_stock", "inventory", ReserveStock, ReleaseStock, step_retry),
            Step("charge_payment", "payment", ChargePayment, RefundPayment, step_retry),
            # The pivot: once the order is complete there is nothing left to undo.
            Step("complete_order", "order", CompleteOrder, None, step_retry),
        ),
        compensation_retry=compensation_retry,
    )

"""The bench's vocabulary: outcomes, steps, its error, and percentiles of durations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from messages.contract import topology
from messages.contract.models import HistoryEntry, Money, SagaStatus

SAGA = "saga"  # the `step` of history entries about the saga as a whole (orchestrator.engine)
TIMED_OUT = "TIMED_OUT"
OUTCOMES = (*(s.value for s in SagaStatus if s.finished), TIMED_OUT)
STEPS = ("reserve_stock", "charge_payment", "complete_order")
REPLY_EVENTS = {
    "succeeded": "",
    "failed": "",
    "compensated": "/undo",
    "compensation_failed": "/undo",
}
OK_AMOUNT = Money(amount=Decimal("25.00"))
DECLINED_AMOUNT = Money(amount=Decimal("5000.00"))  # over the default credit limit of 1000.00
SERVICE_QUEUES = {
    "orchestrator": topology.REQUESTS_QUEUE,
    **{p: topology.command_queue(p) for p in topology.PARTICIPANTS},
}
READY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
MESSAGE_COUNTING = (
    "request + commands sent (resends included) + replies the orchestrator applied + the "
    "result delivered to reply_to; the copy of the result on saga.events is not counted"
)


class BenchError(Exception):
    """Raised with a message for the user; the script exits with code 2."""


# --- statistics --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (so p50 <= p99 <= max always)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, Any]:
    """Percentiles, max and mean of durations in seconds, as milliseconds."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    for p in points:
        out[f"p{p:g}"] = _ms(percentile(ordered, p))
    out["max"] = _ms(ordered[-1]) if ordered else None
    out["mean"] = _ms(sum(ordered) / len(ordered)) if ordered else None
    return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def analyse_history(history: Sequence[HistoryEntry]) -> tuple[dict[str, float], int]:
    """Per-step latency (a step's last `sent` to its reply) and the messages the saga cost.

    A compensation's latency is keyed ``<step>/undo``.
    """
    sent: dict[str, Any] = {}
    steps: dict[str, float] = {}
    commands = replies = 0
    for entry in history:
        if entry.step == SAGA:
            continue
        if entry.event == "sent":
            commands += 1
            sent[entry.step] = entry.at
        elif entry.event in REPLY_EVENTS:
            replies += 1
            at = sent.pop(entry.step, None)
            if at is not None:
                steps[entry.step + REPLY_EVENTS[entry.event]] = (entry.at - at).total_seconds()
    return steps, 1 + commands + replies + 1

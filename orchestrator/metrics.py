"""What the orchestrator counts, read off the history entries each committed decision adds."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from messages.contract.models import HistoryEntry, SagaStatus
from orchestrator.engine import SAGA
from orchestrator.store import SagaStore

STARTED = Counter("saga_started", "Sagas started")
FINISHED = Counter("saga_finished", "Sagas finished, by outcome", ["outcome"])
STEP_SECONDS = Histogram(
    "saga_step_duration_seconds",
    "From sending a command to its reply, by step and reply",
    ["step", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TIMEOUTS = Counter("saga_timeouts", "Commands whose deadline passed without a reply", ["step"])
RETRIES = Counter("saga_retries", "Commands sent again after a time-out", ["step"])
COMPENSATIONS = Counter("saga_compensations", "Compensations started", ["step"])

_REPLIES = {"succeeded", "failed", "compensated", "compensation_failed"}


def observe(history: Sequence[HistoryEntry], seen: int) -> None:
    """Count what happened in ``history[seen:]`` (entries a commit just made durable)."""
    for index in range(seen, len(history)):
        entry = history[index]
        if entry.step == SAGA:
            if entry.event == "started":
                STARTED.inc()
            elif entry.event in ("completed", "compensated", "failed"):
                FINISHED.labels(entry.event.upper()).inc()
        elif entry.event == "sent" and entry.attempt:
            if entry.attempt > 1:
                RETRIES.labels(entry.step).inc()
            elif entry.status is SagaStatus.COMPENSATING:
                COMPENSATIONS.labels(entry.step).inc()
        elif entry.event == "timed_out":
            TIMEOUTS.labels(entry.step).inc()
        elif entry.event in _REPLIES:
            sent = _last_sent(history, index)
            if sent is not None:
                seconds = (entry.at - sent.at).total_seconds()
                STEP_SECONDS.labels(entry.step, entry.event).observe(seconds)


def _last_sent(history: Sequence[HistoryEntry], before: int) -> HistoryEntry | None:
    step = history[before].step
    for entry in reversed(history[:before]):
        if entry.step == step and entry.event == "sent":
            return entry
    return None


class StoreCollector(Collector):
    """Sagas by state and the outbox depth, read from the store at scrape time.

    Reading at scrape time keeps the numbers right across restarts; the scrape runs in the
    metrics server's thread, so it opens its own read-only connection.
    """

    def __init__(self, open_store: Callable[[], SagaStore], stuck_after_s: float) -> None:
        self.open_store = open_store  # read-only
        self.stuck_after_s = stuck_after_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self.open_store()
        try:
            counts = store.counts()
            depth = store.outbox_depth()
            stuck = store.stuck(datetime.now(UTC), self.stuck_after_s)
        finally:
            store.close()
        sagas = GaugeMetricFamily("saga_sagas", "Sagas in the store, by state", labels=["state"])
        for status in SagaStatus:
            sagas.add_metric([status.value], counts.get(status.value, 0))
        yield sagas
        in_flight = counts.get("RUNNING", 0) + counts.get("COMPENSATING", 0)
        yield GaugeMetricFamily("saga_in_flight", "Sagas RUNNING or COMPENSATING", in_flight)
        yield GaugeMetricFamily("saga_outbox_depth", "Messages waiting to be published", depth)
        yield GaugeMetricFamily(
            "saga_stuck", "Sagas waiting SAGA_STUCK_AFTER_S or longer for one reply", stuck
        )


def register_store(open_store: Callable[[], SagaStore], stuck_after_s: float) -> None:
    """Add the store's gauges to the default registry."""
    REGISTRY.register(StoreCollector(open_store, stuck_after_s))

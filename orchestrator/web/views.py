"""What the console shows, shaped from sagas and counts: pure functions, no I/O.

The app reads the store and the broker; these turn what it read into rows, a waterfall and
an overview, and the query string of the list into a store filter.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from messages.contract import topology
from messages.contract.models import HistoryEntry, SagaStatus
from messages.errors import InvalidQueryError
from messages.plumbing.timeline import format_offset
from orchestrator.engine import SAGA, SagaState
from orchestrator.report import parse_duration
from orchestrator.store import SagaFilter, order_fields

PAGE_SIZE = 25
# Filters the list takes from its query string, each a field of the form on the page.
FILTERS = ("state", "stuck", "age", "reason", "customer", "sku")
_TEXT = re.compile(r"^[\w.:@ -]{1,64}$")  # what a customer, SKU or reason filter may hold


@dataclass(frozen=True)
class ListQuery:
    """The list's filters as given (for the form and links) and as a store filter."""

    given: dict[str, str]
    where: SagaFilter
    page: int

    def link(self, **change: str | int) -> str:
        """The query string of this list with some parameters changed (page=2, say)."""
        params = {**self.given, "page": str(self.page), **{k: str(v) for k, v in change.items()}}
        return urlencode({k: v for k, v in params.items() if v and (k, v) != ("page", "1")})


def list_query(params: Mapping[str, str], now: datetime, stuck_after_s: float) -> ListQuery:
    """The list's filters from a query string; InvalidQueryError names a bad one."""
    given = {name: params.get(name, "").strip() for name in FILTERS}
    status = None
    if given["state"]:
        try:
            status = SagaStatus(given["state"].upper())
        except ValueError:
            status = None
        if status in (None, SagaStatus.QUARANTINED):
            states = ", ".join(s.value for s in SagaStatus if s is not SagaStatus.QUARANTINED)
            raise InvalidQueryError(
                f"state {given['state']!r}: one of {states} (quarantined sagas cannot be "
                "read; `saga list --state QUARANTINED` says why each was set aside)"
            )
    since = None
    if given["age"]:
        try:
            since = now - parse_duration(given["age"])
        except ValueError as exc:
            raise InvalidQueryError(f"age: {exc}") from None
    for name in ("reason", "customer", "sku"):
        if given[name] and not _TEXT.match(given[name]):
            raise InvalidQueryError(
                f"{name} {given[name]!r}: up to 64 letters, digits and . _ - : @ or spaces"
            )
    if given["stuck"] not in ("", "1", "on", "true"):
        raise InvalidQueryError(f"stuck {given['stuck']!r}: 1 or nothing")
    page_text = params.get("page", "1").strip() or "1"
    if not (page_text.isascii() and page_text.isdigit()) or not 1 <= int(page_text) <= 100_000:
        raise InvalidQueryError(f"page {page_text!r}: a number from 1")
    where = SagaFilter(
        status=status,
        since=since,
        stuck_before=now - timedelta(seconds=stuck_after_s) if given["stuck"] else None,
        reason=given["reason"] or None,
        input=order_fields(customer_id=given["customer"], sku=given["sku"]),
    )
    return ListQuery(given, where, int(page_text))


# --- one saga's history as a waterfall ---------------------------------------------------------

_REPLIES = {"succeeded", "failed", "timed_out", "compensated", "compensation_failed"}


@dataclass
class Bar:
    """One send of a command or compensation, from its send to what ended its wait.

    The engine records the first sends of a command and then every tenth (a step resent
    for hours would otherwise fill the history): the sends in between, never in the
    history, are one bar of their own (``unrecorded``), from the time-out before them to
    the next recorded send or the reply.
    """

    step: str
    command: str  # ReserveStock, ReleaseStock, ...
    attempt: int  # the first attempt this bar stands for
    compensation: bool
    start_s: float
    end_s: float | None = None  # None: still waiting
    outcome: str = "waiting"  # or the event that ended it: succeeded, timed_out, ...
    detail: str = ""
    unrecorded: bool = False

    @property
    def label(self) -> str:
        if self.unrecorded:
            return f"{self.command} (attempts {self.attempt} on, not in the history)"
        return self.command + (f" (attempt {self.attempt})" if self.attempt > 1 else "")


@dataclass(frozen=True)
class Mark:
    """A saga-level event on the time axis: started, compensating, abort_requested, ..."""

    event: str
    at_s: float
    detail: str


@dataclass(frozen=True)
class Waterfall:
    bars: list[Bar]
    marks: list[Mark]
    total_s: float  # the axis: from the first entry to the last (or to now, while running)
    ticks: list[tuple[float, str]]  # (percent of the axis, label)

    def left(self, seconds: float) -> float:
        """Where on the axis ``seconds`` after the start falls, in percent."""
        return round(100 * seconds / self.total_s, 3)

    def width(self, bar: Bar) -> float:
        """A bar's length in percent; never less than can be seen."""
        end = self.total_s if bar.end_s is None else bar.end_s
        return max(round(100 * (end - bar.start_s) / self.total_s, 3), 0.4)


def waterfall(history: Sequence[HistoryEntry], now: datetime) -> Waterfall:
    """Each send as a bar from its send to its reply or time-out; saga events as marks.

    A bar still waiting reaches ``now`` while the saga runs; once it has ended, a send that
    was never answered (an abort, say) ends where the saga did.
    """
    if not history:
        return Waterfall([], [], 1.0, [])
    start = history[0].at
    bars: list[Bar] = []
    marks: list[Mark] = []
    waiting: dict[str, Bar] = {}
    ended: float | None = None
    for entry in history:
        at = (entry.at - start).total_seconds()
        if entry.step == SAGA:
            marks.append(Mark(entry.event, at, entry.detail))
            if entry.status.finished and ended is None:
                ended = at
        elif entry.event == "sent":
            if (before := waiting.pop(entry.step, None)) is not None:
                again = before.command == command_of(entry)
                if before.unrecorded and before.start_s == at:
                    bars.remove(before)  # the resend after the time-out is this one
                elif before.unrecorded and again:  # sends not recorded, each timed out
                    before.end_s, before.outcome = at, "timed_out"
                else:  # an abort sends the compensation while the command is unanswered
                    before.end_s, before.outcome = at, "unanswered"
            bar = Bar(
                entry.step,
                command_of(entry),
                entry.attempt or 1,
                entry.status is SagaStatus.COMPENSATING,
                at,
            )
            bars.append(bar)
            waiting[entry.step] = bar
        elif entry.event in _REPLIES and entry.step in waiting:
            bar = waiting.pop(entry.step)
            bar.end_s, bar.outcome, bar.detail = at, entry.event, entry.detail
            if entry.event == "timed_out":  # resent at once, recorded or not
                resent = Bar(bar.step, bar.command, bar.attempt + 1, bar.compensation, at)
                resent.unrecorded = True
                bars.append(resent)
                waiting[entry.step] = resent
    for step, bar in list(waiting.items()):
        if bar.unrecorded and ended is not None and bar.start_s >= ended:
            bars.remove(bar)  # the saga ended at that time-out: nothing was resent
            del waiting[step]
    last = (history[-1].at - start).total_seconds()
    running = ended is None
    total = max((now - start).total_seconds() if running and waiting else last, 0.001)
    if not running:
        for bar in waiting.values():
            bar.end_s, bar.outcome = ended, "unanswered"
    return Waterfall(bars, marks, total, _ticks(total))


def command_of(entry: HistoryEntry) -> str:
    """The command a ``sent`` entry names ("ChargePayment attempt 2" -> ChargePayment)."""
    return entry.detail.split(" attempt ")[0] or entry.step


def _ticks(total_s: float) -> list[tuple[float, str]]:
    ticks = []
    for quarter in range(5):
        value, unit = format_offset(total_s * quarter / 4)
        ticks.append((25.0 * quarter, f"{value} {unit}"))
    return ticks


# --- the overview -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """How long one step's replies took, over the sagas looked at."""

    step: str
    command: str
    replies: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class Throughput:
    """Sagas ended per minute, by how they ended, over the last minutes."""

    minutes: list[str]  # "14:05", oldest first
    by_outcome: dict[str, list[int]]  # COMPLETED -> [per minute]

    @property
    def peak(self) -> int:
        """The most sagas that ended in one minute, all outcomes together (the bars stack)."""
        return max(map(sum, zip(*self.by_outcome.values(), strict=True)), default=0)


def throughput(rows: Sequence[tuple[str, int, int]], now: datetime, minutes: int) -> Throughput:
    """Counts per (status, minute) as a series for each outcome, one point per minute."""
    last = int(now.timestamp()) // 60
    first = last - minutes + 1
    labels = [datetime.fromtimestamp(m * 60, UTC).strftime("%H:%M") for m in range(first, last + 1)]
    series = {s.value: [0] * minutes for s in SagaStatus if s.finished}
    for status, minute, count in rows:
        if first <= minute <= last and status in series:
            series[status][minute - first] += count
    return Throughput(labels, series)


def latencies(sagas: Sequence[SagaState]) -> list[Latency]:
    """Per step and direction, percentiles from each send to the reply that answered it."""
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    for state in sagas:
        sent: dict[str, tuple[str, datetime]] = {}
        for entry in state.history:
            if entry.event == "sent":
                sent[entry.step] = (command_of(entry), entry.at)
            elif entry.event == "timed_out":
                sent.pop(entry.step, None)  # the reply, if any, answers a later send
            elif entry.event in _REPLIES and entry.step in sent:
                command, at = sent.pop(entry.step)
                samples[(entry.step, command)].append((entry.at - at).total_seconds() * 1000)
    rows = []
    for (step, command), values in samples.items():
        values.sort()
        rows.append(
            Latency(
                step,
                command,
                len(values),
                _percentile(values, 0.50),
                _percentile(values, 0.95),
                _percentile(values, 0.99),
                round(values[-1], 1),
            )
        )
    return sorted(rows, key=lambda row: (row.command.startswith(("Release", "Refund")), row.step))


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


@dataclass(frozen=True)
class DeadLetters:
    """A dead-letter queue as the overview lists it."""

    queue: str
    messages: int


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message, as the management API showed it."""

    type: str
    reason: str
    detail: str
    original_queue: str
    saga_id: str
    body: str
    deliveries: int | None  # a quorum queue's count, looks included; None where not kept


def dead_letter(message: Mapping[str, object]) -> DeadLetter:
    """A message the management API returned, with the reason our services gave it."""
    properties = message.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    headers = properties.get("headers")
    headers = headers if isinstance(headers, dict) else {}
    deaths = headers.get("x-death")
    first_death = deaths[0] if isinstance(deaths, list) and deaths else {}
    reason = headers.get(topology.REASON_HEADER) or (
        first_death.get("reason", "") if isinstance(first_death, dict) else ""
    )
    return DeadLetter(
        type=str(properties.get("type", "")),
        reason=str(reason),
        detail=str(headers.get(topology.DETAIL_HEADER, "")),
        original_queue=str(headers.get(topology.QUEUE_HEADER, "")),
        saga_id=str(properties.get("correlation_id", "")),
        body=str(message.get("payload", "")),
        deliveries=count if isinstance(count := headers.get("x-delivery-count"), int) else None,
    )

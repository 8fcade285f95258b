"""A saga's history as text: shared by `python -m orchestrator show` and place_order.py."""

from __future__ import annotations

from collections.abc import Sequence

from messages.contract.models import HistoryEntry, SagaFinished


def format_timeline(history: Sequence[HistoryEntry]) -> str:
    """One line per entry, with the time since the saga started."""
    if not history:
        return ""
    start = history[0].at
    lines = []
    for entry in history:
        value, unit = format_offset((entry.at - start).total_seconds())
        detail = f"  {entry.detail}" if entry.detail else ""
        lines.append(f"  +{value:>8} {unit:<3} {entry.step:<15} {entry.event:<20}{detail}".rstrip())
    return "\n".join(lines)


def format_offset(seconds: float) -> tuple[str, str]:
    """A time since the start as (value, unit): ms under a second, s under a minute, then
    m:ss.s and h:mm:ss; the value fits the 8 characters of the column up to 99 hours."""
    if (ms := round(seconds * 1000, 1)) < 1000:
        return f"{ms:.1f}", "ms"
    if (whole_ms := round(seconds * 1000)) < 60_000:
        return f"{whole_ms / 1000:.3f}", "s"
    if (tenths := round(seconds * 10)) < 36_000:
        minutes, rest = divmod(tenths, 600)
        return f"{minutes}:{rest / 10:04.1f}", "min"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}", "h"


def render_result(result: SagaFinished, as_json: bool) -> str:
    """A finished saga as a client prints it: state, reason and timeline, or JSON."""
    if as_json:
        return result.model_dump_json(include={"saga_id", "status", "reason", "history"}, indent=2)
    reason = f" ({result.reason})" if result.reason else ""
    return f"saga {result.saga_id}: {result.status}{reason}\n{format_timeline(result.history)}"

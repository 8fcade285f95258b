"""A saga's history as text: shared by `python -m orchestrator show` and place_order.py."""

from __future__ import annotations

from collections.abc import Sequence

from messages.models import HistoryEntry, SagaFinished


def format_timeline(history: Sequence[HistoryEntry]) -> str:
    """One line per entry, with the time since the saga started."""
    if not history:
        return ""
    start = history[0].at
    lines = []
    for entry in history:
        offset = (entry.at - start).total_seconds() * 1000
        detail = f"  {entry.detail}" if entry.detail else ""
        lines.append(f"  +{offset:8.1f} ms  {entry.step:<15} {entry.event:<20}{detail}".rstrip())
    return "\n".join(lines)


def render_result(result: SagaFinished, as_json: bool) -> str:
    """A finished saga as a client prints it: state, reason and timeline, or JSON."""
    if as_json:
        return result.model_dump_json(include={"saga_id", "status", "reason", "history"}, indent=2)
    reason = f" ({result.reason})" if result.reason else ""
    return f"saga {result.saga_id}: {result.status}{reason}\n{format_timeline(result.history)}"

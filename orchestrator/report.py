"""A saga as people read it: shared by the `saga` CLI and the web console."""

from __future__ import annotations

from datetime import datetime

from orchestrator.engine import SAGA, SagaState


def current_step(state: SagaState) -> str:
    """The step the saga last acted on, "-" before its first."""
    steps = [e.step for e in state.history if e.step != SAGA]
    return steps[-1] if steps else "-"


def age(state: SagaState, now: datetime) -> str:
    return seconds_text((now - state.created_at).total_seconds())


def seconds_text(seconds: float) -> str:
    """A duration in its largest whole unit: "45s", "1m", "3h", "2d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"  # 92 s is "1m", not "2m": never more
    return f"{int(seconds)}s"


def summary(state: SagaState, now: datetime, stuck_after_s: float) -> dict[str, object]:
    """One saga as `saga list --json` and the console's JSON list it."""
    stuck_for = state.stuck_for(now, stuck_after_s)
    return {
        "saga_id": str(state.saga_id),
        "saga": state.saga,
        "status": state.status.value,
        "step": current_step(state),
        "reason": state.outcome,
        "stuck_for_s": None if stuck_for is None else round(stuck_for, 1),
        "input": state.input,
        "created_at": state.created_at.isoformat(),
        "updated_at": state.updated_at.isoformat(),
    }

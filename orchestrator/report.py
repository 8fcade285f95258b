"""A saga as people read it: shared by the `saga` CLI and the web console."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from orchestrator.definition import SagaDefinition, as_text
from orchestrator.engine import SAGA, SagaState

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LONGEST = timedelta(days=36500)  # "within 100 years" is everything; more is a typo


def parse_duration(text: str) -> timedelta:
    """'30s', '10m', '2h', '1d' as a timedelta; ValueError saying what is expected."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"expected e.g. 30s, 10m, 2h or 1d, got {text!r}")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds > LONGEST.total_seconds():  # before timedelta(), which would overflow
        raise ValueError(f"{text!r} is longer than 100 years")
    return timedelta(seconds=seconds)


def describe(state: SagaState, *definitions: SagaDefinition) -> str:
    """The saga's input in one line, as its definition words it (as_text if none here)."""
    for definition in definitions:
        if definition.name == state.saga:
            return definition.describe(state.input)
    return as_text(state.input)


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

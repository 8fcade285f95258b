"""Waiting for the soak's stack to drain: every saga ended, nothing queued, all quiet."""

from __future__ import annotations

import time
from dataclasses import dataclass

from messages.contract import topology
from scripts.harness.chaos_options import TERMINAL
from scripts.harness.chaos_plan import Progress
from scripts.harness.observe import Orchestrator, Probe
from scripts.harness.supervisor import Supervisor


@dataclass
class Drain:
    """When the stack drained and went quiet, or that it did not in time."""

    drained_at: float | None = None  # every saga ended and the outbox was empty
    quiet_since: float | None = None  # ... and nothing has changed or been queued since
    timed_out: bool = False


def _idle(probe: Probe, supervisor: Supervisor) -> bool:
    """Nothing queued anywhere, and every service up to take what comes."""
    depths = probe.depths(q for q, _, _ in topology.consumed_queues())
    return depths is not None and not any(depths.values()) and supervisor.all_ready()


def drain(
    orchestrator: Orchestrator,
    saga_ids: set[str],
    supervisor: Supervisor,
    probe: Probe,
    end_by: float,
    settle_s: float,
    progress: Progress,
) -> Drain:
    """Wait until every saga ended, the outbox and main queues are empty, and all is quiet.

    Sagas must end by ``end_by``. Quiet means no saga has changed for ``settle_s`` (longer
    than a delayed reply) with nothing queued and every service up, so that a compensation
    or late reply still on its way has landed before the audit.
    """
    result = Drain()
    fingerprint: object = None
    while True:
        now = time.monotonic()
        sagas = orchestrator.sagas()
        ended = False
        if sagas is not None:
            statuses = sagas.statuses()
            progress.finished = sum(1 for s in saga_ids if statuses.get(s) in TERMINAL)
            ended = progress.finished == len(saga_ids)
        empty = ended and orchestrator.outbox() == 0
        if empty and result.drained_at is None:
            result.drained_at = now
        if sagas is not None and empty and _idle(probe, supervisor):
            if sagas.fingerprint() != fingerprint or result.quiet_since is None:
                fingerprint, result.quiet_since = sagas.fingerprint(), now
            elif now - result.quiet_since >= settle_s:
                return result
        else:
            result.quiet_since = None
        quiet_by = (result.drained_at or end_by) + settle_s + 30
        if now > (quiet_by if ended else end_by):
            result.timed_out = True
            return result
        time.sleep(0.25)

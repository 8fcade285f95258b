"""Fault injection for chaos runs: misbehave around the reply, never inside business logic.

The one seam: a participant sends its replies through ``Faults.send`` only when a
SAGA_FAULT_* setting switches a fault on (``from_settings`` returns None otherwise, and the
runtime publishes directly). Each injected fault is logged at WARNING with the word FAULT
and counted, so a chaos run can tell what it caused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

INJECTED = Counter("saga_faults_injected", "Faults injected on purpose", ["participant", "fault"])

CRASH_EXIT_CODE = 70


@dataclass
class Faults:
    """Rates per fault; ``send`` delivers a reply the way the dice say."""

    drop: float = 0.0
    delay: float = 0.0
    delay_s: float = 10.0
    duplicate: float = 0.0
    crash: float = 0.0
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Faults | None:
        """The faults the settings switch on; None when they switch none on."""
        faults = cls(
            drop=settings.fault_drop_reply,
            delay=settings.fault_delay_reply,
            delay_s=settings.fault_delay_s,
            duplicate=settings.fault_duplicate_reply,
            crash=settings.fault_crash_after_commit,
        )
        return faults if faults.enabled else None

    @property
    def enabled(self) -> bool:
        return any((self.drop, self.delay, self.duplicate, self.crash))

    async def send(self, participant: str, reply: Callable[[], Awaitable[None]]) -> None:
        """Called after the commit, with the function that publishes the reply."""
        fault = self._pick()
        if fault is None:
            await reply()
            return
        INJECTED.labels(participant, fault).inc()
        log.warning("FAULT %s injected", fault)
        if fault == "crash_after_commit":
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        if fault == "delay_reply":
            task = asyncio.create_task(self._later(reply))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        elif fault == "duplicate_reply":
            await reply()
            await reply()

    def _pick(self) -> str | None:
        """One roll of the dice: which fault, if any, this reply gets."""
        roll = random.random()
        for fault, rate in (
            ("crash_after_commit", self.crash),
            ("drop_reply", self.drop),
            ("delay_reply", self.delay),
            ("duplicate_reply", self.duplicate),
        ):
            if roll < rate:
                return fault
            roll -= rate
        return None

    async def _later(self, reply: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(self.delay_s)
        try:
            await reply()
        except Exception:  # best effort: a late reply that cannot be sent is a dropped one
            log.warning("FAULT delayed reply could not be sent")

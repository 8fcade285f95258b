"""The soak's load: a closed loop of orders, results from saga.events or the orchestrator."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from uuid import UUID

from messages.contract import topology
from messages.contract.models import SagaFinished
from messages.plumbing.client import Client
from scripts.harness.chaos_options import (
    CLIENT_ERRORS,
    RECONCILE_AFTER_S,
    STALL_NOTICE_S,
    TERMINAL,
    Options,
    Order,
    say,
)
from scripts.harness.chaos_plan import Progress
from scripts.harness.observe import Orchestrator, Probe


class Requester:
    """A Client that survives the broker going away: reconnect, and say so once."""

    def __init__(self, url: str, started: float) -> None:
        self.url = url
        self.started = started
        self.client: Client | None = None
        self.reconnects = 0
        self._down_since: float | None = None

    def connect(self) -> Client | None:
        """The client, connecting if needed; None (after a short wait) while it cannot."""
        if self.client is not None:
            return self.client
        try:
            self.client = Client(self.url, watch_events=True)
        except CLIENT_ERRORS as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._say(f"cannot reach the broker ({exc}); retrying")
            time.sleep(0.5)
            return None
        if self._down_since is not None:
            self.reconnects += 1
            self._say(f"reconnected after {time.monotonic() - self._down_since:.1f}s")
            self._down_since = None
        return self.client

    def lost(self, exc: BaseException) -> None:
        self._say(f"lost the broker connection ({exc!r})")
        self._down_since = time.monotonic()
        self.close()

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(*CLIENT_ERRORS):
                self.client.close()
        self.client = None

    def _say(self, text: str) -> None:
        say(f"[{time.monotonic() - self.started:7.1f}s] load: {text}")


@dataclass
class LoadStats:
    """How the load went: placed, results by where they were seen, timing."""

    placed: int = 0
    by_event: int = 0
    by_store: int = 0
    reconnects: int = 0
    first_placed: float = 0.0
    last_placed: float = 0.0
    all_finished: float | None = None
    stalled: bool = False


class Load:
    """Closed loop: keep ``concurrency`` orders in flight until every one has a result.

    Results come from saga.events; a saga in flight for a while is also looked up through
    `orchestrator list --json`, since a result published while we were reconnecting is gone
    with our old queue.
    Requests are durable and the orchestrator drops repeats, so a request whose publish
    failed is simply published again.
    """

    def __init__(
        self,
        opts: Options,
        url: str,
        orchestrator: Orchestrator,
        orders: list[Order],
        progress: Progress,
        started: float,
    ) -> None:
        self.opts = opts
        self.orchestrator = orchestrator
        self.progress = progress
        self.started = started
        self.requester = Requester(url, started)
        self.ids = {o.request.saga_id for o in orders}
        self.unsent: deque[Order] = deque(orders)
        self.in_flight: dict[UUID, float] = {}
        self.results: dict[UUID, str] = {}
        self.stats = LoadStats()
        self._last_result = started
        self._reconcile_all = False
        self._next_reconcile = 0.0
        self._next_report = started + 5
        self._stall_noticed = False
        self._probe = Probe(url)

    def run(self) -> LoadStats:
        self.stats.first_placed = time.monotonic()
        try:
            while len(self.results) < len(self.ids) and not self._out_of_time():
                self._turn()
        finally:
            self.requester.close()
            self._probe.close()
        self.stats.reconnects = self.requester.reconnects
        return self.stats

    def _turn(self) -> None:
        client = self.requester.connect()
        if client is not None:
            try:
                self._top_up(client)
                self._receive(client)
            except CLIENT_ERRORS as exc:
                self.requester.lost(exc)
                self._reconcile_all = True
        now = time.monotonic()
        if now >= self._next_reconcile:
            self._reconcile(now)
            self._next_reconcile = now + 1.0
        if now >= self._next_report:
            self._report(now)
            self._next_report = now + 5
        if now - self._last_result > STALL_NOTICE_S and not self._stall_noticed:
            self._stall_noticed = True
            self._notice_stall()

    def _top_up(self, client: Client) -> None:
        while self.unsent and len(self.in_flight) < self.opts.concurrency:
            order = self.unsent[0]
            # A publish that raised may still have reached the broker: then the saga ran,
            # and sending it again is harmless (the orchestrator drops a repeated request).
            if order.request.saga_id not in self.results:
                client.request(order.request)  # raises while the broker is away
                self.in_flight[order.request.saga_id] = time.monotonic()
            self.unsent.popleft()
            self.stats.placed += 1
            self.stats.last_placed = time.monotonic()
            self.progress.placed = self.stats.placed

    def _receive(self, client: Client) -> None:
        for message in client.answers(0.2):
            if isinstance(message, SagaFinished) and self._record(
                message.saga_id, message.status.value
            ):
                self.stats.by_event += 1
                if self.unsent:
                    return  # a slot is free: place the next order

    def _record(self, saga_id: UUID, status: str) -> bool:
        if saga_id not in self.ids or saga_id in self.results or status not in TERMINAL:
            return False
        self.results[saga_id] = status
        self.in_flight.pop(saga_id, None)
        self.progress.finished = len(self.results)
        self._last_result = time.monotonic()
        self._stall_noticed = False
        if len(self.results) == len(self.ids):
            self.stats.all_finished = self._last_result
        return True

    def _reconcile(self, now: float) -> None:
        """Look up sagas in flight for a while (all of them after a reconnect) in the store."""
        stale = [
            sid
            for sid, since in self.in_flight.items()
            if self._reconcile_all or now - since > RECONCILE_AFTER_S
        ]
        if not stale:
            return
        sagas = self.orchestrator.sagas()  # `orchestrator list --json`: every saga, one call
        if sagas is None:
            return
        statuses = sagas.statuses()
        self._reconcile_all = False
        for sid in stale:
            if self._record(sid, statuses.get(str(sid), "")):
                self.stats.by_store += 1

    def _out_of_time(self) -> bool:
        now = time.monotonic()
        if now - self._last_result > self.opts.drain_timeout:
            self.stats.stalled = True
            say(f"load: no saga finished for {self.opts.drain_timeout:g}s; giving up")
            return True
        if not self.unsent and now - self.stats.last_placed > self.opts.drain_timeout:
            say(f"load: sagas still running {self.opts.drain_timeout:g}s after the last order")
            return True
        return False

    def _notice_stall(self) -> None:
        """Say once what may be holding the load up; it goes on until --drain-timeout."""
        queues = [topology.dead_letter_queue(q) for q, _, _ in topology.consumed_queues()]
        depths = self._probe.depths(queues) or {}
        dead = ", ".join(f"{q} {n}" for q, n in depths.items() if n) or "none"
        say(
            f"load: no saga finished for {STALL_NOTICE_S:g}s ({len(self.in_flight)} in "
            f"flight); dead-lettered: {dead}; service logs in {self.orchestrator.stack.data_dir}"
        )

    def _report(self, now: float) -> None:
        say(
            f"[{now - self.started:7.1f}s] placed {self.stats.placed}/{len(self.ids)}, "
            f"finished {len(self.results)}, in flight {len(self.in_flight)}"
        )

"""The outbox relay: publish committed messages, forget them once the broker confirms.

Rows are handed over straight from memory once their commit is on disk (``send``); the
outbox table is read only for rows no live orchestrator holds: at start, what an earlier
run left unpublished, and in a shared store, every few seconds, the rows of an
orchestrator that stopped renewing its lease. Publishing
never waits for the previous confirm: confirms come back asynchronously, and confirmed rows
are deleted by the next commit of saga state (no fsync of their own), or after a quiet
moment. A row whose publish fails (no connection, unroutable, nacked, or no confirm in
time) is retried on its own, with backoff, so one row that cannot be published never holds
up the others. Participants dedupe by command id, so a row sent twice does no harm.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from messages.plumbing import amqp, tracing
from messages.plumbing.logs import saga_context
from orchestrator.store import OutboxMessage, SagaStore

log = logging.getLogger(__name__)

BATCH = 512
MAX_IN_FLIGHT = 4096  # unconfirmed publishes at once; bounds memory under a slow broker
ORPHANS_EVERY_S = 5.0  # in a shared store: how often to look for rows a dead writer left
IDLE_FLUSH_S = 0.05  # how long confirmed rows may wait to be deleted when nothing else happens
FIRST_RETRY_S = 0.25  # wait before a failed row's first retry; doubles up to max_retry_s


X = TypeVar("X")


class InWriter(Protocol):
    """Runs store writes in the writer thread, between commits."""

    def __call__(self, work: Callable[[], X]) -> Awaitable[X]: ...


@dataclass
class _Retry:
    row: OutboxMessage
    failures: int
    due: float  # time.monotonic() of the next try


class OutboxRelay:
    """Runs until cancelled; ``send`` it the rows of each commit once it is on disk.

    Publishes only while attached to a connection (``attach``/``detach``).
    ``on_confirmed`` hears of every confirmed row. A failed row that ``still_wanted`` no
    longer wants (its saga has moved on) is deleted instead of retried.
    """

    def __init__(
        self,
        store: SagaStore,
        on_confirmed: Callable[[OutboxMessage], None],
        still_wanted: Callable[[OutboxMessage], bool],
        publish_timeout_s: float,
        max_retry_s: float,
        in_writer: InWriter,
    ) -> None:
        self.store = store
        self.in_writer = in_writer  # runs store writes in the writer thread, between commits
        self.on_confirmed = on_confirmed
        self.still_wanted = still_wanted  # asked before a retry: has the saga moved on?
        self.publish_timeout_s = publish_timeout_s
        self.max_retry_s = max_retry_s
        self._publisher: amqp.Publisher | None = None
        self._attached = asyncio.Event()
        self._ready = asyncio.Event()
        self._queue: deque[OutboxMessage] = deque()  # committed, not yet handed to the broker
        self._orphans_at = 0.0  # time.monotonic() of the next look for rows no one holds
        # Confirmed rows, taken by the writer thread's next commit: a deque, since appends on
        # the loop and pops in the writer need no lock.
        self._confirmed: deque[int] = deque()
        self._retries: dict[int, _Retry] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, publisher: amqp.Publisher) -> None:
        """A connection is up: publish through it, failed rows first."""
        self._publisher = publisher
        now = time.monotonic()
        for retry in self._retries.values():
            if retry.due != float("inf"):  # not one in flight: that would publish it twice
                retry.due = now
        self._attached.set()
        self._ready.set()

    def detach(self) -> None:
        """The connection is gone: hold everything until the next ``attach``."""
        self._publisher = None
        self._attached.clear()

    def send(self, rows: Iterable[OutboxMessage]) -> None:
        """Publish these committed rows."""
        self._queue.extend(rows)
        self._ready.set()

    def done(self, ids: list[int]) -> None:
        """Rows a failed commit could not delete: delete them later. Any thread."""
        self._confirmed.extend(ids)

    def take_confirmed(self) -> list[int]:
        """Confirmed rows, for the caller's next commit to delete. Any thread."""
        taken = []
        while True:
            try:  # not `while self._confirmed`: the other thread may take the last one first
                taken.append(self._confirmed.popleft())
            except IndexError:
                return taken

    async def run(self) -> None:
        try:
            while True:
                await self._attached.wait()
                self._ready.clear()
                try:
                    # Orphans first: if claiming them fails, no retry is left marked in flight.
                    due = time.monotonic() >= self._orphans_at  # no await on the hot path
                    orphans = await self._orphans() if due else []
                    rows = orphans + self._due_retries() + self._take(BATCH)
                except Exception:
                    log.exception("reading the outbox failed; trying again")
                    await asyncio.sleep(self.max_retry_s / 10)
                    continue
                if not rows:
                    await self._idle()
                    continue
                for row in rows:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._publish(row))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _orphans(self) -> list[OutboxMessage]:
        """Rows no live orchestrator holds, claimed for this one."""
        rows = await self.in_writer(functools.partial(self.store.claim_orphans, BATCH))
        if rows:
            log.info("publishing %d outbox message(s) that no live orchestrator holds", len(rows))
        if len(rows) < BATCH:  # all taken: look again later, or never when no one else writes
            later = ORPHANS_EVERY_S if self.store.shared else float("inf")
            self._orphans_at = time.monotonic() + later
        return rows

    def _take(self, limit: int) -> list[OutboxMessage]:
        rows: list[OutboxMessage] = []
        while self._queue and len(rows) < limit:
            rows.append(self._queue.popleft())
        return rows

    def _due_retries(self) -> list[OutboxMessage]:
        now = time.monotonic()
        due = [r for r in self._retries.values() if r.due <= now]
        rows = []
        for retry in due:
            assert retry.row.id is not None
            if self.still_wanted(retry.row):
                retry.due = float("inf")  # in flight; _publish reschedules or forgets it
                rows.append(retry.row)
            else:
                del self._retries[retry.row.id]
                self._confirmed.append(retry.row.id)  # deleted with the next commit
        return rows

    async def _idle(self) -> None:
        waits = [r.due for r in self._retries.values() if r.due != float("inf")]
        timeout = IDLE_FLUSH_S
        if waits:
            timeout = max(0.0, min(timeout, min(waits) - time.monotonic()))
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            await self._flush()  # nothing is being committed that could take them

    async def _publish(self, row: OutboxMessage) -> None:
        assert row.id is not None
        try:
            if self._publisher is None:
                raise ConnectionError("not connected")
            await self._publisher.publish(
                row.exchange,
                row.wire,
                row.routing_key,
                mandatory=row.mandatory,
                headers={tracing.HEADER: row.traceparent} if row.traceparent else None,
                timeout=self.publish_timeout_s,
            )
        except Exception as exc:  # whatever it was, the row must be sent again, later
            self._failed(row, exc)
        else:
            self._retries.pop(row.id, None)
            self.on_confirmed(row)
            self._confirmed.append(row.id)
        finally:
            self._slots.release()

    def _failed(self, row: OutboxMessage, exc: BaseException) -> None:
        assert row.id is not None
        retry = self._retries.get(row.id) or _Retry(row, 0, 0.0)
        retry.failures += 1
        wait = self._wait(retry.failures)
        retry.due = time.monotonic() + wait
        self._retries[row.id] = retry
        # Logged when it starts and when the wait stops growing, not on every try.
        capped_now = wait >= self.max_retry_s > self._wait(retry.failures - 1)
        if retry.failures == 1 or capped_now:
            with (
                saga_context(
                    row.wire.correlation_id, step=row.wire.type, message_id=row.wire.message_id
                ),
                tracing.continuing(row.traceparent, f"publish {row.wire.type}"),
            ):
                log.warning(
                    "publishing %s to %s/%s failed (%d time(s)): %s; retrying in %.1fs",
                    row.wire.type,
                    row.exchange or "(default)",
                    row.routing_key,
                    retry.failures,
                    exc or type(exc).__name__,
                    wait,
                )

    def _wait(self, failures: int) -> float:
        return float(min(FIRST_RETRY_S * 2 ** min(failures - 1, 30), self.max_retry_s))

    async def _flush(self) -> None:
        done = self.take_confirmed()
        if done:
            try:
                await self.in_writer(functools.partial(self.store.outbox_done, done))
            except Exception:
                log.exception("deleting published outbox rows failed; will try again")
                self._confirmed.extend(done)

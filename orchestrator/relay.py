"""The outbox relay: publish committed messages, forget them once the broker confirms.

Publishing never waits for the previous confirm: rows go out as soon as they are committed,
confirms come back asynchronously, and confirmed rows are deleted by the next commit of
saga state (no fsync of their own), or after a quiet moment. A row whose publish fails stays
in the outbox and is sent again (participants dedupe by command id).
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractExchange

from messages import amqp, tracing
from messages.logs import saga_context
from orchestrator.store import OutboxMessage, SagaStore

log = logging.getLogger(__name__)

BATCH = 512
MAX_IN_FLIGHT = 4096  # unconfirmed publishes at once; bounds memory under a slow broker
IDLE_FLUSH_S = 0.05  # how long confirmed rows may wait to be deleted when nothing else happens


class OutboxRelay:
    """Runs until cancelled; ``wake()`` after each commit that queued messages."""

    def __init__(
        self, store: SagaStore, exchanges: dict[str, AbstractExchange], retry_s: float
    ) -> None:
        self.store = store
        self.exchanges = exchanges
        self.retry_s = retry_s
        self._ready = asyncio.Event()
        self._ready.set()  # whatever a previous run left in the outbox goes first
        self._cursor = 0  # highest row id handed to a publish
        self._confirmed: list[int] = []
        self._failed = False
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._ready.set()

    def take_confirmed(self) -> list[int]:
        """Confirmed rows, for the caller's next commit to delete."""
        done, self._confirmed = self._confirmed, []
        return done

    def give_back(self, ids: list[int]) -> None:
        """That commit failed: delete these later after all."""
        self._confirmed.extend(ids)

    async def run(self) -> None:
        try:
            while True:
                if self._failed:
                    await self._recover()
                self._ready.clear()
                rows = self.store.outbox(BATCH, after=self._cursor)
                if not rows:
                    await self._idle()
                    continue
                for row in rows:
                    await self._slots.acquire()
                    self._cursor = row.id or self._cursor
                    task = asyncio.create_task(self._publish(row))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _idle(self) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), IDLE_FLUSH_S)
        except TimeoutError:
            self._flush()  # nothing is being committed that could take them

    async def _publish(self, row: OutboxMessage) -> None:
        try:
            await amqp.publish(
                self.exchanges[row.exchange],
                row.wire,
                row.routing_key,
                mandatory=row.mandatory,
                headers={tracing.HEADER: row.traceparent} if row.traceparent else None,
            )
        except Exception as exc:  # whatever it was, the row must be sent again
            with saga_context(row.wire.correlation_id):
                log.warning("outbox publish failed, will retry: %s", exc)
            self._failed = True
            self._ready.set()
        else:
            assert row.id is not None
            self._confirmed.append(row.id)
        finally:
            self._slots.release()

    async def _recover(self) -> None:
        """After a failed publish: let the rest settle, wait, then resend all unconfirmed."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._flush()
        await asyncio.sleep(self.retry_s)
        self._failed = False
        self._cursor = 0

    def _flush(self) -> None:
        if self._confirmed:
            done, self._confirmed = self._confirmed, []
            self.store.outbox_done(done)

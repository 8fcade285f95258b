"""Group commit in a writer thread: whatever arrives during one commit goes in the next.

One fsync per batch instead of one per message is what lets a SQLite-backed service keep up
with a broker, without making anything less durable: nobody is acked before the batch that
holds their change is on disk. Under load the commit runs in a thread of its own, so the
event loop keeps reading, decoding and deciding while the disk syncs, and whatever arrives
meanwhile waits for one fsync together (large batches). A lone item, when nothing else is
going on, is committed on the loop at once: handing it to a thread and back would cost more
than its fsync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
X = TypeVar("X")

log = logging.getLogger(__name__)


class GroupCommit(Generic[T, R]):
    """Hands items to ``process`` in batches, one batch at a time, in a writer thread.

    ``process`` returns one result per item, or an exception for an item that failed alone;
    if it raises, every item of the batch fails with that error. ``done``, if given, runs on
    the event loop with each batch and its results before any waiter wakes up.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | Exception]],
        done: Callable[[list[T], Sequence[R | Exception]], None] | None = None,
        *,
        name: str = "group-commit",
    ) -> None:
        self._process = process
        self._done = done
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False  # a batch is being processed, or about to be
        self._jobs = 0  # ``run`` calls in the writer thread, queued or running

    async def submit(self, item: T) -> R:
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Add ``item`` to the next batch now; the future resolves once it is processed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start)  # what else arrives in this loop turn joins it
        return future

    async def run(self, work: Callable[[], X]) -> X:
        """Run ``work`` in the writer thread, between batches (it shares their connection)."""
        loop = asyncio.get_running_loop()
        self._jobs += 1
        job = self._writer.submit(work)
        # Counted down when the work ends in the thread, not when a cancelled caller stops
        # waiting for it: until then a lone item must not be committed beside it.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._job_done))
        return await asyncio.wrap_future(job)

    def _job_done(self) -> None:
        self._jobs -= 1

    def close(self) -> None:
        """Finish the batch in progress and stop the thread."""
        self._writer.shutdown(wait=True)

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        items = [item for item, _ in batch]
        if len(items) == 1 and not self._jobs:  # (a job in the thread would race it)
            self._finish(batch, self._guarded(items))
            return
        try:
            running = asyncio.get_running_loop().run_in_executor(self._writer, self._guarded, items)
        except RuntimeError as exc:  # closed: fail the batch rather than leave it waiting
            self._finish(batch, [exc] * len(items))
            return
        running.add_done_callback(lambda f: self._finish(batch, _outcome(f, len(items))))

    def _guarded(self, items: list[T]) -> Sequence[R | Exception]:
        try:
            return self._process(items)
        except Exception as exc:
            return [exc] * len(items)

    def _finish(
        self, batch: list[tuple[T, asyncio.Future[R]]], results: Sequence[R | Exception]
    ) -> None:
        if self._done is not None:
            try:
                self._done([item for item, _ in batch], results)
            except Exception:  # the waiters must wake whatever happens, or they hang
                log.exception("after a group commit")
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the waiter was cancelled
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._waiting:
            self._start()
        else:
            self._busy = False


def _outcome(done: asyncio.Future[Sequence[R | Exception]], n: int) -> Sequence[R | Exception]:
    """A batch's results, or its failure (the thread's future cancelled at shutdown) for all."""
    if done.cancelled():
        return [RuntimeError("the writer stopped before this batch was committed")] * n
    exc = done.exception()
    if exc is not None:
        return [exc if isinstance(exc, Exception) else RuntimeError(repr(exc))] * n
    return done.result()

"""Group commit: what arrives in the same event-loop turn is committed in one transaction.

One fsync per batch instead of one per message is what lets a SQLite-backed service keep up
with a broker, without making anything less durable: nobody is acked before the batch that
holds their change is on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Collects items submitted during one loop turn and hands them to ``process`` together.

    ``process`` returns one result per item, or an exception for an item that failed alone;
    if it raises, every item of the batch fails with that error.
    """

    def __init__(self, process: Callable[[list[T]], Sequence[R | Exception]]) -> None:
        self._process = process
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []

    async def submit(self, item: T) -> R:
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Add ``item`` to the next batch now; the future resolves once it is processed."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._run)
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        return future

    def _run(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            results: Sequence[R | Exception] = self._process([item for item, _ in batch])
        except Exception as exc:
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the waiter was cancelled
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

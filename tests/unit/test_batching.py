"""Group commit: what arrives together is processed together, in order, each item once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from messages.plumbing.batching import GroupCommit


def batches_of(scenario: str) -> list[list[str]]:
    """Run a scenario of submissions; return the batches the processor saw."""
    seen: list[list[str]] = []

    def process(items: list[str]) -> list[str | Exception]:
        seen.append(list(items))
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    async def main() -> None:
        group: GroupCommit[str, str] = GroupCommit(process)
        if scenario == "same turn":
            assert await asyncio.gather(group.submit("a"), group.submit("b")) == ["A", "B"]
        elif scenario == "one fails alone":
            results = await asyncio.gather(
                group.submit("a"), group.submit("bad"), return_exceptions=True
            )
            assert results[0] == "A" and isinstance(results[1], ValueError)

    asyncio.run(main())
    return seen


def test_what_arrives_in_one_loop_turn_is_one_batch() -> None:
    assert batches_of("same turn") == [["a", "b"]]


def test_an_item_that_fails_fails_alone() -> None:
    assert batches_of("one fails alone") == [["a", "bad"]]


def test_what_arrives_during_a_commit_is_the_next_batch() -> None:
    """The commit runs in its thread; the loop goes on and gathers the next batch meanwhile."""
    seen: list[list[int]] = []
    first_started = threading.Event()
    release = threading.Event()

    def process(items: list[int]) -> list[int | Exception]:
        seen.append(list(items))
        first_started.set()
        release.wait(5)  # the fsync: the event loop is not blocked by it
        return items

    async def main() -> None:
        group: GroupCommit[int, int] = GroupCommit(process)
        first = [group.enqueue(1), group.enqueue(2)]
        while not first_started.is_set():
            await asyncio.sleep(0.001)
        later = [group.enqueue(n) for n in (3, 4, 5)]
        release.set()
        assert await asyncio.gather(*first, *later) == [1, 2, 3, 4, 5]
        group.close()

    asyncio.run(main())
    assert seen == [[1, 2], [3, 4, 5]]


def test_a_lone_item_is_committed_on_the_loop_without_a_thread_hop() -> None:
    threads: list[str] = []

    def process(items: list[str]) -> list[str | Exception]:
        threads.append(threading.current_thread().name)
        return list(items)

    async def main() -> None:
        group: GroupCommit[str, str] = GroupCommit(process)
        await group.submit("alone")
        await asyncio.gather(group.submit("a"), group.submit("b"))
        group.close()

    asyncio.run(main())
    assert threads[0] == threading.main_thread().name
    assert threads[1] != threading.main_thread().name


def test_done_runs_on_the_loop_before_the_waiters_wake() -> None:
    order: list[str] = []

    def done(items: list[str], results: Sequence[str | Exception]) -> None:
        order.append(f"done {items} in {threading.current_thread().name}")

    async def main() -> None:
        group: GroupCommit[str, str] = GroupCommit(lambda items: items, done)
        await asyncio.gather(group.submit("a"), group.submit("b"))
        order.append("woken")
        group.close()

    asyncio.run(main())
    assert order == [f"done ['a', 'b'] in {threading.main_thread().name}", "woken"]


def lone_items_beside_a_job(cancel_the_caller: bool) -> list[str]:
    """Hold a ``run`` job in the writer thread and enqueue a lone item meanwhile.

    Returns the items processed while the job still ran (there should be none).
    """
    job_running = threading.Event()
    release = threading.Event()
    overlaps: list[str] = []

    def job() -> None:
        job_running.set()
        release.wait(5)

    def process(items: list[str]) -> list[str | Exception]:
        if not release.is_set():
            overlaps.append(items[0])
        return list(items)

    async def main() -> None:
        group: GroupCommit[str, str] = GroupCommit(process)
        caller = asyncio.ensure_future(group.run(job))
        while not job_running.is_set():
            await asyncio.sleep(0.001)
        if cancel_the_caller:
            caller.cancel()
            await asyncio.sleep(0.01)
        lone = group.enqueue("alone")
        await asyncio.sleep(0.05)
        release.set()
        if not cancel_the_caller:
            await caller
        assert await lone == "alone"
        group.close()

    asyncio.run(main())
    return overlaps


def test_a_lone_item_never_runs_beside_a_job_in_the_writer_thread() -> None:
    """``run`` jobs share the batches' connection: a lone item waits its turn in the thread."""
    assert lone_items_beside_a_job(cancel_the_caller=False) == []


def test_a_cancelled_caller_does_not_end_its_job_early() -> None:
    """The job goes on in the thread after its caller gave up: lone items still wait for it."""
    assert lone_items_beside_a_job(cancel_the_caller=True) == []


def test_items_enqueued_after_close_fail_instead_of_waiting_forever() -> None:
    async def main() -> None:
        group: GroupCommit[str, str] = GroupCommit(lambda items: list(items))
        group.close()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(asyncio.gather(group.submit("a"), group.submit("b")), timeout=2)

    asyncio.run(main())

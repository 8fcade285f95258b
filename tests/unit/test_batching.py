"""Group commit: what arrives together is processed together, in order, each item once."""

from __future__ import annotations

import asyncio

from messages.batching import GroupCommit


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

"""Acks several at once, in the order decided, never past a delivery still in hand."""

from __future__ import annotations

import asyncio
from typing import Any

from messages.plumbing.delivery import _Acks


class SlowChannel:
    """Records ack and nack frames when they reach it; the first frame is slow to get there.

    As aiormq's write queue is when it is full: a frame sent from another task can get
    there first.
    """

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.calls = 0

    async def _arrive(self, frame: tuple[str, int, bool]) -> None:
        self.calls += 1
        for _ in range(5 if self.calls == 1 else 0):
            await asyncio.sleep(0)
        self.frames.append(frame)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self._arrive(("ack", tag, multiple))

    async def basic_nack(
        self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        await self._arrive(("nack", tag, multiple))

    async def basic_reject(self, tag: int, requeue: bool = True, wait: bool = True) -> None:
        await self._arrive(("reject", tag, False))


def run(script: Any) -> list[tuple[str, int, bool]]:
    channel = SlowChannel()

    async def main() -> None:
        acks = _Acks(channel)  # type: ignore[arg-type]
        script(acks)
        for _ in range(20):
            await asyncio.sleep(0)

    asyncio.run(main())
    return channel.frames


def test_settled_deliveries_at_the_head_go_in_one_frame() -> None:
    def script(acks: _Acks) -> None:
        for tag in (1, 2, 3):
            acks.received(tag)
        for tag in (3, 1, 2):
            acks.ack(tag)

    assert run(script) == [("ack", 3, True)]


def test_a_nack_is_never_overtaken_by_an_ack_that_covers_it() -> None:
    """An ack of 2 with multiple=True arriving before the nack of 1 would lose message 1."""

    def script(acks: _Acks) -> None:
        acks.received(1)
        acks.received(2)
        acks.nack(1)
        acks.ack(2)

    assert run(script) == [("nack", 1, False), ("ack", 2, True)]


def test_one_settled_behind_a_delivery_in_hand_is_acked_alone_and_never_again() -> None:
    def script(acks: _Acks) -> None:
        for tag in (1, 2, 3):
            acks.received(tag)
        acks.ack(2)  # 1 is still in hand: 2 goes alone

        def later() -> None:
            acks.ack(1)
            acks.ack(3)

        asyncio.get_running_loop().call_later(0, later)

    frames = run(script)
    assert frames == [("ack", 2, False), ("ack", 3, True)]


def test_a_failed_delivery_is_rejected_in_order_and_later_acks_pass_it() -> None:
    # A quorum queue counts a basic.reject toward its delivery limit (4.3+: not a nack).
    def script(acks: _Acks) -> None:
        for tag in (1, 2, 3):
            acks.received(tag)
        acks.reject(1)
        acks.ack(2)
        acks.ack(3)

    assert run(script) == [("reject", 1, False), ("ack", 3, True)]

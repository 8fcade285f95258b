"""Summarise a `py-spy record -f raw` file: own and inclusive samples per function, and buckets.

    py-spy record -p PID -f raw -o orch.txt -d 10 -r 200 --nonblocking
    python benchmarks/pyspy_summary.py orch.txt [TOP]

Line numbers are dropped so that one function is one row. A thread blocked in fdatasync
is sampled (it is not idle to py-spy); an idle uvloop is not.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable

Rule = Callable[[str, str], bool]

# First match wins; `stack` is the whole ;-joined stack, `leaf` the innermost frame.
BUCKETS: list[tuple[str, Rule]] = [
    ("idle: waiting in epoll (asyncio's selector)", lambda stack, leaf: "EpollSelector" in leaf),
    (
        "orchestrator COMMIT of state + outbox (WAL write, fdatasync)",
        lambda stack, leaf: leaf.startswith("SqliteStore.commit_many "),
    ),
    (
        "participant COMMIT (WAL write, fdatasync)",
        lambda stack, leaf: leaf.startswith("transaction (workers/runtime.py"),
    ),
    (
        "other SQLite statements",
        lambda stack, leaf: "SqliteStore" in leaf or leaf.startswith(("_apply ", "reserve ")),
    ),
    ("writer thread, the rest", lambda stack, leaf: "_worker (concurrent" in stack),
    # uvloop's run loop is C: its callbacks, reads and waits for the GIL show as this frame.
    ("uvloop's own work (C)", lambda stack, leaf: leaf.startswith("Runner.run ")),
    (
        "socket send syscalls",
        lambda stack, leaf: (
            "StreamWriter.write" in leaf or "_SelectorSocketTransport.write" in leaf
        ),
    ),
    (
        "publishing: aiormq, pamqp framing",
        lambda stack, leaf: any(
            f in stack for f in ("Connection.__writer", "basic_publish", "basic_ack")
        ),
    ),
    (
        "receiving: aiormq, pamqp parsing",
        lambda stack, leaf: any(
            f in stack for f in ("Connection.__reader", "Channel._reader", "_read_ready")
        ),
    ),
    (
        "pydantic: validate, dump JSON, build models",
        lambda stack, leaf: "pydantic" in leaf or "messages/contract/codec.py" in leaf,
    ),
    (
        "engine, runtime, uuid",
        lambda stack, leaf: any(
            f in leaf for f in ("orchestrator/", "workers/", "messages/", "uuid.py")
        ),
    ),
    ("asyncio machinery", lambda stack, leaf: "asyncio" in leaf),
]


def _clean(frame: str) -> str:
    frame = re.sub(r":\d+\)$", ")", frame)
    return re.sub(r"\(/\S*?/(site-packages/|lib/python3\.\d+/)", "(", frame)


def main(path: str, top: int = 20) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            samples = int(count)
            total += samples
            frames = [_clean(f) for f in stack.split(";")]
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
            cleaned = ";".join(frames)
            name = next((n for n, rule in BUCKETS if rule(cleaned, frames[-1])), "other")
            buckets[name] += samples
    print(f"{path}: {total} samples")
    for title, counter, limit in (
        ("buckets", buckets, len(buckets)),
        ("own", own, top),
        ("inclusive", inclusive, top + 12),
    ):
        print(f"--- {title}")
        for frame, samples in counter.most_common(limit):
            print(f"{100 * samples / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20)

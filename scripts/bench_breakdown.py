"""Where a saga's milliseconds go: the per-hop breakdown of ``bench.py --breakdown``.

A saga's critical path, cut at each clock reading we can get without touching the services:

    request              the client publishes PlaceOrder -> the orchestrator decides `started`
    <step>.orchestrator  the orchestrator decides `sent` -> the command reaches the tap
                         (its commit, the outbox relay, the publish, the broker's routing
                         and delivery)
    <step>.participant   the command reaches the tap -> the reply reaches the tap (delivery,
                         decode, dedupe, handler, commit, publish)
    <step>.reply         the reply reaches the tap -> the orchestrator's decision on it
                         (delivery, decode, deciding)
    result               the saga's last decision -> the client has the SagaFinished

Decisions are the `at` of the orchestrator's history entries, which come back in the
SagaFinished. The tap is an exclusive, auto-delete queue of the bench's, bound to
saga.commands (one binding per participant) and saga.replies, consumed without acks: the
broker hands it a copy of every command and reply as it routes the original. The queue is
not durable, so the copies are never written to disk and add little broker work. A tap
reading is the routing plus one delivery to the bench, about what the original's delivery
to its consumer takes: so `orchestrator` and `participant` hops include that delivery, and
a `reply` hop is mostly the orchestrator's decode and decision (a fraction of a
millisecond, below zero now and then when the bench's process is the slower to wake).

Every clock here is the wall clock of one machine: the bench's time.time() and the
orchestrator's datetime.now(UTC) read the same clock, so times from different processes
compare. With the services on other machines they would not (clock skew).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import aiormq.abc

from messages.contract import topology
from messages.contract.models import SagaFinished

SAGA = "saga"  # the `step` of history entries about the saga as a whole (orchestrator.engine)
COMMAND = "command"
REPLY = "reply"
# History events that are the orchestrator's decision on a reply; the suffix names the hop.
DECISIONS = {"succeeded": "", "failed": "", "compensated": "/undo", "compensation_failed": "/undo"}
HOP_TEXT = {
    "request": "client publish -> orchestrator decided `started`",
    "orchestrator": "decided `sent` -> command on the tap (commit, relay, publish)",
    "participant": "command -> reply on the tap (the participant's whole turn)",
    "reply": "reply on the tap -> orchestrator decided on it",
    "result": "last decision -> client has the result (commit, relay, publish)",
}


@dataclass
class Timeline:
    """The clock readings of one saga, all time.time() seconds."""

    published: float  # the client, just before publishing PlaceOrder
    received: float  # the client, on receiving the SagaFinished
    history: list[tuple[float, str, str]]  # the orchestrator's (at, step, event), in order
    taps: list[tuple[float, str]] = field(default_factory=list)  # (seen, COMMAND or REPLY)


def saga_hops(timeline: Timeline) -> dict[str, float] | None:
    """Seconds per hop of one saga, in path order; None when its taps and history disagree.

    Each command sent must have one command and one reply on the tap and one decision, in
    order; a saga with a resend, a late reply or a lost copy is left out (None). The hops
    add up to the end-to-end latency when each `sent` is at the previous decision (the
    engine decides both at once).
    """
    started = next(
        (at for at, step, event in timeline.history if step == SAGA and event == "started"),
        None,
    )
    sent = [(at, step) for at, step, event in timeline.history if event == "sent"]
    decided = [
        (at, step + DECISIONS[event])
        for at, step, event in timeline.history
        if step != SAGA and event in DECISIONS
    ]
    taps = sorted(timeline.taps)
    commands = [seen for seen, kind in taps if kind == COMMAND]
    replies = [seen for seen, kind in taps if kind == REPLY]
    if started is None or not sent or not timeline.history:
        return None
    if not len(sent) == len(decided) == len(commands) == len(replies):
        return None
    hops = {"request": started - timeline.published}
    for (sent_at, step), (decided_at, name), command, reply in zip(
        sent, decided, commands, replies, strict=True
    ):
        if step != name.split("/")[0] or f"{name}.orchestrator" in hops:
            return None
        hops[f"{name}.orchestrator"] = command - sent_at
        hops[f"{name}.participant"] = reply - command
        hops[f"{name}.reply"] = decided_at - reply
    hops["result"] = timeline.received - timeline.history[-1][0]
    return hops


def report(
    timelines: Sequence[Timeline],
    summarise: Callable[[Sequence[float]], dict[str, Any]],
    concurrency: int,
) -> dict[str, Any]:
    """result["breakdown"]: per hop ``summarise(seconds)`` (p50, p90...), and their sum."""
    per_hop: dict[str, list[float]] = {}
    end_to_end: list[float] = []
    for timeline in timelines:
        hops = saga_hops(timeline)
        if hops is None:
            continue
        end_to_end.append(timeline.received - timeline.published)
        for name, seconds in hops.items():
            per_hop.setdefault(name, []).append(seconds)
    hops_ms = {name: summarise(values) for name, values in per_hop.items()}
    medians = [hop["p50"] for hop in hops_ms.values() if hop.get("p50") is not None]
    return {
        "sagas": len(timelines),
        "with_timeline": len(end_to_end),
        "concurrency": concurrency,
        "hops_ms": hops_ms,
        "sum_of_p50_ms": round(sum(medians), 3) if medians else None,
        "end_to_end_ms": summarise(end_to_end),
        "clocks": "wall clock of one machine (bench, orchestrator history, tap receipt)",
    }


def breakdown_lines(breakdown: dict[str, Any]) -> list[str]:
    """The human output's table of result["breakdown"]."""
    lines = [
        f"breakdown   {breakdown['with_timeline']} of {breakdown['sagas']} sagas at "
        f"c={breakdown['concurrency']} (hops cut at the broker's tap)      p50 ms    p90 ms"
    ]
    for name, hop in breakdown["hops_ms"].items():
        step, _, kind = name.rpartition(".")
        label = f"{step} {kind}" if step else name
        lines.append(
            f"  {label:<32}{_cell(hop.get('p50'))}{_cell(hop.get('p90'))}  "
            f"{HOP_TEXT.get(kind or name, '')}"
        )
    total = breakdown["end_to_end_ms"]
    lines.append(
        f"  {'sum of the p50s':<32}{_cell(breakdown['sum_of_p50_ms'])}"
        f"            end to end: p50 {_cell(total.get('p50')).strip()} ms, "
        f"p90 {_cell(total.get('p90')).strip()} ms"
    )
    return lines


def _cell(value: float | None) -> str:
    return f"{'-' if value is None else f'{value:.2f}':>10}"


class Tap:
    """Copies of every command and reply, noted with the time they arrive; see the top.

    Its own aiormq connection, not the bench's aio-pika one: fewer steps between the socket
    and the clock reading, about as few as in a service.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: defaultdict[str, list[tuple[float, str]]] = defaultdict(list)
        self.timelines: dict[str, Timeline] = {}
        self._connection: aiormq.abc.AbstractConnection | None = None

    async def open(self) -> None:
        self._connection = connection = await aiormq.connect(
            self.url, client_properties={"connection_name": "bench:tap"}
        )
        channel = await connection.channel(publisher_confirms=False)
        declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
        assert declared is not None and declared.queue is not None
        for participant in topology.PARTICIPANTS:
            await channel.queue_bind(declared.queue, topology.COMMANDS_EXCHANGE, participant)
        await channel.queue_bind(
            declared.queue, topology.REPLIES_EXCHANGE, topology.REPLY_ROUTING_KEY
        )
        await channel.basic_consume(declared.queue, self._on_copy, no_ack=True)

    async def _on_copy(self, message: aiormq.abc.DeliveredMessage) -> None:
        seen = time.time()
        kind = COMMAND if message.exchange == topology.COMMANDS_EXCHANGE else REPLY
        # correlation_id is the saga id on everything the services publish (messages.contract.codec)
        self.seen[message.header.properties.correlation_id or ""].append((seen, kind))

    def on_result(self, message: SagaFinished, published: float, received: float) -> None:
        """SagaClient's hook: a saga's result came, with the client's two clock readings."""
        history = [(e.at.timestamp(), e.step, e.event) for e in message.history]
        self.timelines[str(message.saga_id)] = Timeline(published, received, history)

    def collected(self) -> list[Timeline]:
        """The sagas' timelines, each with its tap readings."""
        for saga_id, timeline in self.timelines.items():
            timeline.taps = list(self.seen.get(saga_id, ()))
        return list(self.timelines.values())

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

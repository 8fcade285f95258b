"""A second saga, declared here, runs through the same engine, runtime and store as the order saga.

A refund of a completed order: cancel the order, put the item back on the shelf, then refund
the payment (the pivot). Its messages, definition and participants are declared in the
first screen below; the orchestrator and participant runtimes are the product's own, on a
real broker and real SQLite files.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from decimal import Decimal
from pathlib import Path
from typing import Literal

import aio_pika
import pytest

from messages.contract import topology
from messages.contract.codec import decode
from messages.contract.models import (
    Command,
    Envelope,
    Identifier,
    Money,
    Quantity,
    RefundPayment,
    SagaFinished,
    SagaStatus,
)
from messages.plumbing import amqp
from messages.plumbing.settings import BrokerSettings
from orchestrator.definition import Call, RetryPolicy, SagaDefinition, Step, StepKind, pick
from orchestrator.runtime import Orchestrator, definition_from
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import SqliteStore
from workers.runtime import Participant, Succeeded, open_db, serve
from workers.settings import WorkerSettings

pytestmark = pytest.mark.broker

# --- the refund saga, as data ----------------------------------------------------------------


class RefundOrder(Envelope):
    """Request: refund a completed order."""

    type: Literal["RefundOrder"] = "RefundOrder"
    order_id: Identifier
    customer_id: Identifier
    sku: Identifier
    quantity: Quantity
    amount: Money


class CancelOrder(Command):
    type: Literal["CancelOrder"] = "CancelOrder"
    order_id: Identifier


class ReopenOrder(Command):
    type: Literal["ReopenOrder"] = "ReopenOrder"
    order_id: Identifier


class RestockItem(Command):
    type: Literal["RestockItem"] = "RestockItem"
    sku: Identifier
    quantity: Quantity


class UnstockItem(Command):
    type: Literal["UnstockItem"] = "UnstockItem"
    sku: Identifier
    quantity: Quantity


def refund_saga(timeout_s: float) -> SagaDefinition:
    """Cancel the order, restock the item, refund the payment (the point of no return)."""
    bounded, until_answered = RetryPolicy(timeout_s, 2, max_wait_s=1), RetryPolicy(timeout_s)
    order, item = pick("order_id"), pick("sku", "quantity")
    return SagaDefinition(
        name="refund",
        request=RefundOrder,
        describe=lambda r: f"refund {r['order_id']} for {r['customer_id']}",
        steps=(
            Step(
                "cancel_order",
                "order",
                StepKind.COMPENSATABLE,
                Call(CancelOrder, order),
                Call(ReopenOrder, order),
                bounded,
            ),
            Step(
                "restock_item",
                "inventory",
                StepKind.COMPENSATABLE,
                Call(RestockItem, item),
                Call(UnstockItem, item),
                bounded,
            ),
            Step(
                "refund_payment",
                "payment",
                StepKind.PIVOT,
                Call(RefundPayment, pick("customer_id", "amount")),
                None,
                until_answered,
            ),
        ),
        compensation_retry=until_answered,
    )


# Each participant of this test records what it did, in its own SQLite file.
LOG = "CREATE TABLE IF NOT EXISTS done (saga_id TEXT, what TEXT);"


def did(db: sqlite3.Connection, command: Command, what: str) -> Succeeded:
    db.execute("INSERT INTO done VALUES (?, ?)", (str(command.saga_id), what))
    return Succeeded(what)


def cancel(c: CancelOrder, db: sqlite3.Connection) -> Succeeded:
    return did(db, c, f"cancelled {c.order_id}")


def reopen(c: ReopenOrder, db: sqlite3.Connection) -> Succeeded:
    return did(db, c, f"reopened {c.order_id}")


def restock(c: RestockItem, db: sqlite3.Connection) -> Succeeded:
    return did(db, c, f"+{c.quantity} {c.sku}")


def unstock(c: UnstockItem, db: sqlite3.Connection) -> Succeeded:
    return did(db, c, f"-{c.quantity} {c.sku}")


def refund(c: RefundPayment, db: sqlite3.Connection) -> Succeeded:
    return did(db, c, f"refunded {c.amount}")


PARTICIPANTS = {
    "order": Participant("order", LOG, {CancelOrder: cancel, ReopenOrder: reopen}),
    "inventory": Participant("inventory", LOG, {RestockItem: restock, UnstockItem: unstock}),
    "payment": Participant("payment", LOG, {RefundPayment: refund}),
}

# --- running it --------------------------------------------------------------------------------

TIMEOUT_S = 0.3  # a silent participant times out in about a second (two attempts)


class Refunds:
    """The product's orchestrator and participant runtimes, in this process, on one vhost."""

    def __init__(self, amqp_url: str, data_dir: Path) -> None:
        self.amqp_url = amqp_url
        self.data_dir = data_dir
        self.tasks: list[asyncio.Task[None]] = []

    def start_orchestrator(self) -> Orchestrator:
        settings = OrchestratorSettings(
            amqp_url=self.amqp_url, data_dir=self.data_dir, tick_s=0.05, metrics_port=0
        )
        # Both sagas at once: the order saga from settings beside the refund saga.
        definitions = [definition_from(settings), refund_saga(TIMEOUT_S)]
        orchestrator = Orchestrator(settings, SqliteStore(settings.db_path), definitions)
        self.tasks.append(asyncio.create_task(orchestrator.run()))
        return orchestrator

    def start_participants(self, *names: str) -> None:
        settings = WorkerSettings(amqp_url=self.amqp_url, data_dir=self.data_dir, metrics_port=0)
        dbs = {n: open_db(settings.db_path(n), LOG) for n in names}
        participants = [PARTICIPANTS[n] for n in names]
        self.tasks.append(asyncio.create_task(serve(participants, dbs, settings, "+".join(names))))

    def done(self, participant: str, saga_id: uuid.UUID) -> list[str]:
        """What a participant did for a saga, in order."""
        with closing(sqlite3.connect(self.data_dir / f"{participant}.db")) as db:
            rows = db.execute("SELECT what FROM done WHERE saga_id = ?", (str(saga_id),))
            return [what for (what,) in rows]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@asynccontextmanager
async def refunds(amqp_url: str, data_dir: Path) -> AsyncIterator[Refunds]:
    runs = Refunds(amqp_url, data_dir)
    try:
        yield runs
    finally:
        await runs.stop()


def a_refund() -> RefundOrder:
    return RefundOrder(
        saga_id=uuid.uuid4(),
        order_id="order-7",
        customer_id="c-1",
        sku="item-1",
        quantity=2,
        amount=Money(amount=Decimal("30.00")),
    )


async def request_refund(
    amqp_url: str, request: RefundOrder, timeout: float = 30.0
) -> SagaFinished:
    """Place a refund the way a client would, and wait for its saga's result."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await amqp.declare_topology(channel, BrokerSettings(amqp_url=amqp_url))
        answers = await channel.declare_queue(exclusive=True)
        publisher = await amqp.Publisher.on(channel)
        await publisher.publish(
            topology.REQUESTS_EXCHANGE,
            request,
            topology.REQUEST_ROUTING_KEY,
            reply_to=answers.name,
        )
        async with answers.iterator(timeout=timeout) as incoming:
            async for delivered in incoming:
                await delivered.ack()
                result = decode(delivered.body, type_hint=delivered.type)
                assert isinstance(result, SagaFinished)
                return result
    raise AssertionError("the reply queue closed without a result")


def steps_of(result: SagaFinished) -> list[tuple[str, str]]:
    return [(e.step, e.event) for e in result.history if e.step != "saga"]


# --- the scenarios -----------------------------------------------------------------------------


def test_a_refund_runs_every_step_through_the_same_runtime(amqp_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with refunds(amqp_url, tmp_path) as stack:
            # Given the orchestrator running both sagas, and the three participants
            stack.start_orchestrator()
            stack.start_participants("order", "inventory", "payment")

            # When a refund is requested
            request = a_refund()
            result = await request_refund(amqp_url, request)

            # Then each step ran once, in order, with commands built from the saga's input
            assert result.status is SagaStatus.COMPLETED, result.reason
            assert steps_of(result) == [
                ("cancel_order", "sent"),
                ("cancel_order", "succeeded"),
                ("restock_item", "sent"),
                ("restock_item", "succeeded"),
                ("refund_payment", "sent"),
                ("refund_payment", "succeeded"),
            ]
            assert stack.done("order", request.saga_id) == ["cancelled order-7"]
            assert stack.done("inventory", request.saga_id) == ["+2 item-1"]
            assert stack.done("payment", request.saga_id) == ["refunded 30.00 EUR"]
            # And the store holds it as a refund saga, with its input as data
            saved = SqliteStore(tmp_path / "orchestrator.db", readonly=True)
            state = saved.get(request.saga_id)
            saved.close()
            assert state is not None
            assert (state.saga, state.input["order_id"]) == ("refund", "order-7")
            assert result.history[0].detail == "refund order-7 for c-1"

    asyncio.run(scenario())


def test_a_step_that_times_out_is_compensated_in_reverse(amqp_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with refunds(amqp_url, tmp_path) as stack:
            # Given inventory down: restocking will go unanswered
            orchestrator = stack.start_orchestrator()
            stack.start_participants("order", "payment")
            request = a_refund()
            waiting = asyncio.create_task(request_refund(amqp_url, request))

            # When it times out, and inventory comes back while its undo is being resent
            for _ in range(200):
                await asyncio.sleep(0.05)
                state = orchestrator.store.get(request.saga_id)
                if state is not None and state.status is SagaStatus.COMPENSATING:
                    break
            await asyncio.sleep(1.0)  # a resend or two of the undo, unanswered
            stack.start_participants("inventory")
            result = await waiting

            # Then the restock and the cancellation were undone, newest first, and the
            # pivot (the refund) was never sent
            assert result.status is SagaStatus.COMPENSATED
            assert result.reason == "restock_item_timed_out"
            events = steps_of(result)
            assert ("restock_item", "timed_out") in events
            assert events[-2:] == [("cancel_order", "sent"), ("cancel_order", "compensated")]
            assert ("restock_item", "compensated") in events
            assert events.index(("restock_item", "compensated")) < events.index(
                ("cancel_order", "compensated")
            )
            assert not any(step == "refund_payment" for step, _ in events)
            assert stack.done("order", request.saga_id) == ["cancelled order-7", "reopened order-7"]
            # The late restock and its undo both arrived: the shelf is as it was
            assert sorted(stack.done("inventory", request.saga_id)) == ["+2 item-1", "-2 item-1"]
            assert stack.done("payment", request.saga_id) == []

    asyncio.run(scenario())

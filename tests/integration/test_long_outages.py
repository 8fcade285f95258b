"""Correct when things go wrong for a long time: only forward after the pivot, stuck sagas
visible and abortable, one bad outbox row never holding up the rest, one orchestrator per
store and vhost, results only to a client's own queue, and repeated requests answered."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from messages.contract import topology
from messages.contract.codec import decode
from messages.contract.models import CommandSucceeded, Money, PlaceOrder, SagaFinished
from orchestrator.engine import command_id
from tests.integration.stack import FAST_TIMEOUTS, ROOT, Stack, amqp_channel, drain, send
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker


def saga_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator ARGS` as a user runs it, with the orchestrator's settings."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env=stack.environment(**FAST_TIMEOUTS),
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def listed(stack: Stack, *args: str) -> list[dict[str, Any]]:
    done = saga_cli(stack, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_an_order_service_down_for_long_never_fails_a_charged_customer(stack: Stack) -> None:
    # Given everything but the order service, with time-outs of a fraction of a second
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("payment")
    stack.orchestrator(**FAST_TIMEOUTS)
    orders = [stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60) for _ in range(3)]

    # When CompleteOrder goes unanswered far longer than all the old attempts together
    wait_until("the sagas to be stuck", lambda: len(listed(stack, "--stuck")) == 3)
    time.sleep(3)
    running = listed(stack)
    assert {s["status"] for s in running} == {"RUNNING"}, running
    saga = stack.saga(running[0]["saga_id"])
    assert sent(saga).count("CompleteOrder") >= 4  # was FAILED after 3 before
    assert "RefundPayment" not in sent(saga) and "ReleaseStock" not in sent(saga)
    stats = json.loads(saga_cli(stack, "stats", "--json").stdout)
    assert stats["stuck"] == 3
    assert "stuck: waiting" in saga_cli(stack, "show", running[0]["saga_id"]).stdout

    # Then once it is back, every one of them completes: same command id, applied once
    stack.worker("order")
    for order in orders:
        out, err = order.communicate(timeout=90)
        assert order.returncode == 0, (out, err)
        assert json.loads(out)["status"] == "COMPLETED"
    assert len(stack.query("order", "SELECT saga_id FROM orders")) == 3
    assert stack.stock("item-1") == 7
    assert listed(stack, "--stuck") == []


def test_a_stuck_pivot_aborted_by_an_operator_is_failed_for_good(stack: Stack) -> None:
    # Given a saga stuck on CompleteOrder, and someone watching saga.events
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("payment")
    stack.orchestrator(**FAST_TIMEOUTS)
    with amqp_channel(stack.amqp_url) as channel:
        events = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(events, topology.EVENTS_EXCHANGE, "saga.#")
        order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60)
        wait_until("the saga to be stuck", lambda: len(listed(stack, "--stuck")) == 1)
        saga_id = listed(stack)[0]["saga_id"]

        # When an operator aborts it
        aborted = saga_cli(stack, "abort", saga_id, "--reason", "order service is gone")

        # Then it ends FAILED saying the order's effect is unknown, and the client hears it
        assert aborted.returncode == 1, aborted  # it ends FAILED, as asked
        out, _ = order.communicate(timeout=30)
        result = json.loads(out)
        assert result["status"] == "FAILED"
        assert "CompleteOrder unanswered" in result["reason"]

        # When the order service comes back and answers the pending CompleteOrder after all
        stack.worker("order")
        wait_until(
            "the late reply to be recorded",
            lambda: "late_reply" in [e["event"] for e in stack.saga(saga_id)["history"]],
        )

        # Then the saga stays FAILED, and saga.events carries exactly one terminal event
        assert stack.saga(saga_id)["status"] == "FAILED"
        time.sleep(0.5)
        finished = [decode(body) for _, body in drain(channel, events, expect=2, timeout=2)]
    assert [(m.saga_id, m.status) for m in finished] == [(uuid.UUID(saga_id), "FAILED")]


def test_an_unpublishable_command_does_not_hold_up_other_sagas(stack: Stack) -> None:
    # Given a stack whose order queue has been deleted, so CompleteOrder is unroutable
    stack.worker("inventory", "--stock", "item-1=100")
    stack.worker("payment")
    stack.orchestrator(**FAST_TIMEOUTS)
    with amqp_channel(stack.amqp_url) as channel:
        channel.queue_delete(topology.command_queue("order"))
    stuck = [stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60) for _ in range(2)]
    wait_until("CompleteOrder to be decided", lambda: len(listed(stack, "--state", "RUNNING")) == 2)

    # When orders that never reach the order step come in (declined payments)
    began = time.monotonic()
    for _ in range(5):
        code, result = stack.place_order(*ORDER, "--amount", "5000.00", timeout=10)
        assert code == 1 and result["reason"] == "payment_declined", result
    # Then they finish at normal speed (the relay backs off only the unroutable rows)
    assert time.monotonic() - began < 10

    # And the stuck ones are neither compensated nor failed: their deadline never started,
    # since the broker never took the command; they show up as stuck
    wait_until("the unroutable sagas to be stuck", lambda: len(listed(stack, "--stuck")) == 2)
    assert {s["status"] for s in listed(stack, "--stuck")} == {"RUNNING"}

    # When the order service starts (and declares its queue again), they complete
    stack.worker("order")
    for order in stuck:
        out, err = order.communicate(timeout=60)
        assert order.returncode == 0, (out, err)


def test_a_second_orchestrator_refuses_to_start(stack: Stack, tmp_path: Any) -> None:
    stack.orchestrator()

    # On the same store
    same_store = saga_cli(stack, "run")
    assert same_store.returncode == 2
    assert "another orchestrator" in same_store.stderr and "one orchestrator per store" in (
        same_store.stderr
    )

    # On the same vhost, with a store of its own (started from another directory)
    other = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run"],
        cwd=ROOT,
        env=stack.environment(SAGA_DATA_DIR=str(tmp_path / "elsewhere")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 2
    assert "orchestrator.requests" in other.stderr and "exclusive" in other.stderr
    assert "Traceback" not in other.stderr


def test_results_go_only_to_a_clients_own_queue(stack: Stack) -> None:
    stack.worker("inventory", "--stock", "item-1=10")
    stack.orchestrator()
    request = PlaceOrder(
        saga_id=uuid.uuid4(), customer_id="c-1", sku="item-1", quantity=1, amount=Money(amount="5")
    )
    with amqp_channel(stack.amqp_url) as channel:
        # When a request asks for its result in a participant's command queue
        send(
            channel,
            topology.REQUESTS_EXCHANGE,
            topology.REQUEST_ROUTING_KEY,
            request,
            reply_to=topology.command_queue("inventory"),
        )
        # Then it is dead-lettered with the reason, and no saga starts
        (props, _), *_ = drain(channel, topology.dead_letter_queue(topology.REQUESTS_QUEUE), 1)
    assert props.headers[topology.REASON_HEADER] == "bad_reply_to"
    assert listed(stack) == []
    assert stack.stock("item-1") == 10


def test_a_repeated_request_gets_the_result_too(stack: Stack) -> None:
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("payment")
    stack.orchestrator(**FAST_TIMEOUTS)
    request = PlaceOrder(
        saga_id=uuid.uuid4(), customer_id="c-1", sku="item-1", quantity=1, amount=Money(amount="5")
    )

    def place(channel: Any) -> str:
        queue = str(channel.queue_declare("", exclusive=True).method.queue)
        send(
            channel,
            topology.REQUESTS_EXCHANGE,
            topology.REQUEST_ROUTING_KEY,
            request,
            reply_to=queue,
        )
        return queue

    with amqp_channel(stack.amqp_url) as channel:
        # Given a saga still running (no order service yet), asked for twice
        first = place(channel)
        wait_until("the saga to start", lambda: len(listed(stack)) == 1)
        second = place(channel)
        # When it finishes, both requesters get the result
        stack.worker("order")
        results = [drain(channel, queue, 1, timeout=20) for queue in (first, second)]
        assert all(len(r) == 1 for r in results), results
        assert {decode(r[0][1]).status for r in results} == {"COMPLETED"}  # type: ignore[union-attr]
        # And a third request after the end gets it as well, with nothing done again
        third = place(channel)
        (_, body), *_ = drain(channel, third, 1, timeout=10)
    answer = decode(body)
    assert isinstance(answer, SagaFinished) and answer.status == "COMPLETED"
    assert stack.stock("item-1") == 9
    assert len(stack.query("order", "SELECT saga_id FROM orders")) == 1


def test_a_reply_from_the_wrong_sender_is_dead_lettered(stack: Stack) -> None:
    # Given replies that must come from the broker user each participant logs in as
    users = ",".join(f"{p}=guest" for p in topology.PARTICIPANTS)
    stack.worker("inventory", "--stock", "item-1=10")
    stack.orchestrator(SAGA_PARTICIPANT_USERS=users, SAGA_STEP_TIMEOUT_S="60")
    order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=30)
    wait_until("ChargePayment", lambda: "charge_payment" in [s["step"] for s in listed(stack)])
    saga_id = uuid.UUID(listed(stack)[0]["saga_id"])
    forged = CommandSucceeded(
        saga_id=saga_id,
        command_id=command_id(saga_id, "charge_payment", compensating=False),
        command_type="ChargePayment",
        participant="payment",
        detail="charged (not really)",
    )
    with amqp_channel(stack.amqp_url) as channel:
        # When something publishes a success for ChargePayment without the payment user's
        # login (user_id), or posing as another participant
        send(channel, topology.REPLIES_EXCHANGE, topology.REPLY_ROUTING_KEY, forged)
        wrong = forged.model_copy(update={"participant": "inventory", "message_id": uuid.uuid4()})
        send(
            channel,
            topology.REPLIES_EXCHANGE,
            topology.REPLY_ROUTING_KEY,
            wrong,
            user_id="guest",
        )
        dead = drain(channel, topology.dead_letter_queue(topology.REPLIES_QUEUE), 2)

    # Then both are dead-lettered with the reason, and the saga still waits for payment
    reasons = sorted(props.headers[topology.REASON_HEADER] for props, _ in dead)
    assert reasons == ["unauthenticated_reply", "wrong_participant"]
    assert "charge_payment: succeeded" not in stack.services["orchestrator"].output()
    stack.worker("payment")
    stack.worker("order")
    out, _ = order.communicate(timeout=40)
    assert json.loads(out)["status"] == "COMPLETED"


def test_a_saga_that_cannot_be_read_is_quarantined_and_the_rest_go_on(stack: Stack) -> None:
    # Given two sagas waiting on a silent payment service, resending ChargePayment
    stack.worker("inventory", "--stock", "item-1=10")
    stack.orchestrator(**{**FAST_TIMEOUTS, "SAGA_STEP_MAX_ATTEMPTS": "1000"})
    orders = [stack.place_order_async(*ORDER, "--amount", "25.00", timeout=30) for _ in range(2)]
    wait_until("two sagas", lambda: len(listed(stack)) == 2)
    bad, good = (s["saga_id"] for s in listed(stack))

    # When one of them is damaged in the store (a bad upgrade, a hand edit)
    with sqlite3.connect(stack.data_dir / "orchestrator.db") as db:
        db.execute("UPDATE sagas SET state = '{\"broken\": 1}' WHERE saga_id = ?", (bad,))

    # Then its next deadline quarantines it, once, and the other one goes on
    wait_until(
        "the quarantine",
        lambda: [s["saga_id"] for s in listed(stack, "--state", "QUARANTINED")] == [bad],
    )
    stack.worker("payment")
    stack.worker("order")
    wait_until("the good saga", lambda: stack.saga(good)["status"] == "COMPLETED", timeout=30)
    assert stack.services["orchestrator"].poll() is None
    assert stack.services["orchestrator"].output().count(f"saga {bad} quarantined") == 1
    for order in orders:
        order.kill()


def test_health_says_whether_a_service_is_connected_and_consuming(stack: Stack) -> None:
    assert saga_cli(stack, "health").returncode == 1  # not running
    stack.orchestrator()
    wait_until("healthy", lambda: saga_cli(stack, "health").returncode == 0)
    worker = subprocess.run(
        [sys.executable, "-m", "workers", "health", "payment"],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
    )
    assert worker.returncode == 1 and "not running" in worker.stdout + worker.stderr
    stack.worker("payment")
    wait_until(
        "payment healthy",
        lambda: (
            subprocess.run(
                [sys.executable, "-m", "workers", "health", "payment"],
                cwd=ROOT,
                env=stack.environment(),
                capture_output=True,
            ).returncode
            == 0
        ),
    )
    # A stopped process is reported at once (its file goes), a hung one once its report is old
    stack.kill("orchestrator")
    time.sleep(8)
    assert saga_cli(stack, "health").returncode == 1


def test_every_log_line_of_a_timed_out_saga_names_its_trace_and_message(stack: Stack) -> None:
    # Given a saga that times out and is compensating (no payment service), logged as JSON
    stack.worker("inventory", "--stock", "item-1=10", SAGA_LOG_FORMAT="json")
    stack.orchestrator(**{**FAST_TIMEOUTS, "SAGA_LOG_FORMAT": "json"})
    order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=10)
    wait_until("the compensation", lambda: [s["status"] for s in listed(stack)] == ["COMPENSATING"])
    order.kill()
    saga_id = listed(stack)[0]["saga_id"]
    time.sleep(2)  # RefundPayment, unanswered, times out and is resent meanwhile

    # Then every line about it, deadlines and confirms included, carries one trace id and
    # the id of the message it is about
    lines = [json.loads(line) for line in stack.services["orchestrator"].output().splitlines()]
    about = [line for line in lines if line.get("saga_id") == saga_id]
    assert any("timed_out" in line["message"] for line in about)
    assert {line.get("trace_id") for line in about} != {None}
    assert len({line.get("trace_id") for line in about}) == 1, about
    assert all(line.get("message_id") for line in about), [
        line for line in about if not line.get("message_id")
    ]

"""What happens when things break: silence, repeats, garbage, crashes, no broker."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from messages.contract import topology
from messages.contract.models import (
    ChargePayment,
    CommandFailed,
    CommandSucceeded,
    Money,
    PlaceOrder,
    RefundPayment,
    ReserveStock,
)
from tests.integration.stack import (
    FAST_TIMEOUTS,
    ROOT,
    Stack,
    amqp_channel,
    drain,
    replies,
    send,
)
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker


def test_silent_participant_times_out_and_is_compensated(stack: Stack) -> None:
    # Given no payment service at all
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("order")
    stack.orchestrator(**FAST_TIMEOUTS)

    code, result = stack.place_order(*ORDER, "--amount", "25.00", timeout=3)

    # Then ChargePayment is resent once, then compensated, the charge itself included; the
    # refund is never answered either, so it is resent and the saga waits: COMPENSATING,
    # never FAILED on its own
    assert code == 2 and result["status"] == "TIMED_OUT", result
    saga = stack.saga(result["saga_id"])
    assert saga["status"] == "COMPENSATING", saga
    assert sent(saga)[:4] == ["ReserveStock", "ChargePayment", "ChargePayment", "RefundPayment"]
    assert sent(saga).count("RefundPayment") >= 3

    # When payment comes back, it works through its queue in order: the late charge is
    # applied once, then refunded; the stock comes back and the customer pays nothing
    stack.worker("payment")
    deadline = time.monotonic() + 15
    while stack.saga(result["saga_id"])["status"] != "COMPENSATED":
        assert time.monotonic() < deadline, stack.saga(result["saga_id"])
        time.sleep(0.2)
    assert stack.query("payment", "SELECT status FROM charges") == [("refunded",)]
    assert stack.stock("item-1") == 10


def test_same_command_twice_has_one_effect(stack: Stack) -> None:
    stack.worker("inventory", "--stock", "item-1=10")
    command = ReserveStock(saga_id=uuid.uuid4(), sku="item-1", quantity=3)

    with amqp_channel(stack.amqp_url) as channel:
        send(channel, topology.COMMANDS_EXCHANGE, "inventory", command)
        send(channel, topology.COMMANDS_EXCHANGE, "inventory", command)
        first, second = replies(channel, expect=2)

    assert stack.stock("item-1") == 7
    assert isinstance(first, CommandSucceeded)
    assert first == second  # the very same reply, message id included
    assert "already processed" in stack.services["inventory"].output()


def test_compensation_before_command_leaves_a_tombstone(stack: Stack) -> None:
    # Given a refund that overtakes its charge (the orchestrator gave up on the charge)
    stack.worker("payment")
    saga_id = uuid.uuid4()
    money = Money(amount="20.00", currency="EUR")  # type: ignore[arg-type]
    with amqp_channel(stack.amqp_url) as channel:
        send(
            channel,
            topology.COMMANDS_EXCHANGE,
            "payment",
            RefundPayment(saga_id=saga_id, customer_id="c-1", amount=money),
        )
        send(
            channel,
            topology.COMMANDS_EXCHANGE,
            "payment",
            ChargePayment(saga_id=saga_id, customer_id="c-1", amount=money),
        )
        refund_reply, charge_reply = replies(channel, expect=2)

    # Then the refund is a no-op success and the late charge is refused
    assert isinstance(refund_reply, CommandSucceeded)
    assert isinstance(charge_reply, CommandFailed)
    assert charge_reply.reason == "already_compensated"
    assert stack.query("payment", "SELECT amount, status FROM charges") == [("0", "refunded")]


BAD_MESSAGES = [
    (b"{not json", "application/json", None, "invalid_json"),
    (b'{"type": "LaunchRockets", "saga_id": "x"}', "application/json", None, "unknown_type"),
    (b'{"type": "PlaceOrder"}', "application/json", "PlaceOrder", "invalid_message"),
    (b"<order/>", "application/xml", None, "bad_content_type"),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', "application/json", None, "too_large"),
]


def test_malformed_messages_are_dead_lettered_and_service_keeps_going(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10")
    stack.orchestrator()
    queues = [
        (topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY, topology.REQUESTS_QUEUE),
        (topology.REPLIES_EXCHANGE, topology.REPLY_ROUTING_KEY, topology.REPLIES_QUEUE),
        (topology.COMMANDS_EXCHANGE, "inventory", topology.command_queue("inventory")),
    ]

    with amqp_channel(stack.amqp_url) as channel:
        for exchange, key, _ in queues:
            for body, content_type, kind, _ in BAD_MESSAGES:
                props = {"content_type": content_type, "message_id": str(uuid.uuid4())}
                if kind:
                    props["type"] = kind
                send(channel, exchange, key, body, **props)
        # A well-formed command that belongs on another queue is rejected too
        send(
            channel,
            topology.COMMANDS_EXCHANGE,
            "inventory",
            PlaceOrder(
                saga_id=uuid.uuid4(),
                customer_id="c-1",
                sku="item-1",
                quantity=1,
                amount=Money(amount="1.00"),
            ),
        )  # type: ignore[arg-type]

        for _, _, queue in queues:
            extra = 1 if queue == topology.command_queue("inventory") else 0
            dead = drain(channel, topology.dead_letter_queue(queue), len(BAD_MESSAGES) + extra)
            reasons = [props.headers[topology.REASON_HEADER] for props, _ in dead]
            assert reasons[: len(BAD_MESSAGES)] == [bad[3] for bad in BAD_MESSAGES], queue
            assert all(props.headers[topology.QUEUE_HEADER] == queue for props, _ in dead)
            if extra:
                assert reasons[-1] == "unexpected_type"

    # The services are still up, nothing changed, and a real order still goes through
    assert stack.stock("item-1") == 10
    code, result = stack.place_order(*ORDER, "--amount", "25.00")
    assert code == 0, result
    assert stack.stock("item-1") == 9


def test_orchestrator_killed_mid_saga_finishes_after_restart(stack: Stack) -> None:
    # Given a saga waiting on payment, which is not running yet
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("order")
    stack.orchestrator()
    client = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60)
    stack.wait_for_log("orchestrator", "ChargePayment attempt 1")

    # When the orchestrator dies without warning, and comes back after payment is up
    stack.kill("orchestrator")
    stack.worker("payment")
    stack.orchestrator()

    # Then the saga completes exactly once
    out, _ = client.communicate(timeout=90)
    assert client.returncode == 0, out
    assert stack.stock("item-1") == 9
    assert stack.query("payment", "SELECT count(*) FROM charges") == [(1,)]
    assert stack.query("order", "SELECT count(*) FROM orders") == [(1,)]


def test_unreachable_broker_is_a_clear_retrying_log_line(stack: Stack) -> None:
    service = stack.start(
        "orchestrator",
        "orchestrator",
        "run",
        ready="cannot reach RabbitMQ",
        SAGA_AMQP_URL="amqp://guest:secret@127.0.0.1:1/",
        SAGA_CONNECT_RETRY_S="0.2",
    )
    stack.wait_for_log("orchestrator", "attempt 2")

    log = service.output()
    assert "retrying in 0.2s" in log
    assert "secret" not in log  # the password is never logged
    assert "Traceback" not in log
    assert service.poll() is None  # still trying, not crashed


def test_place_order_explains_bad_input_and_missing_orchestrator(stack: Stack) -> None:
    code, result = stack.place_order(
        "--customer", "c-1", "--sku", "item-1", "--qty", "-1", "--amount", "25.00"
    )
    assert code == 2
    assert "invalid order: --qty: Input should be greater than 0" in result["stderr"]

    # Nothing has declared the saga topology on this fresh vhost yet
    code, result = stack.place_order(*ORDER, "--amount", "25.00")
    assert code == 2
    assert "is the orchestrator running?" in result["stderr"]


def test_place_order_without_a_broker_fails_cleanly() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "scripts/place_order.py",
            *ORDER,
            "--amount",
            "1",
            "--url",
            "amqp://guest:guest@127.0.0.1:1/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in done.stderr
    assert "Traceback" not in done.stderr

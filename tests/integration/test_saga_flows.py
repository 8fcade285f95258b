"""The order saga end to end over a real RabbitMQ, with every service a real process."""

from __future__ import annotations

import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.broker

ORDER = ("--customer", "c-1", "--sku", "item-1", "--qty", "1")
# The one customer the order service refuses: the last step fails after the charge.
BLOCKED = "c-9"


def events(result: dict[str, object]) -> list[tuple[str, str]]:
    """(step, event) pairs of a result's timeline."""
    return [(e["step"], e["event"]) for e in result["history"]]  # type: ignore[index, union-attr]


def sent(result: dict[str, object]) -> list[str]:
    """The commands the saga sent, in order."""
    return [
        e["detail"].split()[0]
        for e in result["history"]  # type: ignore[index, union-attr]
        if e["event"] == "sent"
    ]


@pytest.fixture
def running(stack: Stack) -> Stack:
    stack.worker("all", "--stock", "item-1=10,item-2=5", "--block", BLOCKED)
    stack.orchestrator()
    return stack


def test_happy_path_completes_the_order(running: Stack) -> None:
    code, result = running.place_order(*ORDER, "--amount", "25.00")

    assert code == 0, result
    assert result["status"] == "COMPLETED"
    assert sent(result) == ["ReserveStock", "ChargePayment", "CompleteOrder"]
    saga_id = result["saga_id"]
    assert running.stock("item-1") == 9
    assert running.query(
        "payment", "SELECT amount, status FROM charges WHERE saga_id = ?", saga_id
    ) == [("25.00", "charged")]
    assert running.query(
        "order", "SELECT sku, quantity FROM orders WHERE saga_id = ?", saga_id
    ) == [("item-1", 1)]
    assert running.saga(saga_id)["status"] == "COMPLETED"


def test_payment_declined_releases_the_stock(running: Stack) -> None:
    # Given item-1 stocked at 10 and a charge over the default credit limit
    code, result = running.place_order(*ORDER, "--amount", "5000.00")

    # Then the saga is compensated: the reservation is released, nothing is charged
    assert code == 1, result
    assert result["status"] == "COMPENSATED"
    assert result["reason"] == "payment_declined"
    assert sent(result) == ["ReserveStock", "ChargePayment", "ReleaseStock"]
    assert running.stock("item-1") == 10
    assert running.query("payment", "SELECT * FROM charges") == []
    # And the inventory log tells the story step by step
    log = running.services["all"].output()
    assert "Reserved 1 unit of item-1. Remaining: 9" in log
    assert f"Released reservation for saga {result['saga_id']}: item-1 restored to 10" in log


def test_out_of_stock_is_rejected_without_side_effects(running: Stack) -> None:
    code, result = running.place_order(
        "--customer", "c-1", "--sku", "item-2", "--qty", "6", "--amount", "10.00"
    )

    assert code == 1, result
    assert result["reason"] == "out_of_stock"
    assert sent(result) == ["ReserveStock"]
    assert running.stock("item-2") == 5
    assert running.query("payment", "SELECT * FROM charges") == []


def test_complete_order_failure_refunds_then_releases(running: Stack) -> None:
    code, result = running.place_order(
        "--customer", BLOCKED, "--sku", "item-1", "--qty", "2", "--amount", "30.00"
    )

    assert code == 1, result
    assert result["reason"] == "customer_blocked"
    assert sent(result) == [
        "ReserveStock",
        "ChargePayment",
        "CompleteOrder",
        "RefundPayment",
        "ReleaseStock",
    ]
    assert running.stock("item-1") == 10
    assert running.query("payment", "SELECT status FROM charges") == [("refunded",)]
    assert running.query("order", "SELECT * FROM orders") == []


def test_many_orders_keep_stock_and_money_consistent(running: Stack) -> None:
    # Ten concurrent clients, none of them blocked, race for five units of item-2
    customers = [f"racer-{i}" for i in range(10)]
    assert BLOCKED not in customers
    clients = [
        running.place_order_async(
            "--customer", customer, "--sku", "item-2", "--qty", "1", "--amount", "10.00"
        )
        for customer in customers
    ]
    codes = [client.wait(60) for client in clients]

    assert sorted(codes) == [0] * 5 + [1] * 5
    assert running.stock("item-2") == 0
    assert running.query("payment", "SELECT count(*) FROM charges WHERE status = 'charged'") == [
        (5,)
    ]
    assert running.query("order", "SELECT count(*) FROM orders") == [(5,)]

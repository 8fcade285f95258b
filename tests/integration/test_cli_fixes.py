"""place_order.py as a user runs it against a real stack: many orders, other currencies."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.stack import ROOT, Stack

ORDER = ("--customer", "c-1", "--sku", "item-1", "--qty", "1")


def place_many(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/place_order.py", *ORDER, *args, "--timeout", "30"],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_count_exit_code_and_breakdown_follow_the_outcomes(stack: Stack) -> None:
    # Given 3 units of item-1 in stock and a customer limited to 50.00 EUR
    stack.worker("all", "--stock", "item-1=3,item-2=10", "--limit", "c-1=50.00")
    stack.orchestrator()

    # When every order completes, the exit code is 0
    fine = place_many(stack, "--amount", "10.00", "--count", "2", "--concurrency", "2")
    assert fine.returncode == 0, fine.stdout + fine.stderr

    # When some are compensated (1 unit left for 3 orders; then over the limit)
    short = place_many(stack, "--amount", "10.00", "--count", "3", "--concurrency", "1")
    declined = place_many(stack, "--sku", "item-2", "--amount", "60.00", "--count", "2", "--json")

    # Then the exit code is 1, and the summary says why, by state and reason
    assert short.returncode == 1, short.stdout + short.stderr
    assert "1 COMPLETED" in short.stdout
    assert [line.split() for line in short.stdout.splitlines() if line.startswith("  ")] == [
        ["2", "COMPENSATED", "out_of_stock"],
        ["1", "COMPLETED"],
    ]
    assert declined.returncode == 1, declined.stderr
    summary = json.loads(declined.stdout)
    assert summary["outcomes"] == {"COMPENSATED": 2}
    assert summary["by_reason"] == [
        {"state": "COMPENSATED", "reason": "payment_declined", "count": 2}
    ]


def test_count_exits_2_when_orders_time_out(stack: Stack) -> None:
    # Given an orchestrator but no participants: sagas wait on their first step
    stack.orchestrator(SAGA_STEP_TIMEOUT_S="60")

    # When 3 orders are placed one at a time with a 1 s time-out
    done = subprocess.run(
        [
            sys.executable,
            "scripts/place_order.py",
            *ORDER,
            *("--amount", "10.00", "--count", "3", "--timeout", "1", "--json"),
        ],
        cwd=ROOT,
        env=stack.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Then it exits 2, and says which timed out and which were never placed
    assert done.returncode == 2, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["by_reason"] == [
        {"state": "NOT_PLACED", "reason": "stopped at the time-out", "count": 2},
        {"state": "TIMED_OUT", "reason": "no result within 1s", "count": 1},
    ]


def test_limits_are_per_currency_end_to_end(stack: Stack) -> None:
    # Given c-1 limited to 50.00 EUR and 40.00 USD
    stack.worker("all", "--stock", "item-1=10", "--limit", "c-1=50.00,c-1=40.00 USD")
    stack.orchestrator()

    # When c-1 orders for 45.00 in each currency, and in one that does not exist
    eur_code, eur = stack.place_order(*ORDER, "--amount", "45.00 EUR")
    usd_code, usd = stack.place_order(*ORDER, "--amount", "45.00 USD")
    gbp_code, gbp = stack.place_order(*ORDER, "--amount", "45.00 GBP")  # default limit: 1000 GBP
    bad_code, bad = stack.place_order(*ORDER, "--amount", "25.00 XYZ")

    # Then each currency has its own limit, and XYZ is never charged
    assert (eur_code, eur["status"]) == (0, "COMPLETED")
    assert (usd_code, usd["status"], usd["reason"]) == (1, "COMPENSATED", "payment_declined")
    assert (gbp_code, gbp["status"]) == (0, "COMPLETED")
    assert bad_code == 2 and "ISO 4217" in bad["stderr"]
    charged = stack.query(
        "payment", "SELECT amount, currency FROM charges WHERE status = ?", "charged"
    )
    assert sorted(charged) == [("45.00", "EUR"), ("45.00", "GBP")]

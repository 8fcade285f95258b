"""The harness without a broker: real child processes, and the audit's checks on a snapshot."""

from __future__ import annotations

import signal
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from scripts.harness.audit import Saga, Snapshot, check_money, check_orders
from scripts.harness.processes import Process, ProcessError, Processes

SAY_READY_AND_WAIT = "import time; print('ready', flush=True); time.sleep(60)"


def child(tmp_path: Path, code: str, name: str = "child") -> Process:
    argv = (sys.executable, "-c", code)
    return Process(name, argv, {}, tmp_path / f"{name}.log", cwd=tmp_path)


def test_a_process_is_ready_killed_and_started_again(tmp_path: Path) -> None:
    process = child(tmp_path, SAY_READY_AND_WAIT).start()
    process.wait_for_log("ready", timeout=10)

    process.kill()
    assert process.wait(10) == -signal.SIGKILL

    # Started again, it appends to its log; readiness is read from the new run only
    process.start()
    process.wait_for_log("ready", timeout=10)
    assert process.output().count("ready") == 2
    assert process.output(since_start=True).count("ready") == 1
    group = Processes({"child": process})
    group.stop(grace_s=5)
    assert not process.running() and not group.items


def test_waiting_for_a_process_that_exits_says_so_with_its_output(tmp_path: Path) -> None:
    process = child(tmp_path, "print('no luck'); raise SystemExit(3)").start()
    with pytest.raises(ProcessError, match="exited \\(3\\)") as raised:
        process.wait_for_log("ready", timeout=10)
    assert "no luck" in str(raised.value)
    assert Processes({"child": process}).exited() == ("child", 3)


def saga(saga_id: str, status: str) -> Saga:
    return Saga(saga_id, status, "", "c-3", "item-1", 1, Decimal("10.00"))


def test_the_audit_finds_a_missing_order_and_a_charge_left_behind() -> None:
    # Given one completed saga without an order, and a compensated one still charged
    snap = Snapshot(
        sagas={"s-1": saga("s-1", "COMPLETED"), "s-2": saga("s-2", "COMPENSATED")},
        outbox=0,
        stock={},
        reservations={},
        charges={
            "s-1": ("c-3", Decimal("10.00"), "EUR", "charged"),
            "s-2": ("c-3", Decimal("10.00"), "EUR", "charged"),
        },
        orders={},
    )

    # Then both checks report it
    assert check_orders(snap).problems == ["s-1: COMPLETED without an order"]
    money = check_money(snap).problems
    assert "charged 20.00 != 10.00 sold" in money
    assert "s-2: 10.00 still charged, saga COMPENSATED" in money

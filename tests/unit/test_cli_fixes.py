"""What a new user hit with the command lines, on real SQLite files and real processes.

None of these needs a broker: the commands read files, or fail before they connect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest

from messages.contract.models import (
    ChargePayment,
    HistoryEntry,
    Money,
    PlaceOrder,
    SagaStatus,
    parse_money,
)
from messages.plumbing.timeline import format_timeline
from orchestrator.definition import input_of
from orchestrator.engine import SagaState, start
from orchestrator.runtime import definition_from, to_outbox
from orchestrator.settings import OrchestratorSettings
from orchestrator.store import SagaFilter, SqliteStore
from workers import inventory, payment
from workers.runtime import Failed, Succeeded, open_db

ROOT = Path(__file__).resolve().parents[2]
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1


def run(data_dir: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m argv...`` as a user runs it, with SAGA_DATA_DIR=data_dir."""
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=environment(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(SAGA_DATA_DIR=str(data_dir), SAGA_AMQP_URL=NO_BROKER, **extra)
    return env


def order(saga_id: object = None, amount: str = "25.00 EUR") -> PlaceOrder:
    return PlaceOrder(
        saga_id=saga_id or uuid4(),
        customer_id="c-1",
        sku="item-1",
        quantity=1,
        amount=parse_money(amount),
    )


def saga(status: SagaStatus = SagaStatus.RUNNING) -> SagaState:
    request = order()
    now = datetime.now(UTC)
    return SagaState(
        saga_id=request.saga_id,
        input=input_of(request),
        status=status,
        created_at=now,
        updated_at=now,
    )


def store_with(path: Path, *statuses: SagaStatus) -> list[str]:
    """An orchestrator store holding one saga per status."""
    store = SqliteStore(path)
    try:
        return [str(store.commit(saga(status), []).saga_id) for status in statuses]
    finally:
        store.close()


# --- item: reading a read-only copy of the data ------------------------------------------------


@pytest.fixture
def readonly_copy(tmp_path: Path) -> Iterator[Path]:
    """A copy of a data directory (orchestrator and inventory files) nobody can write to."""
    data = tmp_path / "data"
    store_with(data / "orchestrator.db", SagaStatus.RUNNING, SagaStatus.COMPLETED)
    db = open_db(data / "inventory.db", inventory.SCHEMA)
    inventory.seed(db, {"item-1": 10})
    db.close()
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    assert not list(copy.glob("*-shm")), "a clean copy has no -shm file: readers must make one"
    for path in (*copy.iterdir(), copy):
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield copy
    copy.chmod(0o755)


def run_readonly(data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``run`` where data_dir cannot be written to, not even by root."""
    command = [sys.executable, "-m", *argv]
    if os.geteuid() == 0:
        # root ignores file modes: give the command a private read-only mount of the copy
        if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
            pytest.fail(
                "running as root without the right to unshare a mount namespace: run as a "
                "normal user, or where unshare --mount is allowed"
            )
        mount = 'mount --bind -r "$0" "$0" && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", mount, str(data_dir), *command]
    return subprocess.run(
        command, cwd=ROOT, env=environment(data_dir), capture_output=True, text=True, timeout=60
    )


def test_the_console_refuses_a_store_it_could_only_read_as_a_frozen_snapshot(
    readonly_copy: Path,
) -> None:
    """A console over a file it cannot follow would show stale sagas as live: it says why."""
    served = run_readonly(readonly_copy, "orchestrator", "web")
    assert served.returncode == 2
    assert "SQLite cannot create its -shm file" in served.stderr
    assert "Make the directory writable" in served.stderr


def test_the_reading_commands_work_on_a_read_only_copy_of_the_data(readonly_copy: Path) -> None:
    files = sorted(p.name for p in readonly_copy.iterdir())
    listed = run_readonly(readonly_copy, "orchestrator", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["status"] for s in json.loads(listed.stdout)) == [
        "COMPLETED",
        "RUNNING",
    ]

    stats = run_readonly(readonly_copy, "orchestrator", "stats")
    assert stats.returncode == 0, stats.stderr
    assert "RUNNING 1" in stats.stdout and "COMPLETED 1" in stats.stdout

    stock = run_readonly(readonly_copy, "workers", "stock")
    assert stock.returncode == 0, stock.stderr
    assert re.search(r"item-1\s+10", stock.stdout)

    assert sorted(p.name for p in readonly_copy.iterdir()) == files


def test_a_read_only_store_still_sees_what_a_running_writer_commits(tmp_path: Path) -> None:
    # Given an orchestrator's store open for writing (WAL, -shm in use)
    path = tmp_path / "orchestrator.db"
    writer = SqliteStore(path)
    try:
        first = writer.commit(saga(), [])
        # When a reader opens it read-only and the writer commits more
        reader = SqliteStore(path, readonly=True)
        second = writer.commit(saga(), [])
        # Then the reader sees the new saga: the immutable fallback is not used on live files
        seen = {s.saga_id for s in reader.sagas(SagaFilter(), 10)}
        assert seen == {first.saga_id, second.saga_id}
        reader.close()
    finally:
        writer.close()


# --- item: saga list --state with a state that does not exist ----------------------------------


def test_an_unknown_state_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    store_with(tmp_path / "orchestrator.db", SagaStatus.COMPLETED)

    done = run(tmp_path, "orchestrator", "list", "--state", "BOGUS")

    assert done.returncode == 2
    assert "<lambda>" not in done.stderr
    assert "'BOGUS'" in done.stderr
    assert "valid states: RUNNING, COMPLETED, COMPENSATING, COMPENSATED, FAILED" in done.stderr
    assert run(tmp_path, "orchestrator", "list", "--state", "completed").returncode == 0


# --- item: saga stats and the oldest running saga ----------------------------------------------


def test_stats_names_no_oldest_running_saga_when_none_runs(tmp_path: Path) -> None:
    [compensating, _] = store_with(
        tmp_path / "orchestrator.db", SagaStatus.COMPENSATING, SagaStatus.COMPLETED
    )

    shown = run(tmp_path, "orchestrator", "stats").stdout

    assert "RUNNING 0" in shown
    assert "oldest running" not in shown
    assert f"oldest in flight: {compensating}, COMPENSATING" in shown


def test_stats_shows_no_oldest_line_when_every_saga_has_finished(tmp_path: Path) -> None:
    store_with(tmp_path / "orchestrator.db", SagaStatus.COMPLETED, SagaStatus.FAILED)

    shown = run(tmp_path, "orchestrator", "stats")

    assert shown.returncode == 0, shown.stderr
    assert "oldest" not in shown.stdout


def test_stats_counts_the_messages_the_broker_has_not_confirmed(tmp_path: Path) -> None:
    # Given a saga whose first command waits in the outbox (the broker was away)
    store = SqliteStore(tmp_path / "orchestrator.db")
    decision = start(definition_from(OrchestratorSettings()), order(), None, datetime.now(UTC))
    store.commit(decision.state, to_outbox(decision))
    store.close()

    # Then stats says so, for people and for the chaos soak's audit
    assert json.loads(run(tmp_path, "orchestrator", "stats", "--json").stdout)["outbox"] == 1
    assert "outbox:     1 message(s)" in run(tmp_path, "orchestrator", "stats").stdout


# --- item: timelines longer than a minute ------------------------------------------------------


def test_a_long_timeline_switches_units_and_keeps_its_columns() -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    offsets = [0, 0.0521, 1.5, 75.3, 2 * 3600 + 5]
    history = [
        HistoryEntry(
            at=start + timedelta(seconds=s),
            step="charge_payment",
            event="sent",
            detail="ChargePayment",
            status=SagaStatus.RUNNING,
        )
        for s in offsets
    ]

    lines = format_timeline(history).splitlines()

    assert [line.split("charge_payment")[0].replace(" ", "") for line in lines] == [
        "+0.0ms",
        "+52.1ms",
        "+1.500s",
        "+1:15.3min",
        "+2:00:05h",
    ]
    assert len({line.index("charge_payment") for line in lines}) == 1
    assert len({line.index("ChargePayment") for line in lines}) == 1


# --- item: a metrics port that is taken ----------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("argv", [("orchestrator", "run"), ("workers", "run", "all")])
def test_a_taken_metrics_port_is_reported_as_such(
    tmp_path: Path, taken_port: int, argv: tuple[str, ...]
) -> None:
    done = run(tmp_path, *argv, SAGA_METRICS_PORT=str(taken_port))

    assert done.returncode == 2
    assert f"metrics port {taken_port} is in use" in done.stderr
    assert "SAGA_DATA_DIR" not in done.stderr


# --- item: currencies and credit limits per currency -------------------------------------------


def test_an_unknown_currency_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "scripts/place_order.py",
            *("--customer", "c-1", "--sku", "item-1", "--qty", "1"),
            *("--amount", "25.00 XYZ"),
        ],
        cwd=ROOT,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "'XYZ' is not an ISO 4217 currency code" in done.stderr
    assert "RabbitMQ" not in done.stderr  # refused before connecting
    assert parse_money("25.00 usd") == Money(amount=Decimal("25.00"), currency="USD")
    with pytest.raises(ValueError, match="ISO 4217"):
        Money(amount=Decimal("1.00"), currency="ABC")


def charge(db: sqlite3.Connection, amount: str, customer: str = "c-1") -> str:
    command = ChargePayment(saga_id=uuid4(), customer_id=customer, amount=parse_money(amount))
    outcome = payment.charge(command, db, default_limit=Decimal("1000.00"))
    if isinstance(outcome, Failed):
        return f"{outcome.reason}: {outcome.detail}"
    assert isinstance(outcome, Succeeded)
    return "charged"


def test_credit_limits_are_per_currency(tmp_path: Path) -> None:
    db = open_db(tmp_path / "payment.db", payment.SCHEMA)
    payment.seed(db, {("c-1", "EUR"): Decimal("50.00"), ("c-1", "USD"): Decimal("40.00")})

    assert charge(db, "45.00 EUR") == "charged"
    assert charge(db, "45.00 USD") == (
        "payment_declined: 45.00 USD is over the credit limit of 40.00 USD for c-1"
    )
    # no limit of c-1's own in GBP: the default limit, in GBP
    assert charge(db, "999.00 GBP") == "charged"
    assert charge(db, "1000.01 GBP").startswith("payment_declined: 1000.01 GBP is over the credit")
    assert charge(db, "60.00 EUR", customer="c-2") == "charged"


def test_limits_stored_before_currencies_are_kept_as_eur(tmp_path: Path) -> None:
    # Given a payment database from before limits had a currency
    path = tmp_path / "payment.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE credit_limits (customer_id TEXT PRIMARY KEY, max_charge TEXT)")
        old.execute("INSERT INTO credit_limits VALUES ('c-1', '50.00')")
    old.close()

    # When the payment service starts on it, with no --limit
    db = open_db(path, payment.SCHEMA)
    payment.seed(db, {})

    # Then c-1's limit holds in EUR, and only in EUR
    assert charge(db, "60.00 EUR").startswith("payment_declined")
    assert charge(db, "60.00 USD") == "charged"


def test_limit_option_takes_a_currency(tmp_path: Path) -> None:
    from workers.cli import build_parser

    args = build_parser().parse_args(["run", "payment", "--limit", "c-1=50.00,c-1=40.00 usd"])
    assert args.limit == {("c-1", "EUR"): Decimal("50.00"), ("c-1", "USD"): Decimal("40.00")}

    bad = run(tmp_path, "workers", "run", "payment", "--limit", "c-1=40.00 XYZ")
    assert bad.returncode == 2
    assert "'XYZ' is not an ISO 4217 currency code" in bad.stderr


# --- items: the quick start's logs; the management UI login with compose -----------------------


def test_the_quick_start_logs_are_not_committed() -> None:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start without Docker")[1]
    logs = re.findall(r"> (\S+\.log) 2>&1", quick_start.split("```")[1])
    assert logs == ["workers.log", "orchestrator.log", "web.log"]
    ignored = subprocess.run(["git", "check-ignore", *logs], cwd=ROOT, capture_output=True)
    assert ignored.stdout.decode().split() == logs


def test_the_readme_gives_the_management_login_compose_creates() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    user = re.search(r"RABBITMQ_DEFAULT_USER: (\S+)", compose)
    assert user is not None
    section = (ROOT / "README.md").read_text().split("## Watching the queues")[1].split("\n## ")[0]
    login = section.split("|")[0]  # the prose before the table
    assert "guest / guest" not in login
    assert f"`{user[1]}`" in login

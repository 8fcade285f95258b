"""The reading commands an audit relies on: every saga, and each participant's rows by saga."""

from __future__ import annotations

import json
from pathlib import Path

from messages.contract.models import SagaStatus
from tests.unit.test_cli_fixes import run, store_with
from workers import inventory, order, payment
from workers.runtime import open_db


def test_list_limit_0_lists_every_saga(tmp_path: Path) -> None:
    # Given more sagas than the default limit of 50
    store_with(tmp_path / "orchestrator.db", *[SagaStatus.COMPLETED] * 55, SagaStatus.RUNNING)

    # When listed by default, with --limit 0 and with a negative limit
    default = run(tmp_path, "orchestrator", "list", "--json")
    every = run(tmp_path, "orchestrator", "list", "--limit", "0", "--json")
    negative = run(tmp_path, "orchestrator", "list", "--limit", "-1")

    # Then 0 means all of them, and a negative limit is refused
    assert len(json.loads(default.stdout)) == 50
    sagas = json.loads(every.stdout)
    assert len(sagas) == 56 and len({s["saga_id"] for s in sagas}) == 56
    assert sorted({s["status"] for s in sagas}) == ["COMPLETED", "RUNNING"]
    assert negative.returncode == 2 and "0 (all) or more" in negative.stderr


def test_each_participant_lists_its_rows_by_saga(tmp_path: Path) -> None:
    # Given one reservation, one refunded charge and one order, each in its own database
    db = open_db(tmp_path / "inventory.db", inventory.SCHEMA)
    db.execute("INSERT INTO reservations VALUES ('s-1', 'item-1', 2, 'reserved')")
    db.close()
    db = open_db(tmp_path / "payment.db", payment.SCHEMA)
    db.execute("INSERT INTO charges VALUES ('s-2', 'c-1', '12.50', 'EUR', 'refunded')")
    db.close()
    db = open_db(tmp_path / "order.db", order.SCHEMA)
    db.execute("INSERT INTO orders VALUES ('s-3', 'c-1', 'item-1', 2, '12.50', 'EUR')")
    db.close()

    # When each is read through `python -m workers ... --json`
    def read(command: str) -> object:
        done = run(tmp_path, "workers", command, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # Then each prints its own rows keyed by saga id, amounts as decimal strings
    assert read("reservations") == {"s-1": {"sku": "item-1", "quantity": 2, "status": "reserved"}}
    assert read("payments") == {
        "s-2": {"customer_id": "c-1", "amount": "12.50", "currency": "EUR", "status": "refunded"}
    }
    assert read("orders") == {
        "s-3": {
            "customer_id": "c-1",
            "sku": "item-1",
            "quantity": 2,
            "amount": "12.50",
            "currency": "EUR",
        }
    }
    text = run(tmp_path, "workers", "orders")
    assert text.returncode == 0 and text.stdout.startswith("s-3  c-1  item-1  2  12.50  EUR")

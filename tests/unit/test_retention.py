"""A participant past its retention: old duplicates are still answered, unknown old ones refused."""

from __future__ import annotations

import contextvars
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from messages.contract.models import ReserveStock
from messages.errors import Rejected
from workers import inventory
from workers.runtime import Handled, apply_batch, open_db

RETENTION = timedelta(days=30)


def handle(path: Path, command: ReserveStock) -> Handled | Exception:
    db = open_db(path, inventory.SCHEMA)
    inventory.seed(db, {"item-1": 10})
    try:
        (result,) = apply_batch(
            inventory.INVENTORY, db, RETENTION, [(command, contextvars.copy_context())]
        )
        return result
    finally:
        db.close()


def test_a_duplicate_of_a_handled_command_is_answered_however_old(tmp_path: Path) -> None:
    first = ReserveStock(saga_id=uuid.uuid4(), sku="item-1", quantity=1)
    handled = handle(tmp_path / "inventory.db", first)
    assert isinstance(handled, Handled) and not handled.repeat
    # The same command, redelivered from long ago: the dedupe record still answers it
    late = first.model_copy(update={"created_at": datetime.now(UTC) - timedelta(days=40)})
    again = handle(tmp_path / "inventory.db", late)
    assert isinstance(again, Handled) and again.repeat and again.reply == handled.reply


def test_an_unknown_command_older_than_the_retention_is_refused(tmp_path: Path) -> None:
    old = ReserveStock(
        saga_id=uuid.uuid4(),
        sku="item-1",
        quantity=1,
        created_at=datetime.now(UTC) - timedelta(days=31),
    )
    result = handle(tmp_path / "inventory.db", old)
    assert isinstance(result, Rejected) and result.reason == "too_old"
    db = open_db(tmp_path / "inventory.db", inventory.SCHEMA)
    assert inventory.current_stock(db) == {"item-1": 10}
    assert db.execute("SELECT count(*) FROM processed_commands").fetchone() == (0,)


@pytest.mark.parametrize("days", [29, 31])
def test_the_refusal_starts_exactly_at_the_retention(tmp_path: Path, days: int) -> None:
    command = ReserveStock(
        saga_id=uuid.uuid4(),
        sku="item-1",
        quantity=1,
        created_at=datetime.now(UTC) - timedelta(days=days),
    )
    result = handle(tmp_path / "inventory.db", command)
    assert isinstance(result, Handled) == (days < 30)

"""Inventory: stock per SKU, one reservation per saga."""

from __future__ import annotations

import logging
import sqlite3

from messages.contract.models import ReleaseStock, ReserveStock
from workers.runtime import Failed, Outcome, Participant, Succeeded, transaction

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku      TEXT PRIMARY KEY,
    quantity INTEGER NOT NULL CHECK (quantity >= 0)
);
-- status 'released' with quantity 0 is a tombstone: released before it was ever reserved.
CREATE TABLE IF NOT EXISTS reservations (
    saga_id  TEXT PRIMARY KEY,
    sku      TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('reserved', 'released'))
);
"""


def reserve(command: ReserveStock, db: sqlite3.Connection) -> Outcome:
    """Take units out of stock for the saga, or fail with out_of_stock."""
    saga = str(command.saga_id)
    row = db.execute("SELECT status FROM reservations WHERE saga_id = ?", (saga,)).fetchone()
    if row is not None:
        if row[0] == "released":
            return Failed("already_compensated", "the saga's reservation was already released")
        return Succeeded("already reserved")
    stock = db.execute("SELECT quantity FROM stock WHERE sku = ?", (command.sku,)).fetchone()
    available = 0 if stock is None else stock[0]
    if available < command.quantity:
        stocked = "" if stock is not None else " (not a stocked SKU)"
        return Failed(
            "out_of_stock",
            f"{command.sku}: {available} available, {command.quantity} requested{stocked}",
        )
    remaining = available - command.quantity
    db.execute("UPDATE stock SET quantity = ? WHERE sku = ?", (remaining, command.sku))
    db.execute(
        "INSERT INTO reservations VALUES (?, ?, ?, 'reserved')",
        (saga, command.sku, command.quantity),
    )
    unit = "unit" if command.quantity == 1 else "units"
    log.info("Reserved %d %s of %s. Remaining: %d", command.quantity, unit, command.sku, remaining)
    return Succeeded(f"{command.sku} remaining: {remaining}")


def release(command: ReleaseStock, db: sqlite3.Connection) -> Outcome:
    """Give the saga's reservation back; leave a tombstone if there was none."""
    saga = str(command.saga_id)
    row = db.execute(
        "SELECT sku, quantity, status FROM reservations WHERE saga_id = ?", (saga,)
    ).fetchone()
    if row is None:
        db.execute("INSERT INTO reservations VALUES (?, ?, 0, 'released')", (saga, command.sku))
        log.info(
            "Release for saga %s before any reservation: nothing to give back; "
            "a late ReserveStock will be refused",
            saga,
        )
        return Succeeded("nothing was reserved")
    sku, quantity, status = row
    if status == "released":
        return Succeeded("already released")
    db.execute("UPDATE stock SET quantity = quantity + ? WHERE sku = ?", (quantity, sku))
    db.execute("UPDATE reservations SET status = 'released' WHERE saga_id = ?", (saga,))
    restored = db.execute("SELECT quantity FROM stock WHERE sku = ?", (sku,)).fetchone()[0]
    log.info("Released reservation for saga %s: %s restored to %d", saga, sku, restored)
    return Succeeded(f"{sku} restored to {restored}")


def seed(db: sqlite3.Connection, stock: dict[str, int]) -> None:
    """Set initial stock for SKUs the database does not know yet; stock is state, not config."""
    with transaction(db):
        for sku, quantity in stock.items():
            row = db.execute("SELECT quantity FROM stock WHERE sku = ?", (sku,)).fetchone()
            if row is None:
                db.execute("INSERT INTO stock VALUES (?, ?)", (sku, quantity))
            elif row[0] != quantity:
                log.warning(
                    "--stock %s=%d ignored: %s is already stocked with %d (seeds apply to new "
                    "SKUs only)",
                    sku,
                    quantity,
                    sku,
                    row[0],
                )


def current_stock(db: sqlite3.Connection) -> dict[str, int]:
    """Units on hand per SKU (reserved units are not on hand)."""
    return dict(db.execute("SELECT sku, quantity FROM stock ORDER BY sku").fetchall())


def reservations(db: sqlite3.Connection) -> dict[str, dict[str, object]]:
    """Each saga's reservation: SKU, units and whether they are still reserved or released."""
    rows = db.execute("SELECT saga_id, sku, quantity, status FROM reservations ORDER BY saga_id")
    return {s: {"sku": sku, "quantity": int(q), "status": st} for s, sku, q, st in rows}


INVENTORY = Participant("inventory", SCHEMA, {ReserveStock: reserve, ReleaseStock: release})

"""Inventory: stock per SKU, one reservation per saga."""

from __future__ import annotations

import logging

from messages.contract.models import ReleaseStock, ReserveStock
from workers.db import Database, transaction
from workers.runtime import Failed, Outcome, Participant, Succeeded

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


def reserve(command: ReserveStock, db: Database) -> Outcome:
    """Take units out of stock for the saga, or fail with out_of_stock."""
    saga = str(command.saga_id)
    row = db.execute("SELECT status FROM reservations WHERE saga_id = ?", (saga,)).fetchone()
    if row is not None:
        if row[0] == "released":
            return Failed("already_compensated", "the saga's reservation was already released")
        return Succeeded("already reserved")
    # One conditional update, not a read then a write: replicas of inventory on one database
    # reserve at the same time, and the database alone can say what is left.
    taken = db.execute(
        "UPDATE stock SET quantity = quantity - ? WHERE sku = ? AND quantity >= ?",
        (command.quantity, command.sku, command.quantity),
    ).rowcount
    stock = db.execute("SELECT quantity FROM stock WHERE sku = ?", (command.sku,)).fetchone()
    if not taken:
        available = 0 if stock is None else stock[0]
        stocked = "" if stock is not None else " (not a stocked SKU)"
        return Failed(
            "out_of_stock",
            f"{command.sku}: {available} available, {command.quantity} requested{stocked}",
        )
    remaining = stock[0]
    db.execute(
        "INSERT INTO reservations VALUES (?, ?, ?, 'reserved')",
        (saga, command.sku, command.quantity),
    )
    unit = "unit" if command.quantity == 1 else "units"
    log.info("Reserved %d %s of %s. Remaining: %d", command.quantity, unit, command.sku, remaining)
    return Succeeded(f"{command.sku} remaining: {remaining}")


def release(command: ReleaseStock, db: Database) -> Outcome:
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


def seed(db: Database, stock: dict[str, int]) -> None:
    """Set initial stock for SKUs the database does not know yet; stock is state, not config."""
    with transaction(db):
        for sku, quantity in stock.items():
            # ON CONFLICT: a replica starting at the same time may stock it first.
            added = db.execute(
                "INSERT INTO stock VALUES (?, ?) ON CONFLICT (sku) DO NOTHING", (sku, quantity)
            ).rowcount
            row = db.execute("SELECT quantity FROM stock WHERE sku = ?", (sku,)).fetchone()
            if not added and row[0] != quantity:
                log.warning(
                    "--stock %s=%d ignored: %s is already stocked with %d (seeds apply to new "
                    "SKUs only)",
                    sku,
                    quantity,
                    sku,
                    row[0],
                )


def current_stock(db: Database) -> dict[str, int]:
    """Units on hand per SKU (reserved units are not on hand)."""
    return dict(db.execute("SELECT sku, quantity FROM stock ORDER BY sku").fetchall())


def reservations(db: Database) -> dict[str, dict[str, object]]:
    """Each saga's reservation: SKU, units and whether they are still reserved or released."""
    rows = db.execute("SELECT saga_id, sku, quantity, status FROM reservations ORDER BY saga_id")
    return {s: {"sku": sku, "quantity": int(q), "status": st} for s, sku, q, st in rows}


INVENTORY = Participant("inventory", SCHEMA, {ReserveStock: reserve, ReleaseStock: release})

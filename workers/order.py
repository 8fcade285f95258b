"""Order: records completed orders; refuses customers who are blocked."""

from __future__ import annotations

import logging

from messages.contract.models import CompleteOrder
from workers.db import Database, transaction
from workers.runtime import Failed, Outcome, Participant, Succeeded

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocked_customers (customer_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS orders (
    saga_id     TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    sku         TEXT NOT NULL,
    quantity    INTEGER NOT NULL,
    amount      TEXT NOT NULL,
    currency    TEXT NOT NULL
);
"""


def complete(command: CompleteOrder, db: Database) -> Outcome:
    """Record the order as completed, or fail with customer_blocked."""
    saga = str(command.saga_id)
    if db.execute("SELECT 1 FROM orders WHERE saga_id = ?", (saga,)).fetchone():
        return Succeeded("already completed")
    if db.execute(
        "SELECT 1 FROM blocked_customers WHERE customer_id = ?", (command.customer_id,)
    ).fetchone():
        return Failed("customer_blocked", f"{command.customer_id} may not place orders")
    db.execute(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
        (
            saga,
            command.customer_id,
            command.sku,
            command.quantity,
            str(command.amount.amount),
            command.amount.currency,
        ),
    )
    log.info(
        "Order for saga %s completed: %d x %s for %s, %s",
        saga,
        command.quantity,
        command.sku,
        command.customer_id,
        command.amount,
    )
    return Succeeded("order completed")


def seed(db: Database, blocked: list[str]) -> None:
    """Block these customers (kept across restarts)."""
    with transaction(db):
        db.executemany(
            "INSERT INTO blocked_customers VALUES (?) ON CONFLICT DO NOTHING",
            [(c,) for c in blocked],
        )


def orders(db: Database) -> dict[str, dict[str, object]]:
    """Each saga's order: customer, SKU, units, amount (a decimal string) and currency."""
    rows = db.execute(
        "SELECT saga_id, customer_id, sku, quantity, amount, currency FROM orders ORDER BY saga_id"
    )
    return {
        s: {"customer_id": c, "sku": sku, "quantity": int(q), "amount": a, "currency": cur}
        for s, c, sku, q, a, cur in rows
    }


ORDER = Participant("order", SCHEMA, {CompleteOrder: complete})

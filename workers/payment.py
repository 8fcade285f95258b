"""Payment: a credit limit per customer and currency; at most one charge per saga.

Limits are per currency, with no exchange rates: a customer's limit in EUR says nothing of
USD. A charge in a currency the customer has no limit of their own in gets the default
limit (SAGA_DEFAULT_CREDIT_LIMIT), read as an amount of that currency.
"""

from __future__ import annotations

import functools
import logging
from decimal import Decimal

from messages.contract.models import ChargePayment, RefundPayment
from workers.db import Database, PostgresDb, transaction
from workers.runtime import Failed, Outcome, Participant, Succeeded

log = logging.getLogger(__name__)

_LIMITS_TABLE = """
CREATE TABLE IF NOT EXISTS credit_limits (
    customer_id TEXT NOT NULL,
    currency    TEXT NOT NULL,
    max_charge  TEXT NOT NULL,
    PRIMARY KEY (customer_id, currency)
)"""
SCHEMA = (
    _LIMITS_TABLE
    + """;
-- status 'refunded' with amount 0 is a tombstone: refunded before it was ever charged.
CREATE TABLE IF NOT EXISTS charges (
    saga_id     TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    amount      TEXT NOT NULL,
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('charged', 'refunded'))
);
"""
)


def charge(command: ChargePayment, db: Database, *, default_limit: Decimal) -> Outcome:
    """Charge the customer, or fail with payment_declined above their credit limit."""
    saga = str(command.saga_id)
    row = db.execute("SELECT status FROM charges WHERE saga_id = ?", (saga,)).fetchone()
    if row is not None:
        if row[0] == "refunded":
            return Failed("already_compensated", "the saga's payment was already refunded")
        return Succeeded("already charged")
    money = command.amount
    limit_row = db.execute(
        "SELECT max_charge FROM credit_limits WHERE customer_id = ? AND currency = ?",
        (command.customer_id, money.currency),
    ).fetchone()
    limit = default_limit if limit_row is None else Decimal(limit_row[0])
    if money.amount > limit:
        return Failed(
            "payment_declined",
            f"{money} is over the credit limit of {limit:.2f} {money.currency} "
            f"for {command.customer_id}",
        )
    db.execute(
        "INSERT INTO charges VALUES (?, ?, ?, ?, 'charged')",
        (saga, command.customer_id, str(money.amount), money.currency),
    )
    log.info("Charged %s to %s", money, command.customer_id)
    return Succeeded(f"charged {money}")


def refund(command: RefundPayment, db: Database) -> Outcome:
    """Refund the saga's charge; leave a tombstone if there was none."""
    saga = str(command.saga_id)
    row = db.execute("SELECT status FROM charges WHERE saga_id = ?", (saga,)).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO charges VALUES (?, ?, '0', ?, 'refunded')",
            (saga, command.customer_id, command.amount.currency),
        )
        log.info(
            "Refund for saga %s before any charge: nothing to refund; "
            "a late ChargePayment will be refused",
            saga,
        )
        return Succeeded("nothing was charged")
    if row[0] == "refunded":
        return Succeeded("already refunded")
    db.execute("UPDATE charges SET status = 'refunded' WHERE saga_id = ?", (saga,))
    log.info("Refunded %s to %s for saga %s", command.amount, command.customer_id, saga)
    return Succeeded(f"refunded {command.amount}")


def seed(db: Database, limits: dict[tuple[str, str], Decimal]) -> None:
    """Set credit limits by (customer, currency): a value given at start replaces the stored one."""
    with transaction(db):
        _migrate(db)
        db.executemany(
            "INSERT INTO credit_limits (customer_id, currency, max_charge) VALUES (?, ?, ?)"
            " ON CONFLICT (customer_id, currency) DO UPDATE SET max_charge = excluded.max_charge",
            [(customer, currency, str(limit)) for (customer, currency), limit in limits.items()],
        )


def _migrate(db: Database) -> None:
    """Limits stored before they were per currency were in EUR, the only currency then."""
    if isinstance(db, PostgresDb):
        return  # PostgreSQL stores were per currency from the start
    columns = {row[1] for row in db.execute("PRAGMA table_info(credit_limits)")}
    if "currency" in columns:
        return
    db.execute("ALTER TABLE credit_limits RENAME TO credit_limits_eur")
    db.execute(_LIMITS_TABLE)
    db.execute(
        "INSERT INTO credit_limits (customer_id, currency, max_charge)"
        " SELECT customer_id, 'EUR', max_charge FROM credit_limits_eur"
    )
    db.execute("DROP TABLE credit_limits_eur")
    log.info("credit limits are per currency now: stored limits kept as EUR")


def charges(db: Database) -> dict[str, dict[str, str]]:
    """Each saga's charge: customer, amount (a decimal string), currency, charged or refunded."""
    rows = db.execute(
        "SELECT saga_id, customer_id, amount, currency, status FROM charges ORDER BY saga_id"
    )
    return {
        s: {"customer_id": c, "amount": a, "currency": cur, "status": st}
        for s, c, a, cur, st in rows
    }


def payment(default_limit: Decimal) -> Participant:
    """The payment participant; customers without a limit of their own get ``default_limit``."""
    return Participant(
        "payment",
        SCHEMA,
        {
            ChargePayment: functools.partial(charge, default_limit=default_limit),
            RefundPayment: refund,
        },
    )

"""`python -m workers run inventory|payment|order|all`, and what each participant holds.

`stock` and `reservations` read the inventory's database, `payments` the payment's and
`orders` the order's: each only its own participant's file under SAGA_DATA_DIR, read-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TypeVar

import psycopg
from pydantic import ValidationError

from messages.contract.models import parse_money
from messages.errors import ConfigurationError, SagaError
from messages.plumbing import health, logs
from messages.plumbing.metrics import serve as serve_metrics
from messages.plumbing.service import run_service
from messages.plumbing.settings import load
from workers import inventory, order, payment
from workers.db import Database, open_reader
from workers.faults import Faults
from workers.runtime import Participant, open_db, serve
from workers.settings import WorkerSettings

NAMES = ("inventory", "payment", "order")
READERS_HELP = {
    "stock": "print current stock per SKU",
    "reservations": "inventory: each saga's reservation (SKU, units, reserved or released)",
    "payments": "payment: each saga's charge (customer, amount, charged or refunded)",
    "orders": "order: each saga's order (customer, SKU, units, amount)",
}
T = TypeVar("T")


def _items(text: str) -> Iterator[tuple[str, str]]:
    """(name, value) from 'name=value,name=value'."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {item!r}")
        yield key.strip(), value.strip()


def _pairs(convert: Callable[[str], T], what: str) -> Callable[[str], dict[str, T]]:
    """An argparse type for 'key=value,key=value'; ``what`` describes a good value."""

    def parse(text: str) -> dict[str, T]:
        result = {}
        for key, value in _items(text):
            try:
                result[key] = convert(value)
            except (ValueError, InvalidOperation):
                raise argparse.ArgumentTypeError(
                    f"{key}={value!r}: the value must be {what}"
                ) from None
        return result

    return parse


def _stock_level(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _limits(text: str) -> dict[tuple[str, str], Decimal]:
    """--limit 'c-1=50.00,c-1=40.00 USD': credit limits by (customer, currency), EUR by default."""
    limits = {}
    for customer, value in _items(text):
        try:
            money = parse_money(value)
        except ValidationError:
            raise argparse.ArgumentTypeError(
                f"{customer}={value!r}: the limit must be an amount > 0 like 50.00 or '50.00 USD'"
            ) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{customer}={value!r}: {exc}") from None
        limits[customer, money.currency] = money.amount
    return limits


def build_parser() -> argparse.ArgumentParser:
    """The command line: run, health, and the reading commands (stock, reservations...)."""
    parser = argparse.ArgumentParser(
        prog="python -m workers", description="The saga's participants."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one participant, or all three in one process")
    run.add_argument("participant", choices=(*NAMES, "all"))
    run.add_argument(
        "--stock",
        type=_pairs(_stock_level, "a whole number >= 0"),
        default={},
        metavar="SKU=N,...",
        help="inventory: initial stock for SKUs not stocked yet",
    )
    run.add_argument(
        "--limit",
        type=_limits,
        default={},
        metavar="CUSTOMER=AMOUNT [CUR],...",
        help="payment: credit limits per customer and currency, EUR unless given, e.g. "
        "c-1=50.00,c-1=40.00 USD (replace stored ones at every start)",
    )
    run.add_argument(
        "--block",
        type=lambda t: [c for c in t.split(",") if c],
        default=[],
        metavar="CUSTOMER,...",
        help="order: customers whose orders are refused",
    )
    check = sub.add_parser(
        "health", help="exit 0 if the participant process is connected and consuming, else 1"
    )
    check.add_argument("participant", choices=(*NAMES, "all"), help="as given to `run`")
    for name, text in READERS_HELP.items():
        reader = sub.add_parser(name, help=text)
        reader.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _check_options(args: argparse.Namespace) -> None:
    for option, owner in (("stock", "inventory"), ("limit", "payment"), ("block", "order")):
        if getattr(args, option) and args.participant not in (owner, "all"):
            raise ConfigurationError(f"--{option} applies to {owner}, not {args.participant}")


async def _run(settings: WorkerSettings, args: argparse.Namespace) -> None:
    names = NAMES if args.participant == "all" else (args.participant,)
    participants: dict[str, Participant] = {
        "inventory": inventory.INVENTORY,
        "payment": payment.payment(settings.default_credit_limit),
        "order": order.ORDER,
    }
    url = settings.participant_db_url
    dbs = {
        name: open_db(settings.db_path(name), participants[name].schema, url, name)
        for name in names
    }
    if "inventory" in dbs:
        inventory.seed(dbs["inventory"], args.stock)
    if "payment" in dbs:
        payment.seed(dbs["payment"], args.limit)
    if "order" in dbs:
        order.seed(dbs["order"], args.block)
    serve_metrics(settings.metrics_port)
    try:
        faults = Faults.from_settings(settings)
        await serve([participants[n] for n in names], dbs, settings, args.participant, faults)
    finally:
        for db in dbs.values():
            db.close()


def _stock(settings: WorkerSettings, as_json: bool) -> int:
    db = open_reader(settings.participant_db_url, settings.db_path("inventory"), "inventory")
    try:
        levels = inventory.current_stock(db)
    finally:
        db.close()
    if as_json:
        print(json.dumps(levels, indent=2))
    else:
        for sku, quantity in levels.items():
            print(f"{sku:<24} {quantity}")
    return 0


# Each per-saga reader: (the participant whose database it reads, the function reading it).
_BY_SAGA: dict[str, tuple[str, Callable[[Database], Mapping[str, Mapping[str, object]]]]]
_BY_SAGA = {
    "reservations": ("inventory", inventory.reservations),
    "payments": ("payment", payment.charges),
    "orders": ("order", order.orders),
}


def _by_saga(settings: WorkerSettings, command: str, as_json: bool) -> int:
    """One participant's rows by saga id, from its own database only."""
    participant, read = _BY_SAGA[command]
    db = open_reader(settings.participant_db_url, settings.db_path(participant), participant)
    try:
        rows = read(db)
    finally:
        db.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no {command}")
    for saga_id, row in rows.items():
        print(f"{saga_id}  " + "  ".join(str(value) for value in row.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load(WorkerSettings)
        logs.configure(settings.log_level, settings.log_format)
        if args.command == "stock":
            return _stock(settings, args.json)
        if args.command in _BY_SAGA:
            return _by_saga(settings, args.command, args.json)
        if args.command == "health":
            problem = health.check(health.path(settings.data_dir, args.participant))
            print(f"{args.participant}: {problem or 'healthy: connected and consuming'}")
            return 1 if problem else 0
        _check_options(args)
        return run_service(_run(settings, args))
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, nothing went wrong here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, sqlite3.Error, psycopg.Error) as exc:
        url = "SAGA_PARTICIPANT_DB_URL"
        where = url if os.environ.get(url) else "SAGA_DATA_DIR"
        print(f"error: the data under {where} cannot be used: {exc}", file=sys.stderr)
        return 2

"""The soak's settings: what the command line asked for, the services' settings, the order mix."""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pika.exceptions

from messages.contract import topology
from messages.contract.models import Money, PlaceOrder
from messages.errors import SagaError
from scripts.harness.scale import Scale

PARTICIPANTS: tuple[str, ...] = tuple(topology.PARTICIPANTS)
SERVICES = ("orchestrator", *PARTICIPANTS)
BROKER = "broker"
CONNECTIONS = "connections"
NODE = "broker node"  # a node of the soak's cluster, stopped and started again
TERMINAL = frozenset({"COMPLETED", "COMPENSATED", "FAILED"})

# The services' time-outs, short so that a soak drains in seconds. The pivot and the
# compensations are resent until answered, so they outlast any participant restart.
SERVICE_SETTINGS = {
    "SAGA_STEP_TIMEOUT_S": "1",
    "SAGA_STEP_MAX_ATTEMPTS": "3",
    "SAGA_TICK_S": "0.1",
    "SAGA_MAX_RETRY_WAIT_S": "5",
    "SAGA_CONNECT_RETRY_S": "0.5",
    "SAGA_DEFAULT_CREDIT_LIMIT": "1000.00",
    "SAGA_LOG_LEVEL": "INFO",
    "SAGA_LOG_FORMAT": "text",  # the fault counter reads the text format
    "SAGA_METRICS_PORT": "0",  # four processes cannot share one port: see observe.py
}

# The order mix. Customers c-1 and c-2 have limits of their own; the others the default.
CUSTOMERS = ("c-1", "c-2", "c-3", "c-4")
LIMITS = {"c-1": Decimal("100.00"), "c-2": Decimal("250.00")}
DEFAULT_LIMIT = Decimal(SERVICE_SETTINGS["SAGA_DEFAULT_CREDIT_LIMIT"])
BLOCKED_CUSTOMER = "c-blocked"
PLENTY_SKUS = ("item-1", "item-2", "item-3")
PLENTY_STOCK = 1_000_000
SCARCE_SKU = "scarce-1"
KINDS = {"complete": 0.60, "declined": 0.15, "scarce": 0.15, "blocked": 0.10}
KIND_HELP = {
    "complete": "to complete",
    "declined": "over the credit limit",
    "scarce": f"for {SCARCE_SKU} (runs out)",
    "blocked": "from a blocked customer",
}

FAULT_FLAGS = {  # option -> (setting, default rate)
    "drop_reply": ("SAGA_FAULT_DROP_REPLY", 0.02),
    "delay_reply": ("SAGA_FAULT_DELAY_REPLY", 0.02),
    "duplicate_reply": ("SAGA_FAULT_DUPLICATE_REPLY", 0.02),
    "crash_after_commit": ("SAGA_FAULT_CRASH_AFTER_COMMIT", 0.005),
}
FAULT_LINE = re.compile(rb"FAULT (\w+) injected")

READY_TIMEOUT_S = 90.0
STATS_LAG_S = 6.0  # the management API's queue statistics are refreshed every 5 s
RECONCILE_AFTER_S = 10.0  # a saga in flight this long is looked up in the store too
STALL_NOTICE_S = 30.0  # no saga finished for this long: say what may be wrong
MAX_LISTED = 10  # problems shown per check; the JSON report has them all

CLIENT_ERRORS = (SagaError, pika.exceptions.AMQPError, OSError)


class ChaosError(Exception):
    """The soak cannot go on; the message says why. Printed without a traceback."""


def say(text: str) -> None:
    """A progress line, flushed at once so a watcher sees it as it happens."""
    print(text, flush=True)


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    url: str
    management_url: str
    sagas: int
    concurrency: int
    orchestrator_kills: int
    participant_kills: int
    kill_participants: tuple[str, ...]
    broker_restart_cmd: str | None
    drop_connections: int
    faults: dict[str, float]
    fault_delay_s: float
    scarce_stock: int
    drain_timeout: float
    settle_s: float
    data_dir: Path | None
    keep: bool
    seed: int
    json_path: Path | None
    scale: Scale = field(default_factory=Scale)


def fault_env(opts: Options) -> dict[str, str]:
    """The SAGA_FAULT_* settings of the participants."""
    env = {FAULT_FLAGS[name][0]: str(rate) for name, rate in opts.faults.items()}
    if opts.faults:
        env["SAGA_FAULT_DELAY_S"] = str(opts.fault_delay_s)
    return env


def seeded_stock(opts: Options) -> dict[str, int]:
    """What the inventory starts with: plenty of most SKUs, little of the scarce one."""
    return {**dict.fromkeys(PLENTY_SKUS, PLENTY_STOCK), SCARCE_SKU: opts.scarce_stock}


# --- the order mix -------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """One order of the mix: its kind (a key of KINDS) and the request placed."""

    kind: str
    request: PlaceOrder


def cents(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low, high)) / 100


def make_order(rng: random.Random) -> Order:
    """One order of a kind drawn from KINDS."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    customer, sku, quantity = rng.choice(CUSTOMERS), rng.choice(PLENTY_SKUS), rng.randint(1, 3)
    amount = cents(rng, 100, 9_999)  # under every limit
    if kind == "declined":
        amount = LIMITS.get(customer, DEFAULT_LIMIT) + cents(rng, 1, 50_000)
    elif kind == "scarce":
        sku, quantity = SCARCE_SKU, rng.randint(1, 2)
    elif kind == "blocked":
        customer = BLOCKED_CUSTOMER
    request = PlaceOrder(
        saga_id=uuid.UUID(int=rng.getrandbits(128), version=4),
        customer_id=customer,
        sku=sku,
        quantity=quantity,
        amount=Money(amount=amount),
    )
    return Order(kind, request)

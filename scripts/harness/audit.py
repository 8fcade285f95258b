"""The soak's audit: every saga ended, stock and money conserved, one order per completed saga,
queues clean.

It reads what each service exposes through its own command line (`python -m orchestrator
list --json`, `python -m workers stock|reservations|payments|orders --json`), the broker's
queues, and what the soak itself placed; never a service's private tables, and it takes each
saga's outcome as the orchestrator states it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from messages.contract import topology
from messages.contract.models import PlaceOrder
from messages.errors import ConfigurationError
from messages.plumbing.management import ManagementApi
from scripts.harness.chaos_options import (
    DEFAULT_LIMIT,
    LIMITS,
    SCARCE_SKU,
    STATS_LAG_S,
    TERMINAL,
    ChaosError,
    Options,
    seeded_stock,
)
from scripts.harness.observe import Orchestrator, Probe
from scripts.harness.stack import CliError, Stack


@dataclass(frozen=True)
class Saga:
    """A saga as the orchestrator states it, with the order the soak placed for it."""

    saga_id: str
    status: str
    outcome: str  # the orchestrator's reason, with any unanswered compensation
    customer: str
    sku: str
    quantity: int
    amount: Decimal


@dataclass(frozen=True)
class Snapshot:
    """Everything the audit looks at, read once the stack is quiet."""

    sagas: dict[str, Saga]
    outbox: int | None  # None: `orchestrator stats --json` did not answer
    stock: dict[str, int]
    reservations: dict[str, tuple[str, int, str]]  # saga -> sku, quantity, status
    charges: dict[str, tuple[str, Decimal, str, str]]  # saga -> customer, amount, currency, status
    orders: dict[str, tuple[str, str, int, Decimal]]  # saga -> customer, sku, quantity, amount


def _saga(row: dict[str, Any], request: PlaceOrder) -> Saga:
    return Saga(
        saga_id=str(row["saga_id"]),
        status=str(row.get("status") or row.get("state")),
        outcome=str(row.get("reason") or row.get("outcome") or ""),
        customer=request.customer_id,
        sku=request.sku,
        quantity=request.quantity,
        amount=request.amount.amount,
    )


def read_snapshot(
    stack: Stack, orchestrator: Orchestrator, placed: dict[str, PlaceOrder]
) -> Snapshot:
    """Read every service through its command line."""
    try:
        listed = stack.sagas()
        stock = {str(k): int(v) for k, v in stack.cli("workers", "stock").items()}
        reservations = {
            s: (r["sku"], int(r["quantity"]), r["status"])
            for s, r in stack.cli("workers", "reservations").items()
        }
        charges = {
            s: (c["customer_id"], Decimal(c["amount"]), c["currency"], c["status"])
            for s, c in stack.cli("workers", "payments").items()
        }
        orders = {
            s: (o["customer_id"], o["sku"], int(o["quantity"]), Decimal(o["amount"]))
            for s, o in stack.cli("workers", "orders").items()
        }
    except CliError as exc:
        raise ChaosError(f"cannot read the services in {stack.data_dir}: {exc}") from exc
    sagas = {
        str(row["saga_id"]): _saga(row, placed[str(row["saga_id"])])
        for row in listed
        if str(row["saga_id"]) in placed
    }
    return Snapshot(sagas, orchestrator.outbox(), stock, reservations, charges, orders)


@dataclass
class Check:
    """One row of the audit: OK when it found no problem."""

    number: int
    title: str
    summary: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_finished(snap: Snapshot, placed: set[str], drain_timeout: float, faults: bool) -> Check:
    """Every saga placed is in the orchestrator and ended; none FAILED."""
    problems: list[str] = []
    missing = sorted(placed - snap.sagas.keys())
    problems += [f"{s}: placed but not in the store" for s in missing]
    for s in sorted(placed & snap.sagas.keys()):
        saga = snap.sagas[s]
        if saga.status not in TERMINAL:
            problems.append(f"{s}: still {saga.status} ({saga.outcome or 'no reason'})")
        elif saga.status == "FAILED":
            problems.append(f"{s}: FAILED: {saga.outcome}")
    failed = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status == "FAILED")
    ended = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status in TERMINAL)
    expect = (
        "0 expected: faults hit the pivot and compensations too, but both are resent until answered"
        if faults
        else "0 expected: no faults injected"
    )
    summary = (
        f"{ended}/{len(placed)} ended within {drain_timeout:g}s of the last order; "
        f"FAILED {failed} ({expect})"
    )
    return Check(1, "every saga ended", summary, problems)


def _with_status(snap: Snapshot, status: str) -> dict[str, Saga]:
    return {s: saga for s, saga in snap.sagas.items() if saga.status == status}


def _state(snap: Snapshot, saga_id: str) -> str:
    return snap.sagas[saga_id].status if saga_id in snap.sagas else "not in the store"


def _set_aside(failed: dict[str, Saga], what: str) -> str:
    """FAILED sagas wait for an operator (check 1 lists them): what they hold is theirs."""
    return f"; {what} of {len(failed)} FAILED saga(s) set aside" if failed else ""


def check_stock(snap: Snapshot, seeded: dict[str, int]) -> Check:
    """Seeded = in stock + sold (+ held by FAILED sagas); reserved only for COMPLETED ones."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    sold: Counter[str] = Counter()
    for saga in completed.values():
        sold[saga.sku] += saga.quantity
    held: Counter[str] = Counter()
    for s in failed:
        sku, quantity, status = snap.reservations.get(s, ("", 0, ""))
        held[sku] += quantity if status == "reserved" else 0
    for sku, initial in sorted(seeded.items()):
        now = snap.stock.get(sku, 0)
        if initial != now + sold[sku] + held[sku]:
            problems.append(
                f"{sku}: seeded {initial} != {now} in stock + {sold[sku]} sold + {held[sku]} "
                f"held ({initial - now - sold[sku] - held[sku]:+d} units unaccounted for)"
            )
    for s, (sku, quantity, status) in sorted(snap.reservations.items()):
        if status == "reserved" and s not in completed and s not in failed:
            problems.append(f"{s}: {quantity} x {sku} still reserved, saga {_state(snap, s)}")
    for s, saga in sorted(completed.items()):
        reservation = snap.reservations.get(s)
        if reservation != (saga.sku, saga.quantity, "reserved"):
            problems.append(f"{s}: COMPLETED but its reservation is {reservation}")
    scarce = f"{SCARCE_SKU}: {seeded[SCARCE_SKU]} seeded, {snap.stock.get(SCARCE_SKU, 0)} left"
    summary = (
        f"seeded = in stock + sold, for {len(seeded)} SKUs ({scarce}); units reserved only "
        f"for completed sagas{_set_aside(failed, 'reservations')}"
    )
    return Check(2, "stock conserved", summary, problems)


def check_money(snap: Snapshot) -> Check:
    """Charged = sold, one matching charge per COMPLETED saga, none left for the others."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    charged = {s: c for s, c in snap.charges.items() if c[3] == "charged" and s not in failed}
    total_charged = sum((c[1] for c in charged.values()), Decimal(0))
    total_sold = sum((saga.amount for saga in completed.values()), Decimal(0))
    if total_charged != total_sold:
        problems.append(f"charged {total_charged} != {total_sold} sold")
    for s, saga in sorted(completed.items()):
        charge = charged.get(s)
        if charge is None:
            problems.append(f"{s}: COMPLETED without a charge")
        elif (charge[0], charge[1]) != (saga.customer, saga.amount):
            problems.append(f"{s}: charged {charge[:2]} for an order of {saga.amount}")
        if saga.amount > LIMITS.get(saga.customer, DEFAULT_LIMIT):
            problems.append(f"{s}: {saga.amount} charged to {saga.customer}, over the limit")
    for s, charge in sorted(charged.items()):
        if s not in completed:
            problems.append(f"{s}: {charge[1]} still charged, saga {_state(snap, s)}")
    refunded = sum(1 for c in snap.charges.values() if c[3] == "refunded" and c[1] > 0)
    summary = (
        f"charged {total_charged} EUR in {len(charged)} charges = {total_sold} EUR of "
        f"{len(completed)} completed orders; {refunded} refunded; no saga charged twice or "
        f"left charged{_set_aside(failed, 'charges')}"
    )
    return Check(3, "money adds up", summary, problems)


def check_orders(snap: Snapshot) -> Check:
    """Exactly one matching order per COMPLETED saga, none for COMPENSATED ones."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    for s, saga in sorted(completed.items()):
        row = snap.orders.get(s)
        if row is None:
            problems.append(f"{s}: COMPLETED without an order")
        elif row != (saga.customer, saga.sku, saga.quantity, saga.amount):
            problems.append(f"{s}: order {row} does not match the saga")
    for s in sorted(snap.orders.keys() - completed.keys() - failed.keys()):
        problems.append(f"{s}: has an order, saga {_state(snap, s)}")
    summary = (
        f"{len(snap.orders)} orders: one for each of {len(completed)} completed sagas, none "
        f"for a compensated one{_set_aside(failed, 'orders')}"
    )
    return Check(4, "one order per completed saga", summary, problems)


def queue_problems(
    stats: dict[str, dict[str, Any]] | None, exact: dict[str, int] | None
) -> list[str]:
    """What is wrong with the queues, from the API's statistics and exact ready counts."""
    if stats is None or exact is None:
        return ["the broker cannot be asked about its queues"]
    problems = []
    for queue, _, _ in topology.consumed_queues():
        row = stats.get(queue, {})
        if "messages" not in row:
            problems.append(f"{queue}: no statistics yet")
            continue
        ready, unacked = exact[queue], int(row.get("messages_unacknowledged", 0))
        if ready or unacked or row["messages"]:
            problems.append(
                f"{queue}: {max(ready, row['messages'] - unacked)} ready, {unacked} unacked"
            )
        if not row.get("consumers"):
            problems.append(f"{queue}: no consumer")
        dlq = topology.dead_letter_queue(queue)
        if exact[dlq] or stats.get(dlq, {}).get("messages"):
            problems.append(f"{dlq}: {exact[dlq]} dead-lettered message(s)")
        problems += [_offline(name, stats.get(name, {})) for name in (queue, dlq)]
    return [p for p in problems if p]


def _offline(queue: str, row: dict[str, Any]) -> str:
    """A quorum queue's members that are not online (after a node came back, none should be)."""
    offline = sorted(set(row.get("members") or []) - set(row.get("online") or []))
    return f"{queue}: replicas on {', '.join(offline)} not online" if offline else ""


def _kinds(stats: dict[str, dict[str, Any]] | None, queues: list[str]) -> str:
    """The queues' type, and for quorum queues on how many nodes each is replicated."""
    rows = [row for name, row in (stats or {}).items() if name in queues]
    kinds = sorted({str(row.get("type", "classic")) for row in rows})
    members = sorted({len(row.get("members") or []) for row in rows if row.get("members")})
    nodes = f", on {'/'.join(map(str, members))} nodes each" if members else ""
    return f" ({'/'.join(kinds)}{nodes})" if kinds else ""


def check_queues(
    mgmt: ManagementApi, vhost: str, probe: Probe, quiet_since: float, outbox: int | None
) -> Check:
    """Poll until the API's statistics are newer than the quiet moment and all is clean."""
    queues = [q for q, _, _ in topology.consumed_queues()]
    queues += [topology.dead_letter_queue(q) for q in queues]
    deadline = time.monotonic() + STATS_LAG_S + 30
    while True:
        try:
            stats: dict[str, dict[str, Any]] | None = mgmt.queues(vhost)
        except ConfigurationError:
            stats = None
        problems = queue_problems(stats, probe.depths(queues))
        if outbox is None:
            problems.append("orchestrator outbox: unknown (`stats --json` did not answer)")
        elif outbox:
            problems.append(f"orchestrator outbox: {outbox} message(s) never confirmed sent")
        fresh = time.monotonic() - quiet_since >= STATS_LAG_S
        if (fresh and not problems) or time.monotonic() > deadline:
            break
        time.sleep(1)
    summary = (
        f"outbox empty; {len(queues) // 2} main queues{_kinds(stats, queues)}: no message ready or "
        f"unacked, a consumer each; {len(queues) // 2} dead-letter queues: empty"
    )
    return Check(5, "queues clean", summary, problems)


def audit(opts: Options, snap: Snapshot, placed: set[str]) -> list[Check]:
    """Checks 1 to 4: every saga ended, and stock, money and orders agree with the outcomes."""
    return [
        check_finished(snap, placed, opts.drain_timeout, bool(opts.faults)),
        check_stock(snap, seeded_stock(opts)),
        check_money(snap),
        check_orders(snap),
    ]

"""Participants on SQLite and on PostgreSQL, and replicas of one participant on one database.

The handlers write SQL both engines share; what keeps two inventory replicas from selling
the same unit twice, or two payment replicas from charging twice, is in that SQL.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from messages.contract.models import ChargePayment, Command, Money, ReleaseStock, ReserveStock
from messages.errors import StoreTransientError
from workers import inventory, payment
from workers.db import Database, open_reader, transaction
from workers.runtime import Participant, apply_batch, open_db

RETENTION = timedelta(days=1)
PAYMENT = payment.payment(Decimal("100.00"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest) -> str:
    """Where participants keep their state: '' for SQLite files, or a fresh database."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_database"))


def open_participant(url: str, tmp_path: Path, participant: Participant) -> Database:
    return open_db(tmp_path / f"{participant.name}.db", participant.schema, url, participant.name)


@pytest.fixture
def stocked(url: str, tmp_path: Path) -> Iterator[Database]:
    db = open_participant(url, tmp_path, inventory.INVENTORY)
    inventory.seed(db, {"item-1": 5})
    yield db
    db.close()


def reserve(saga_id: uuid.UUID, quantity: int = 1) -> ReserveStock:
    return ReserveStock(saga_id=saga_id, sku="item-1", quantity=quantity)


def handle(db: Database, participant: Participant, *commands: Command) -> list[Any]:
    """Handle commands in one batch, as the participant's writer thread does."""
    batch = [(c, contextvars.copy_context()) for c in commands]
    return list(apply_batch(participant, db, RETENTION, batch))


def test_a_reservation_takes_stock_once_and_its_release_gives_it_back(
    stocked: Database,
) -> None:
    saga = uuid.uuid4()
    command = reserve(saga, 2)

    first, again = handle(stocked, inventory.INVENTORY, command, command)

    assert inventory.current_stock(stocked) == {"item-1": 3}
    assert again.repeat and again.reply == first.reply
    handle(stocked, inventory.INVENTORY, ReleaseStock(saga_id=saga, sku="item-1", quantity=2))
    assert inventory.current_stock(stocked) == {"item-1": 5}
    assert inventory.reservations(stocked)[str(saga)]["status"] == "released"


def test_more_than_the_stock_is_refused_and_changes_nothing(stocked: Database) -> None:
    (outcome,) = handle(stocked, inventory.INVENTORY, reserve(uuid.uuid4(), 6))

    assert outcome.reply.reason == "out_of_stock"
    assert "5 available, 6 requested" in outcome.reply.detail
    assert inventory.current_stock(stocked) == {"item-1": 5}


def test_the_command_line_reads_what_the_participant_wrote(
    stocked: Database, url: str, tmp_path: Path
) -> None:
    handle(stocked, inventory.INVENTORY, reserve(uuid.uuid4(), 1))

    reader = open_reader(url, tmp_path / "inventory.db", "inventory")
    try:
        assert inventory.current_stock(reader) == {"item-1": 4}
    finally:
        reader.close()


@pytest.mark.postgres
def test_two_inventory_replicas_never_sell_the_same_unit(postgres_database: str) -> None:
    # Given two inventory replicas on one database, 20 units, and 60 sagas of one unit each,
    # half of them sent to each replica at once
    replicas = [
        open_db(Path("unused"), inventory.SCHEMA, postgres_database, "inventory") for _ in range(2)
    ]
    inventory.seed(replicas[0], {"item-1": 20})
    sagas = [uuid.uuid4() for _ in range(60)]
    results: list[list[Any]] = [[], []]

    def run(replica: int) -> None:
        for saga in sagas[replica::2]:
            results[replica] += handle(replicas[replica], inventory.INVENTORY, reserve(saga))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then exactly 20 reservations succeeded, the stock is 0 and never went below
    outcomes = [r.reply.type for rs in results for r in rs]
    assert outcomes.count("CommandSucceeded") == 20
    assert outcomes.count("CommandFailed") == 40
    assert inventory.current_stock(replicas[0]) == {"item-1": 0}
    assert len(inventory.reservations(replicas[1])) == 20
    for replica in replicas:
        replica.close()


@pytest.mark.postgres
def test_the_same_charge_on_two_replicas_is_taken_once(postgres_database: str) -> None:
    # Given two payment replicas, each handed the same ChargePayment (a redelivery)
    replicas = [
        open_db(Path("unused"), PAYMENT.schema, postgres_database, "payment") for _ in range(2)
    ]
    command = ChargePayment(
        saga_id=uuid.uuid4(), customer_id="c-1", amount=Money(amount=Decimal("9.99"))
    )
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def run(replica: Database) -> None:
        barrier.wait()
        outcomes.extend(handle(replica, PAYMENT, command))

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then one charge is recorded; the loser failed (and gets the first reply on redelivery)
    assert payment.charges(replicas[0]) == {
        str(command.saga_id): {
            "customer_id": "c-1",
            "amount": "9.99",
            "currency": "EUR",
            "status": "charged",
        }
    }
    (again,) = handle(replicas[1], PAYMENT, command)
    assert again.repeat
    for replica in replicas:
        replica.close()


@pytest.mark.postgres
def test_a_deadlock_between_replicas_is_a_transient_store_error(postgres_database: str) -> None:
    # Given two inventory replicas and two SKUs
    a, b = (open_db(Path("unused"), inventory.SCHEMA, postgres_database, "inventory") for _ in "ab")
    inventory.seed(a, {"sku-1": 5, "sku-2": 5})
    locked = threading.Barrier(2)
    caught: list[Exception] = []

    def take(db: Database, first: str, then: str) -> None:
        # What the statement itself raises is what a handler's savepoint sees (apply_batch),
        # so that is what must say "transient"
        with contextlib.suppress(StoreTransientError), transaction(db):
            db.execute("UPDATE stock SET quantity = quantity - 1 WHERE sku = ?", (first,))
            locked.wait()
            try:
                db.execute("UPDATE stock SET quantity = quantity - 1 WHERE sku = ?", (then,))
            except Exception as exc:
                caught.append(exc)
                raise

    # When each locks one SKU, then wants the other's
    threads = [
        threading.Thread(target=take, args=(a, "sku-1", "sku-2")),
        threading.Thread(target=take, args=(b, "sku-2", "sku-1")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then the database gives one up, and that is a transient error (the message comes back
    # uncounted), not a failure of the command; the other one committed
    assert [type(exc) for exc in caught] == [StoreTransientError]
    assert inventory.current_stock(a) == {"sku-1": 4, "sku-2": 4}
    a.close()
    b.close()

"""Hostile input: hundreds of bad messages on every queue we consume, while real sagas run.

For each consumed queue the inputs are generated from a valid message of a type that queue
takes, mutated every way we can think of: broken JSON, each field of the wrong type, each
required field missing, extra fields, unknown or misspelled type tags, the wrong content
type, bodies over the size limit, quantities and amounts out of range, messages that belong
on another queue, and (on orchestrator.replies) well-formed replies for sagas that do not
exist. Each one must end in its queue's DLQ with the reason in a header; the services must
keep serving real orders meanwhile, and no stock, charge, order or saga may change but by
those orders.

A well-formed command is never among the inputs of a participant's queue: nothing tells it
apart from the orchestrator's own, so it would be (and should be) executed. The "saga that
does not exist" case is therefore a reply, on orchestrator.replies, where it is rejected.

Wrong types that the decoder coerces rather than refuses (a quantity of true, an amount that
is a JSON number, ...) are not in the flood, since each is executed: they are in their own
test, marked as an expected failure until the decoder is strict.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from messages.contract import topology
from messages.contract.codec import CONTENT_TYPE, DEFAULT_MAX_BYTES
from messages.contract.models import (
    MESSAGE_TYPES,
    AbortSaga,
    ActionRefused,
    ActionTaken,
    ChargePayment,
    CommandFailed,
    CommandSucceeded,
    CompleteOrder,
    Envelope,
    Money,
    PlaceOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    RetrySaga,
    SagaFinished,
    SagaStatus,
)
from tests.integration.stack import Stack, amqp_channel, drain, send

pytestmark = pytest.mark.broker


# --- the inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One bad input: its body and properties, and the dead-letter reason we expect."""

    name: str
    body: bytes
    reason: str
    content_type: str | None = CONTENT_TYPE
    type: str | None = None


def _money(amount: str = "25.00") -> Money:
    return Money(amount=Decimal(amount))


def _reply(kind: type[CommandSucceeded] | type[CommandFailed], **fields: Any) -> Envelope:
    fields.setdefault("command_type", "ReserveStock")
    fields.setdefault("participant", "inventory")
    if kind is CommandFailed:
        fields.setdefault("reason", "out_of_stock")
    return kind(
        saga_id=uuid.uuid4(), command_id=uuid.uuid4(), detail="item-1 remaining: 9", **fields
    )


# A valid message of every type, each time for a new saga (one that does not exist).
SAMPLES: dict[str, Callable[[], Envelope]] = {
    "PlaceOrder": lambda: PlaceOrder(
        saga_id=uuid.uuid4(), customer_id="c-1", sku="item-1", quantity=1, amount=_money()
    ),
    "ReserveStock": lambda: ReserveStock(saga_id=uuid.uuid4(), sku="item-1", quantity=1),
    "ReleaseStock": lambda: ReleaseStock(saga_id=uuid.uuid4(), sku="item-1", quantity=1),
    "ChargePayment": lambda: ChargePayment(
        saga_id=uuid.uuid4(), customer_id="c-1", amount=_money()
    ),
    "RefundPayment": lambda: RefundPayment(
        saga_id=uuid.uuid4(), customer_id="c-1", amount=_money()
    ),
    "CompleteOrder": lambda: CompleteOrder(
        saga_id=uuid.uuid4(), customer_id="c-1", sku="item-1", quantity=1, amount=_money()
    ),
    "CommandSucceeded": lambda: _reply(CommandSucceeded),
    "CommandFailed": lambda: _reply(CommandFailed),
    "AbortSaga": lambda: AbortSaga(saga_id=uuid.uuid4(), reason="hostile", requested_by="m@x"),
    "RetrySaga": lambda: RetrySaga(saga_id=uuid.uuid4(), reason="hostile", requested_by="m@x"),
    "ActionTaken": lambda: ActionTaken(saga_id=uuid.uuid4(), action="RetrySaga", detail="yes"),
    "ActionRefused": lambda: ActionRefused(saga_id=uuid.uuid4(), action="AbortSaga", detail="no"),
    "SagaFinished": lambda: SagaFinished(saga_id=uuid.uuid4(), status=SagaStatus.COMPLETED),
}
assert SAMPLES.keys() == MESSAGE_TYPES.keys()

# The types each queue's consumer takes; every other type is unexpected there.
ACCEPTED: dict[str, tuple[str, ...]] = {
    topology.REQUESTS_QUEUE: ("PlaceOrder", "AbortSaga", "RetrySaga"),
    topology.REPLIES_QUEUE: ("CommandSucceeded", "CommandFailed"),
    topology.command_queue("inventory"): ("ReserveStock", "ReleaseStock"),
    topology.command_queue("payment"): ("ChargePayment", "RefundPayment"),
    topology.command_queue("order"): ("CompleteOrder",),
}

UUID_FIELDS = {"message_id", "saga_id", "command_id"}
# Values of the wrong type for a field, by what the field holds. Only values the contract
# rules out and the decoder refuses; the lax coercions it accepts are in LOOSE_TYPES below.
WRONG_TYPES: dict[str, list[Any]] = {
    "uuid": [12345, "not-a-uuid", None],
    "datetime": ["yesterday", None, ["2026-01-01T00:00:00Z"]],
    "str": [123, None, {"id": "c-1"}],
    "int": ["one", 1.5, [1]],
    "money": ["25.00", 25, None],
}
BAD_QUANTITIES = [0, -1, -1_000_000, 1_000_001]
BAD_AMOUNTS = [
    "-25.00",
    "-0.01",
    "0",
    "0.00",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "25.001",
    "0.001",
    "1e-3",
    "99999999999.99",
    "",
    "twenty",
]
BAD_CURRENCIES = ["eur", "EURO", "", "E1R", "€", "US"]
BAD_CONTENT_TYPES = [
    "text/plain",
    "application/xml",
    "application/octet-stream",
    "text/json",
    "application/jsonp",
]


def _doc(kind: str) -> dict[str, Any]:
    return SAMPLES[kind]().model_dump(mode="json")


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _kind_of(field: str, value: Any) -> str | None:
    if field in UUID_FIELDS:
        return "uuid"
    if field == "created_at":
        return "datetime"
    if field == "schema_version":
        return "int"
    if isinstance(value, dict):
        return "money"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "str"
    return None


def _garbage(kind: str) -> Iterator[Hostile]:
    """Bodies that are not JSON, or not a JSON object, or far too large."""
    text = _json(_doc(kind))
    not_json = {
        "truncated": text[: len(text) // 2],
        "trailing brace": text + b"}",
        "trailing comma": text[:-1] + b",}",
        "single quotes": text.replace(b'"', b"'"),
        "python repr": repr(_doc(kind)).encode(),
        "unquoted keys": b'{type: "%s"}' % kind.encode(),
        "comment": b"// order\n" + text,
        "empty": b"",
        "whitespace": b" \n\t ",
        "invalid utf-8": b"\xff\xfe" + text,
        "utf-8 bom": b"\xef\xbb\xbf" + text,
        "nested 10k deep": b"[" * 10_000 + b"]" * 10_000,
        "binary": bytes(range(256)),
        "yaml": f"type: {kind}\nsaga_id: {uuid.uuid4()}\n".encode(),
        "two objects": text + b"\n" + text,
    }
    for name, body in not_json.items():
        yield Hostile(f"invalid json: {name}", body, "invalid_json", type=kind)
    not_object = {"null": b"null", "array": b"[]", "number": b"42", "string": b'"x"'}
    not_object["true"] = b"true"
    not_object["message in an array"] = b"[" + text + b"]"
    for name, body in not_object.items():
        yield Hostile(f"json, not an object: {name}", body, "invalid_message", type=kind)
    padded = text + b" " * (DEFAULT_MAX_BYTES + 1 - len(text))
    yield Hostile(
        "too large: valid message padded to the limit + 1", padded, "too_large", type=kind
    )
    big = _doc(kind)
    big["padding"] = "x" * 100_000
    yield Hostile("too large: 100 KB field", _json(big), "too_large", type=kind)
    yield Hostile("too large: 300 KB of zeros", b"\0" * 300_000, "too_large", type=kind)


def _mutations(kind: str) -> Iterator[Hostile]:
    """A valid ``kind`` changed one way at a time."""
    model = MESSAGE_TYPES[kind]
    for field, value in _doc(kind).items():
        what = _kind_of(field, value)
        if field == "type" or what is None:
            continue
        for wrong in WRONG_TYPES[what]:
            doc = _doc(kind) | {field: wrong}
            yield Hostile(f"{kind}.{field} = {wrong!r}", _json(doc), "invalid_message", type=kind)
        if field == "schema_version":
            for version in (0, 2, "1"):
                doc = _doc(kind) | {field: version}
                yield Hostile(
                    f"{kind}.schema_version = {version!r}", _json(doc), "invalid_message", type=kind
                )
    for field, info in model.model_fields.items():
        if info.is_required():
            doc = _doc(kind)
            del doc[field]
            yield Hostile(f"{kind} without {field}", _json(doc), "invalid_message", type=kind)
    doc = _doc(kind)
    del doc["type"]
    yield Hostile(f"{kind} without its type tag", _json(doc), "unknown_type", type=None)
    for extra, value in (("priority", 1), ("Saga_id", str(uuid.uuid4())), ("__class__", kind)):
        doc = _doc(kind) | {extra: value}
        yield Hostile(f"{kind} with extra {extra}", _json(doc), "invalid_message", type=kind)
    if "amount" in model.model_fields:
        doc = _doc(kind)
        doc["amount"]["rounding"] = "up"
        yield Hostile(f"{kind}.amount with extra field", _json(doc), "invalid_message", type=kind)
        doc = _doc(kind)
        del doc["amount"]["amount"]
        yield Hostile(f"{kind}.amount without amount", _json(doc), "invalid_message", type=kind)
        for amount in BAD_AMOUNTS:
            doc = _doc(kind)
            doc["amount"]["amount"] = amount
            name = f"{kind}.amount = {amount!r}"
            yield Hostile(name, _json(doc), "invalid_message", type=kind)
        for currency in BAD_CURRENCIES:
            doc = _doc(kind)
            doc["amount"]["currency"] = currency
            name = f"{kind}.currency = {currency!r}"
            yield Hostile(name, _json(doc), "invalid_message", type=kind)
    if "quantity" in model.model_fields:
        for quantity in BAD_QUANTITIES:
            doc = _doc(kind) | {"quantity": quantity}
            name = f"{kind}.quantity = {quantity}"
            yield Hostile(name, _json(doc), "invalid_message", type=kind)
    # The type tag: unknown or misspelled, in the body and in the AMQP property
    for tag in ("LaunchRockets", kind.lower(), kind + "s", f" {kind}", "", None, 42, [kind]):
        doc = _doc(kind) | {"type": tag}
        yield Hostile(f"{kind} tagged {tag!r}", _json(doc), "unknown_type", type=None)
    for tag in ("LaunchRockets", kind.lower(), kind.upper()):
        body = _json(_doc(kind))
        yield Hostile(f"{kind} with type property {tag!r}", body, "unknown_type", type=tag)
    other = next(t for t in MESSAGE_TYPES if t != kind)
    name = f"{kind} with type property {other}"
    yield Hostile(name, _json(_doc(kind)), "type_mismatch", type=other)
    # A valid body under the wrong content type is not read at all
    for content_type in BAD_CONTENT_TYPES:
        body = _json(_doc(kind))
        name = f"{kind} as {content_type}"
        yield Hostile(name, body, "bad_content_type", content_type=content_type, type=kind)


def _replies_for_unknown_sagas() -> Iterator[Hostile]:
    """Well-formed replies, every one for a saga the orchestrator never started."""
    commands = {
        "ReserveStock": "inventory",
        "ReleaseStock": "inventory",
        "ChargePayment": "payment",
        "RefundPayment": "payment",
        "CompleteOrder": "order",
    }
    for command, participant in commands.items():
        for kind in (CommandSucceeded, CommandFailed):
            reply = _reply(kind, command_type=command, participant=participant)
            body = reply.model_dump_json().encode()
            name = f"{kind.__name__} to {command} of an unknown saga"
            yield Hostile(name, body, "unknown_saga", type=reply.type)
    # A reply to no step of the saga is refused before anything is looked up.
    odd = _reply(CommandFailed, command_type="LaunchRockets", participant="mallory", reason="x")
    yield Hostile(
        "odd CommandFailed of an unknown saga", odd.model_dump_json().encode(), "unexpected_reply"
    )


def hostile_inputs(queue: str) -> list[Hostile]:
    """Every bad input for ``queue``: all distinct."""
    accepted = ACCEPTED[queue]
    cases = list(_garbage(accepted[0]))
    for kind in accepted:
        cases += _mutations(kind)
    for kind in MESSAGE_TYPES:
        if kind not in accepted:
            body = _json(_doc(kind))
            cases.append(
                Hostile(f"{kind}, which belongs elsewhere", body, "unexpected_type", type=kind)
            )
    if queue == topology.REPLIES_QUEUE:
        cases += _replies_for_unknown_sagas()
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), Counter(names).most_common(3)
    inputs = {(case.body, case.content_type, case.type) for case in cases}
    assert len(inputs) == len(cases), f"{queue}: some inputs are the same"
    return cases


# --- the real orders that run during the flood ----------------------------------------------


@dataclass(frozen=True)
class RealOrder:
    customer: str
    sku: str
    quantity: int
    amount: str
    status: str
    reason: str | None = None

    def args(self) -> tuple[str, ...]:
        return (
            *("--customer", self.customer, "--sku", self.sku),
            *("--qty", str(self.quantity), "--amount", self.amount),
        )


# Stock is item-1=10, item-2=5; c-9 is blocked; the default credit limit is 1000.00.
REAL_ORDERS = [
    RealOrder("c-1", "item-1", 1, "25.00", "COMPLETED"),
    RealOrder("c-2", "item-1", 1, "25.00", "COMPLETED"),
    RealOrder("c-3", "item-1", 2, "40.00", "COMPLETED"),
    RealOrder("c-4", "item-2", 2, "10.00", "COMPLETED"),
    RealOrder("c-5", "item-2", 2, "10.00", "COMPLETED"),
    RealOrder("c-6", "item-1", 1, "5000.00", "COMPENSATED", "payment_declined"),
    RealOrder("c-7", "item-1", 1, "1000.01", "COMPENSATED", "payment_declined"),
    RealOrder("c-8", "item-2", 6, "10.00", "COMPENSATED", "out_of_stock"),
    RealOrder("c-1", "item-3", 1, "10.00", "COMPENSATED", "out_of_stock"),
    RealOrder("c-9", "item-1", 1, "25.00", "COMPENSATED", "customer_blocked"),
]

State = dict[str, set[tuple[Any, ...]]]


def snapshot(stack: Stack) -> State:
    """Every row of every table a message could change, in every service's database."""
    tables = {
        "inventory": ("stock", "reservations"),
        "payment": ("charges", "credit_limits"),
        "order": ("orders", "blocked_customers"),
    }
    state: State = {}
    for db, names in tables.items():
        for table in names:
            state[f"{db}.{table}"] = set(stack.query(db, f"SELECT * FROM {table}"))
        processed = "SELECT saga_id, command_type FROM processed_commands"
        state[f"{db}.processed_commands"] = set(stack.query(db, processed))
    sagas = "SELECT saga_id, status, reason FROM sagas"
    state["orchestrator.sagas"] = set(stack.query("orchestrator", sagas))
    state["orchestrator.outbox"] = set(stack.query("orchestrator", "SELECT * FROM outbox"))
    return state


def expected_after(before: State, placed: list[tuple[RealOrder, str]]) -> State:
    """``before`` plus exactly what the real orders do, and nothing else."""
    state = {table: set(rows) for table, rows in before.items()}
    stock: dict[str, int] = dict(before["inventory.stock"])
    for order, saga in placed:
        completed = order.status == "COMPLETED"
        reserved = order.reason != "out_of_stock"
        charged = completed or order.reason == "customer_blocked"
        state["orchestrator.sagas"].add((saga, order.status, order.reason))
        state["inventory.processed_commands"].add((saga, "ReserveStock"))
        if reserved:
            status = "reserved" if completed else "released"
            state["inventory.reservations"].add((saga, order.sku, order.quantity, status))
            state["payment.processed_commands"].add((saga, "ChargePayment"))
        if reserved and not completed:
            state["inventory.processed_commands"].add((saga, "ReleaseStock"))
        if completed:
            stock[order.sku] -= order.quantity
            row = (saga, order.customer, order.sku, order.quantity, order.amount, "EUR")
            state["order.orders"].add(row)
        if charged:
            status = "charged" if completed else "refunded"
            state["payment.charges"].add((saga, order.customer, order.amount, "EUR", status))
            state["order.processed_commands"].add((saga, "CompleteOrder"))
        if order.reason == "customer_blocked":
            state["payment.processed_commands"].add((saga, "RefundPayment"))
    state["inventory.stock"] = set(stock.items())
    return state


# --- the test --------------------------------------------------------------------------------

FLOOD_S = 3.0  # the last two thirds of the flood are spread over this long, orders amid them


def test_hostile_inputs_are_dead_lettered_while_real_sagas_run(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10,item-2=5", "--block", "c-9")
    stack.orchestrator()
    before = snapshot(stack)

    # Every queue's inputs, interleaved so that every consumer is under fire at once
    routes = {queue: (exchange, key) for queue, exchange, key in topology.consumed_queues()}
    assert routes.keys() == ACCEPTED.keys()
    inputs = {queue: hostile_inputs(queue) for queue in routes}
    flood = [
        (queue, case)
        for batch in itertools.zip_longest(*inputs.values())
        for queue, case in zip(inputs, batch, strict=True)
        if case is not None
    ]
    sent: dict[str, tuple[str, Hostile]] = {}  # message_id -> (queue, input)
    with amqp_channel(stack.amqp_url) as channel:

        def publish(queue: str, case: Hostile) -> None:
            message_id = f"hostile-{len(sent):04d}"
            exchange, key = routes[queue]
            properties = {"content_type": case.content_type, "type": case.type}
            send(channel, exchange, key, case.body, message_id=message_id, **properties)
            sent[message_id] = (queue, case)

        first, second = len(flood) // 3, 2 * len(flood) // 3
        for queue, case in flood[:first]:
            publish(queue, case)
        clients = [stack.place_order_async(*order.args(), timeout=30) for order in REAL_ORDERS]
        pause = FLOOD_S / (len(flood) - first)
        for queue, case in flood[first:second]:
            publish(queue, case)
            time.sleep(pause)
        # However slowly the clients start, the last third arrives while sagas are running
        stack.wait_for_log("orchestrator", "sent ReserveStock attempt 1", timeout=30)
        for queue, case in flood[second:]:
            publish(queue, case)
            time.sleep(pause)

        # The real orders all finish, as they would have without the flood
        placed = []
        for order, client in zip(REAL_ORDERS, clients, strict=True):
            out, err = client.communicate(timeout=60)
            result = json.loads(out) if out.strip().startswith("{") else {"out": out, "err": err}
            assert (result.get("status"), result.get("reason")) == (order.status, order.reason), (
                order,
                result,
            )
            placed.append((order, result["saga_id"]))

        # Every input is in its queue's DLQ, as it was sent, with the reason in its headers
        problems = []
        for queue, cases in inputs.items():
            dead = drain(channel, topology.dead_letter_queue(queue), len(cases), timeout=20)
            if len(dead) != len(cases):
                problems.append(f"{queue}: {len(dead)} of {len(cases)} inputs dead-lettered")
            for props, body in dead:
                origin, case = sent.get(props.message_id, ("?", None))
                headers = props.headers or {}
                reason = headers.get(topology.REASON_HEADER)
                if case is None or origin != queue:
                    problems.append(f"{queue}.dlq: unexpected {props.message_id}: {body[:80]!r}")
                elif not reason or not headers.get(topology.DETAIL_HEADER):
                    problems.append(f"{queue}: {case.name}: no reason or detail: {headers}")
                elif reason != case.reason:
                    problems.append(f"{queue}: {case.name}: reason {reason}, not {case.reason}")
                elif headers.get(topology.QUEUE_HEADER) != queue or body != case.body:
                    problems.append(f"{queue}: {case.name}: wrong queue header or body changed")
        assert not problems, "\n".join(problems)

        # Nothing more arrives in a DLQ, nothing is left in a consumed queue, and every
        # consumed queue still has its consumer
        time.sleep(0.5)
        for queue in routes:
            dlq = channel.queue_declare(topology.dead_letter_queue(queue), passive=True)
            assert dlq.method.message_count == 0, f"{queue}.dlq has more than was sent"
            main = channel.queue_declare(queue, passive=True)
            assert main.method.message_count == 0, f"{queue} still holds messages"
            assert main.method.consumer_count >= 1, f"nobody consumes {queue} any more"

    # The services are still up, crashed on nothing, and the databases changed only by the
    # real orders: no hostile input reserved, charged, ordered or started anything
    for name, service in stack.services.items():
        assert service.poll() is None, f"{name} exited:\n{service.output()}"
        assert "Traceback" not in service.output(), f"{name}:\n{service.output()}"
    assert snapshot(stack) == expected_after(before, placed)

    # The orchestrator kept dead-lettering after it had started serving real sagas
    log = stack.services["orchestrator"].output()
    first_saga = log.find("sent ReserveStock attempt 1")
    assert 0 <= first_saga < log.rfind("dead-lettering"), "the orders did not overlap the flood"

    counts = ", ".join(f"{queue} {len(cases)}" for queue, cases in inputs.items())
    reasons = Counter(case.reason for _, case in sent.values())
    print(f"\nhostile inputs tried: {len(sent)} ({counts})")
    print("by reason: " + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()))


# Wrong types a lax decoder would coerce into a well-formed command and execute; the
# decoder validates strictly, so each must be dead-lettered instead.
LOOSE_TYPES: list[tuple[str, str, dict[str, Any]]] = [
    ("inventory", "ReserveStock", {"quantity": True}),  # reserves 1
    ("inventory", "ReserveStock", {"quantity": "2"}),
    ("inventory", "ReserveStock", {"quantity": 3.0}),
    ("payment", "ChargePayment", {"amount": {"amount": 25.5, "currency": "EUR"}}),
    ("payment", "ChargePayment", {"amount": {"amount": "1_000", "currency": "EUR"}}),
    ("order", "CompleteOrder", {"schema_version": True}),
    ("order", "CompleteOrder", {"created_at": "2024-01-01T00:00:00"}),  # no time zone
    ("payment", "ChargePayment", {"amount": {"amount": "1e2", "currency": "EUR"}}),
]


def test_loosely_typed_commands_are_dead_lettered_not_executed(stack: Stack) -> None:
    stack.worker("all", "--stock", "item-1=10,item-2=5")
    stack.orchestrator()
    before = snapshot(stack)

    with amqp_channel(stack.amqp_url) as channel:
        for n, (participant, kind, change) in enumerate(LOOSE_TYPES):
            body = _json(_doc(kind) | change)
            properties = {"content_type": CONTENT_TYPE, "type": kind, "message_id": f"loose-{n}"}
            send(channel, topology.COMMANDS_EXCHANGE, participant, body, **properties)
        wanted = Counter(topology.command_queue(participant) for participant, *_ in LOOSE_TYPES)
        dead = {
            queue: drain(channel, topology.dead_letter_queue(queue), count, timeout=2)
            for queue, count in wanted.items()
        }

    assert snapshot(stack) == before
    assert {queue: len(messages) for queue, messages in dead.items()} == wanted

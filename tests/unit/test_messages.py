"""The message contract: what the models accept, and how the codec turns them into bytes and back.

A message that goes out through ``encode`` must come back unchanged through ``decode``; a body
that is not one of our messages must be refused with a reason the dead-letter queue can show.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from messages.contract.codec import CONTENT_TYPE, decode, encode
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
    HistoryEntry,
    Money,
    PlaceOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    RetrySaga,
    SagaFinished,
    SagaStatus,
    parse_money,
)
from messages.errors import DecodeError, SagaError

SAGA_ID = UUID("7f1b8a52-3c0e-4f6e-9d2b-6a4c1e0f9b31")
COMMAND_ID = UUID("2a9e4c71-0b5d-4e8f-a316-c7d2e9f01b44")
WHEN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
PRICE = Money(amount=Decimal("25.50"), currency="EUR")


def samples() -> list[Envelope]:
    """One message of every type, with every field set to something other than its default."""
    common: dict[str, Any] = {"saga_id": SAGA_ID, "created_at": WHEN}
    return [
        PlaceOrder(**common, customer_id="cust-42", sku="SKU-1", quantity=2, amount=PRICE),
        ReserveStock(**common, sku="SKU-1", quantity=2),
        ReleaseStock(**common, sku="SKU-1", quantity=2),
        ChargePayment(**common, customer_id="cust-42", amount=PRICE),
        RefundPayment(
            **common, customer_id="cust-42", amount=Money(amount=Decimal("0.01"), currency="USD")
        ),
        CompleteOrder(**common, customer_id="cust-42", sku="SKU-1", quantity=2, amount=PRICE),
        CommandSucceeded(
            **common,
            command_id=COMMAND_ID,
            command_type="ReserveStock",
            participant="inventory",
            detail="reserved 2",
        ),
        CommandFailed(
            **common,
            command_id=COMMAND_ID,
            command_type="ChargePayment",
            participant="payment",
            reason="payment_declined",
            detail="no funds",
        ),
        AbortSaga(**common, reason="customer called", requested_by="ops@host"),
        RetrySaga(**common, reason="payment is back", requested_by="alice (web console)"),
        ActionTaken(**common, action="RetrySaga", detail="ChargePayment sent again, attempt 4"),
        ActionRefused(**common, action="AbortSaga", detail="it is COMPLETED"),
        SagaFinished(
            **common,
            status=SagaStatus.FAILED,
            reason="complete_order unanswered",
            history=(
                HistoryEntry(at=WHEN, step="saga", event="started", status=SagaStatus.RUNNING),
                HistoryEntry(
                    at=WHEN, step="saga", event="failed", detail="why", status=SagaStatus.FAILED
                ),
            ),
        ),
    ]


def type_of(message: Envelope) -> str:
    return str(message.model_dump()["type"])


def body_of(message: Envelope, **changes: Any) -> bytes:
    """The JSON body of ``message`` with some top-level fields changed (None removes one)."""
    data = json.loads(message.model_dump_json())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


def an_order() -> PlaceOrder:
    return PlaceOrder(
        saga_id=SAGA_ID,
        message_id=COMMAND_ID,
        created_at=WHEN,
        customer_id="cust-42",
        sku="SKU-1",
        quantity=2,
        amount=PRICE,
    )


# --- the models ------------------------------------------------------------------------------


def test_there_is_a_sample_of_every_message_type() -> None:
    assert sorted(type_of(m) for m in samples()) == sorted(MESSAGE_TYPES)


@pytest.mark.parametrize("message", samples(), ids=type_of)
def test_every_message_type_survives_encode_then_decode(message: Envelope) -> None:
    wire = encode(message)

    decoded = decode(wire.body, content_type=wire.content_type, type_hint=wire.type)

    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", samples(), ids=type_of)
def test_messages_are_frozen(message: Envelope) -> None:
    with pytest.raises(ValidationError):
        message.saga_id = COMMAND_ID  # type: ignore[misc]
    assert message.saga_id == SAGA_ID


def test_money_is_frozen() -> None:
    with pytest.raises(ValidationError):
        PRICE.amount = Decimal("1.00")  # type: ignore[misc]
    assert PRICE.amount == Decimal("25.50")


@pytest.mark.parametrize("message", samples(), ids=type_of)
def test_unknown_fields_are_rejected(message: Envelope) -> None:
    data = {**message.model_dump(), "discount": "50%"}

    with pytest.raises(ValidationError, match="discount"):
        type(message).model_validate(data)


def test_unknown_fields_inside_money_are_rejected() -> None:
    with pytest.raises(ValidationError, match="rate"):
        Money.model_validate({"amount": "1.00", "currency": "EUR", "rate": 1})


@pytest.mark.parametrize(
    "amount",
    [
        1.005,
        Decimal("25.001"),
        "0.001",
        -1,
        Decimal("-25.00"),
        0,
        "0.00",
        float("nan"),
        "NaN",
        float("inf"),
        "Infinity",
        "ten",
        1.5,  # never a float, even a harmless one
        7,
        True,
        "1e2",
        " 25.00 ",
        "1_000",
        "12345678901.00",
    ],
    ids=repr,
)
def test_money_rejects_bad_amounts(amount: object) -> None:
    with pytest.raises(ValidationError):
        Money(amount=amount, currency="EUR")  # type: ignore[arg-type]


@pytest.mark.parametrize("currency", ["eur", "EURO", "EU", "", "E1R", "€"])
def test_money_rejects_bad_currencies(currency: str) -> None:
    with pytest.raises(ValidationError, match="currency"):
        Money(amount=Decimal("1.00"), currency=currency)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (Decimal("25.00"), Decimal("25.00")),
        (Decimal("1.5"), Decimal("1.5")),
        ("0.01", Decimal("0.01")),
        ("9999999999.99", Decimal("9999999999.99")),
    ],
    ids=repr,
)
def test_money_accepts_positive_amounts_with_up_to_two_places(
    amount: object, expected: Decimal
) -> None:
    money = Money(amount=amount)  # type: ignore[arg-type]
    assert money.amount == expected
    assert money.currency == "EUR"


def test_money_prints_with_two_places_and_currency() -> None:
    assert str(Money(amount=Decimal("7.5"), currency="USD")) == "7.50 USD"


@pytest.mark.parametrize(
    ("text", "amount", "currency"),
    [
        ("25.00", "25.00", "EUR"),
        ("25.00 usd", "25.00", "USD"),
        (" 7.5 GBP ", "7.5", "GBP"),
        ("3", "3", "EUR"),
    ],
)
def test_parse_money_reads_an_amount_and_an_optional_currency(
    text: str, amount: str, currency: str
) -> None:
    assert parse_money(text) == Money(amount=Decimal(amount), currency=currency)


@pytest.mark.parametrize(
    "text", ["", "abc", "-5", "1.234", "0", "0.00", "25,00", "25 euros", "1e3"]
)
def test_parse_money_refuses_what_is_not_money(text: str) -> None:
    with pytest.raises(ValueError):
        parse_money(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantity", 0),
        ("quantity", 1_000_001),
        ("sku", ""),
        ("sku", "has space"),
        ("customer_id", "x" * 65),
        ("saga_id", "not-a-uuid"),
        ("schema_version", 2),
    ],
)
def test_place_order_validates_its_fields(field: str, value: object) -> None:
    data = {**an_order().model_dump(), field: value}

    with pytest.raises(ValidationError, match=field):
        PlaceOrder.model_validate(data)


# --- encode ----------------------------------------------------------------------------------


def test_encode_sets_the_amqp_properties() -> None:
    message = ChargePayment(
        saga_id=SAGA_ID, message_id=COMMAND_ID, created_at=WHEN, customer_id="cust-42", amount=PRICE
    )

    wire = encode(message)

    assert wire.content_type == "application/json"
    assert wire.type == "ChargePayment"
    assert wire.message_id == str(COMMAND_ID)
    assert wire.correlation_id == str(SAGA_ID)
    assert wire.delivery_mode == 2
    assert wire.timestamp == WHEN.timestamp()
    body = json.loads(wire.body)
    assert body["type"] == "ChargePayment"
    assert body["amount"] == {"amount": "25.50", "currency": "EUR"}


# --- decode: what it refuses, and why --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "options", "reason"),
    [
        pytest.param(b"{not json", {}, "invalid_json", id="invalid_json"),
        pytest.param(b"", {}, "invalid_json", id="empty_body"),
        pytest.param(
            body_of(an_order(), type="CancelOrder"), {}, "unknown_type", id="unknown_type_in_body"
        ),
        pytest.param(body_of(an_order(), type=None), {}, "unknown_type", id="no_type_in_body"),
        pytest.param(
            body_of(an_order()),
            {"type_hint": "CancelOrder"},
            "unknown_type",
            id="unknown_type_property",
        ),
        pytest.param(body_of(an_order(), quantity=0), {}, "invalid_message", id="invalid_quantity"),
        pytest.param(body_of(an_order(), sku=None), {}, "invalid_message", id="missing_field"),
        pytest.param(body_of(an_order(), discount=5), {}, "invalid_message", id="unknown_field"),
        pytest.param(
            body_of(an_order(), amount={"amount": "1.001", "currency": "EUR"}),
            {},
            "invalid_message",
            id="three_decimals",
        ),
        pytest.param(b"[1, 2]", {}, "invalid_message", id="not_an_object"),
        pytest.param(body_of(an_order()), {"max_bytes": 100}, "too_large", id="too_large"),
        pytest.param(
            body_of(an_order()),
            {"content_type": "text/plain"},
            "bad_content_type",
            id="bad_content_type",
        ),
        pytest.param(
            body_of(an_order()), {"type_hint": "ReserveStock"}, "type_mismatch", id="type_mismatch"
        ),
    ],
)
def test_decode_refuses_with_a_reason(body: bytes, options: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(body, **options)

    assert caught.value.reason == reason
    assert caught.value.detail
    assert isinstance(caught.value, SagaError)


def test_decode_checks_the_size_before_anything_else() -> None:
    # A huge body is refused unread, even when it is not JSON at all.
    with pytest.raises(DecodeError) as caught:
        decode(b"x" * 2000, max_bytes=1024)
    assert caught.value.reason == "too_large"


def test_decode_accepts_a_body_of_exactly_the_limit() -> None:
    order = an_order()
    body = body_of(order)

    assert decode(body, max_bytes=len(body)) == order
    with pytest.raises(DecodeError):
        decode(body, max_bytes=len(body) - 1)


@pytest.mark.parametrize(
    "content_type", [None, "", CONTENT_TYPE, "application/json; charset=utf-8", "Application/JSON"]
)
def test_decode_accepts_json_or_no_content_type(content_type: str | None) -> None:
    order = an_order()

    assert decode(body_of(order), content_type=content_type) == order


def test_decode_names_the_bad_field_in_the_detail() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(body_of(an_order(), quantity=-3))

    assert "quantity" in caught.value.detail
    assert "quantity" in str(caught.value)

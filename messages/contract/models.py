"""The message contract: every message that crosses the broker, as frozen pydantic models.

Each message is an envelope (type tag, ids, saga id, schema version, creation time) plus a
payload. The decoder dispatches on the type tag through a registry (MESSAGE_TYPES here; a
saga declared elsewhere adds its own messages to it).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Literal
from uuid import UUID, uuid4

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

SCHEMA_VERSION = 1


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC (all timestamps on the wire are UTC)."""
    return datetime.now(UTC)


_AMOUNT = re.compile(r"^\d{1,10}(\.\d{1,2})?$")


def _decimal_text(value: object) -> object:
    """On the wire an amount is a plain decimal string: never a float, never '1e2'."""
    if isinstance(value, str):
        if not _AMOUNT.match(value):
            raise ValueError(
                "an amount is a decimal string like '25.00': up to 10 digits, 2 places"
            )
        return Decimal(value)
    if isinstance(value, bool | int | float):
        raise ValueError("an amount is a decimal string like '25.00', not a number")
    return value


def _no_bool(value: object) -> object:
    if isinstance(value, bool):  # True == 1 in Python; on the wire it is not a version
        raise ValueError("expected the number 1")
    return value


def _two_places(value: Decimal) -> Decimal:
    if value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ValueError("money has at most two decimal places")
    return value


# ISO 4217 codes in use for money (funds, metals, SDR and test codes left out). A constant
# rather than pycountry: the list changes about once a year, and a dependency for one
# frozenset would be more to keep current than the frozenset itself.
_ISO_4217 = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP
    MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
    TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER
    ZAR ZMW ZWG
"""
CURRENCIES = frozenset(_ISO_4217.split())


def _known_currency(code: str) -> str:
    if code not in CURRENCIES:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code (e.g. EUR, USD, GBP)")
    return code


class Money(BaseModel):
    """An amount of money: a positive Decimal with at most two places, and its currency."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    amount: Annotated[
        Decimal,
        BeforeValidator(_decimal_text),
        Field(gt=0, max_digits=12, allow_inf_nan=False, description="Positive amount"),
        AfterValidator(_two_places),
    ]
    currency: Annotated[str, AfterValidator(_known_currency)] = Field(
        default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR"
    )

    def __str__(self) -> str:
        return f"{self.amount:.2f} {self.currency}"


_MONEY_TEXT = re.compile(r"^\s*(?P<amount>\d+(\.\d{1,2})?)\s*(?P<currency>[A-Za-z]{3})?\s*$")


def parse_money(text: str) -> Money:
    """Read '25.00' or '25.00 USD' as Money (EUR when no currency is given)."""
    match = _MONEY_TEXT.match(text)
    if match is None:
        raise ValueError(f"not an amount of money: {text!r} (expected e.g. 25.00 or '25.00 EUR')")
    currency = _known_currency((match["currency"] or "EUR").upper())
    return Money(amount=Decimal(match["amount"]), currency=currency)


Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Quantity = Annotated[int, Field(gt=0, le=1_000_000)]


class Envelope(BaseModel):
    """Fields every message carries, whatever its payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: UUID = Field(default_factory=uuid4, description="Unique per message")
    saga_id: UUID = Field(description="The saga this message belongs to")
    schema_version: Annotated[Literal[1], BeforeValidator(_no_bool)] = 1
    created_at: AwareDatetime = Field(default_factory=utc_now)
    type: str  # each message narrows this to a Literal: the tag the decoder dispatches on


# --- the request ---------------------------------------------------------------------------


class PlaceOrder(Envelope):
    """Request: start an order saga. Sent by place_order.py to the orchestrator."""

    type: Literal["PlaceOrder"] = "PlaceOrder"
    customer_id: Identifier
    sku: Identifier
    quantity: Quantity
    amount: Money


# --- commands (orchestrator -> participant) --------------------------------------------------


class Command(Envelope):
    """Base of every command. Its message_id is the idempotency key of the step."""


class ReserveStock(Command):
    """Reserve `quantity` units of `sku` for the saga."""

    type: Literal["ReserveStock"] = "ReserveStock"
    sku: Identifier
    quantity: Quantity


class ReleaseStock(Command):
    """Compensation of ReserveStock: give back the saga's reservation, if there is one."""

    type: Literal["ReleaseStock"] = "ReleaseStock"
    sku: Identifier
    quantity: Quantity


class ChargePayment(Command):
    """Charge `amount` to the customer."""

    type: Literal["ChargePayment"] = "ChargePayment"
    customer_id: Identifier
    amount: Money


class RefundPayment(Command):
    """Compensation of ChargePayment: refund the saga's charge, if there is one."""

    type: Literal["RefundPayment"] = "RefundPayment"
    customer_id: Identifier
    amount: Money


class CompleteOrder(Command):
    """Record the order as completed: the saga's last step."""

    type: Literal["CompleteOrder"] = "CompleteOrder"
    customer_id: Identifier
    sku: Identifier
    quantity: Quantity
    amount: Money


# --- replies (participant -> orchestrator) ---------------------------------------------------


class Reply(Envelope):
    """Base of the replies; `command_id` is the message_id of the command answered."""

    command_id: UUID
    command_type: str = Field(max_length=64)
    participant: Identifier


class CommandSucceeded(Reply):
    """The participant applied the command (or had already applied it)."""

    type: Literal["CommandSucceeded"] = "CommandSucceeded"
    detail: str = Field(default="", max_length=500)


class CommandFailed(Reply):
    """The participant refused the command; nothing changed on its side."""

    type: Literal["CommandFailed"] = "CommandFailed"
    reason: Identifier = Field(description="Machine-readable, e.g. out_of_stock")
    detail: str = Field(default="", max_length=500)


# --- operator actions (saga CLI -> orchestrator) ------------------------------------------


class OperatorAction(Envelope):
    """Base of the actions an operator asks the orchestrator to take on one saga."""

    reason: str = Field(min_length=1, max_length=500, description="Why, for the history")
    requested_by: str = Field(min_length=1, max_length=100, description="Who asked")


class AbortSaga(OperatorAction):
    """Stop a saga: compensate it before its pivot; end it FAILED when stuck past it."""

    type: Literal["AbortSaga"] = "AbortSaga"


class RetrySaga(OperatorAction):
    """Send the saga's pending command again now, rather than at its deadline."""

    type: Literal["RetrySaga"] = "RetrySaga"


class ActionTaken(Envelope):
    """Reply to an operator action the orchestrator took; the saga's history records it."""

    type: Literal["ActionTaken"] = "ActionTaken"
    action: str = Field(max_length=64)
    detail: str = Field(max_length=500, description="What was done")


class ActionRefused(Envelope):
    """Reply to an operator action the saga's state does not allow; nothing changed."""

    type: Literal["ActionRefused"] = "ActionRefused"
    action: str = Field(max_length=64)
    detail: str = Field(max_length=500)


# --- the result ------------------------------------------------------------------------------


class SagaStatus(enum.StrEnum):
    """The states of a saga."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    # Not a state a saga reaches by itself: the store could not read or decide it, so it was
    # set aside for an operator instead of failing every timer tick. Never sent on the wire.
    QUARANTINED = "QUARANTINED"

    @property
    def finished(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class HistoryEntry(BaseModel):
    """One line of a saga's timeline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime
    step: str = Field(max_length=64)
    event: str = Field(max_length=64, description="e.g. sent, succeeded, failed, timed_out")
    detail: str = Field(default="", max_length=500)
    status: SagaStatus
    attempt: int | None = Field(default=None, description="For sent commands: 1, 2, ...")


class SagaFinished(Envelope):
    """Result event: the saga ended. Sent to the requester's reply_to and to saga.events."""

    type: Literal["SagaFinished"] = "SagaFinished"
    status: SagaStatus
    reason: str | None = None
    history: tuple[HistoryEntry, ...] = ()


MessageTypes = Mapping[str, type[Envelope]]


def message_types(*classes: type[Envelope]) -> dict[str, type[Envelope]]:
    """A registry for the decoder: each message class under its type tag."""
    return {cls.model_fields["type"].default: cls for cls in classes}


# Every message of the order saga and the operator's tools. A saga declared elsewhere passes
# its own messages to the decoder beside these (codec.decode's ``types``).
MESSAGE_TYPES: MessageTypes = MappingProxyType(
    message_types(
        PlaceOrder,
        ReserveStock,
        ReleaseStock,
        ChargePayment,
        RefundPayment,
        CompleteOrder,
        CommandSucceeded,
        CommandFailed,
        AbortSaga,
        RetrySaga,
        ActionTaken,
        ActionRefused,
        SagaFinished,
    )
)

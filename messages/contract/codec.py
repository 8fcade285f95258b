"""JSON on the wire, and the one function that turns bytes back into a message model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pydantic import TypeAdapter, ValidationError

from messages.contract.models import MESSAGE_TYPES, AnyMessage, Envelope
from messages.errors import DecodeError

CONTENT_TYPE: Final = "application/json"
DEFAULT_MAX_BYTES: Final = 64 * 1024

_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


@dataclass(frozen=True)
class Wire:
    """A message ready for any AMQP client: its body and the properties we set on every publish."""

    body: bytes
    content_type: str
    type: str
    message_id: str
    correlation_id: str
    timestamp: float

    # Every message is persistent: nothing we publish may vanish in a broker restart.
    delivery_mode: int = 2


def encode(message: Envelope) -> Wire:
    """Serialise a message and derive its AMQP properties (correlation id is the saga id)."""
    return Wire(
        body=message.model_dump_json().encode(),
        content_type=CONTENT_TYPE,
        type=message.type,
        message_id=str(message.message_id),
        correlation_id=str(message.saga_id),
        timestamp=message.created_at.timestamp(),
    )


def decode(
    body: bytes,
    *,
    content_type: str | None = CONTENT_TYPE,
    type_hint: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> AnyMessage:
    """Return the message in ``body`` or raise DecodeError saying why it is not one.

    ``content_type`` and ``type_hint`` are the AMQP properties, checked against the body when
    present so that a message cannot claim to be one thing and carry another.
    """
    if len(body) > max_bytes:
        raise DecodeError("too_large", f"{len(body)} bytes is over the limit of {max_bytes}")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in ("", CONTENT_TYPE):
        raise DecodeError("bad_content_type", f"expected {CONTENT_TYPE}, got {content_type!r}")
    if type_hint and type_hint not in MESSAGE_TYPES:
        raise DecodeError("unknown_type", f"unknown message type {type_hint!r}")
    try:
        # Strict: a quantity of true or "2" is an error to report, not a value to guess.
        message = _ADAPTER.validate_json(body, strict=True)
    except ValidationError as exc:
        raise DecodeError(_reason(exc), _summary(exc)) from exc
    if type_hint and type_hint != message.type:
        raise DecodeError(
            "type_mismatch", f"property type {type_hint!r} but body is {message.type!r}"
        )
    return message


def _reason(exc: ValidationError) -> str:
    kinds = {error["type"] for error in exc.errors()}
    if "json_invalid" in kinds or "json_type" in kinds:
        return "invalid_json"
    if kinds & {"union_tag_invalid", "union_tag_not_found", "model_attributes_type"}:
        return "unknown_type"
    return "invalid_message"


def _summary(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)

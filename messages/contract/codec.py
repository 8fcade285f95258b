"""JSON on the wire, and the one function that turns bytes back into a message model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from messages.contract.models import MESSAGE_TYPES, Envelope, MessageTypes
from messages.errors import DecodeError

CONTENT_TYPE: Final = "application/json"
DEFAULT_MAX_BYTES: Final = 64 * 1024


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
    types: MessageTypes = MESSAGE_TYPES,
) -> Envelope:
    """Return the message in ``body`` or raise DecodeError saying why it is not one.

    ``content_type`` and ``type_hint`` are the AMQP properties, checked against the body when
    present so that a message cannot claim to be one thing and carry another. ``types`` is
    the registry of messages this consumer knows, by type tag.
    """
    if len(body) > max_bytes:
        raise DecodeError("too_large", f"{len(body)} bytes is over the limit of {max_bytes}")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in ("", CONTENT_TYPE):
        raise DecodeError("bad_content_type", f"expected {CONTENT_TYPE}, got {content_type!r}")
    # Our publishers always set the type property: the body is then parsed once, by its model.
    tag = type_hint or _tag_in(body)
    model = types.get(tag)
    if model is None:
        raise DecodeError("unknown_type", f"unknown message type {tag!r}")
    try:
        # Strict: a quantity of true or "2" is an error to report, not a value to guess.
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        if type_hint and any(e["loc"] == ("type",) for e in exc.errors()):
            raise DecodeError(
                "type_mismatch", f"property type {type_hint!r} but body is {_tag_in(body)!r}"
            ) from exc
        raise DecodeError(_reason(exc), _summary(exc)) from exc


def _tag_in(body: bytes) -> str:
    """The type tag in a body that came without the type property (one extra parse)."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise DecodeError("invalid_json", str(exc)) from exc
    if not isinstance(document, dict):
        raise DecodeError("invalid_message", "the body is not a JSON object")
    tag = document.get("type")
    return tag if isinstance(tag, str) else ""


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

"""Logging that names the saga: every record carries the saga id, step and message id of
the message in hand, as readable text or as one JSON object per line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from messages.plumbing.tracing import current_trace_id

_saga_id: ContextVar[str] = ContextVar("saga_id", default="-")
_step: ContextVar[str | None] = ContextVar("step", default=None)
_message_id: ContextVar[str | None] = ContextVar("message_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [saga %(saga_id)s] %(message)s"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("saga_id", _saga_id), ("step", _step), ("message_id", _message_id)):
            if not hasattr(record, name):
                setattr(record, name, var.get())
        if not hasattr(record, "trace_id"):
            record.trace_id = current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the saga fields, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("saga_id", "step", "message_id", "trace_id"):
            value = getattr(record, name, None)
            if value not in (None, "-"):
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@contextmanager
def saga_context(
    saga_id: UUID | str, *, step: str | None = None, message_id: UUID | str | None = None
) -> Iterator[None]:
    """Within this block, log lines carry ``saga_id`` (and the step and message id if given)."""
    tokens = [
        (_saga_id, _saga_id.set(str(saga_id))),
        (_step, _step.set(step)),
        (_message_id, _message_id.set(None if message_id is None else str(message_id))),
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)  # type: ignore[attr-defined]


def configure(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    """Send logs to stderr in our format; quiet the chatty AMQP client loggers."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("aiormq", "aio_pika", "pika"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # It logs every failed connect at ERROR; messages.plumbing.amqp already says it once, clearly.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)

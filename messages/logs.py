"""Logging that names the saga: every record carries the saga id of the message in hand."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import UUID

_saga_id: ContextVar[str] = ContextVar("saga_id", default="-")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s [saga %(saga_id)s] %(message)s"


class _SagaIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "saga_id"):
            record.saga_id = _saga_id.get()
        return True


@contextmanager
def saga_context(saga_id: UUID | str) -> Iterator[None]:
    """Within this block, log lines carry ``saga_id``."""
    token = _saga_id.set(str(saga_id))
    try:
        yield
    finally:
        _saga_id.reset(token)


def configure(level: str = "INFO") -> None:
    """Send logs to stderr in our format; quiet the chatty AMQP client loggers."""
    handler = logging.StreamHandler()
    handler.addFilter(_SagaIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("aiormq", "aio_pika", "pika"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

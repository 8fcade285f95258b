"""The tests' layer over scripts/harness: fast time-outs, private-table reads, raw AMQP.

The stack itself (processes started as a user starts them, logs in files, real kills) is
scripts/harness/stack.py, the same one the chaos soak and the bench start. What is here is
only for tests: settings that make time-outs quick, and looking inside a service's own
SQLite file or its queues to assert on what no command line shows.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import pika

from messages.contract import topology
from messages.contract.codec import decode, encode
from messages.contract.models import Envelope
from scripts.harness import stack as harness
from scripts.harness.processes import ROOT

__all__ = ["FAST_TIMEOUTS", "ROOT", "Stack", "amqp_channel", "drain", "replies", "send"]

# Settings that make a silent participant time out in ~1 s, resends of the pivot and of
# compensations reach their longest wait (1 s) quickly, and a saga count as stuck after 2 s.
FAST_TIMEOUTS = {
    "SAGA_STEP_TIMEOUT_S": "0.3",
    "SAGA_STEP_MAX_ATTEMPTS": "2",
    "SAGA_MAX_RETRY_WAIT_S": "1",
    "SAGA_STUCK_AFTER_S": "2",
    "SAGA_TICK_S": "0.05",
}


class Stack(harness.Stack):
    """The harness's stack, plus read-only looks into a service's own database."""

    def query(self, participant: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Read a service's own SQLite file (read-only)."""
        path = self.data_dir / f"{participant}.db"
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return db.execute(sql, args).fetchall()

    def stock(self, sku: str) -> int:
        return int(self.query("inventory", "SELECT quantity FROM stock WHERE sku = ?", sku)[0][0])


@contextmanager
def amqp_channel(url: str) -> Iterator[Any]:
    """A pika channel with confirms, for tests that talk to queues directly."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


def send(
    channel: Any, exchange: str, routing_key: str, message: Envelope | bytes, **properties: Any
) -> None:
    """Publish a model (with our usual properties) or raw bytes (with only those given)."""
    if isinstance(message, bytes):
        body, props = message, pika.BasicProperties(**properties)
    else:
        wire = encode(message)
        body = wire.body
        props = pika.BasicProperties(
            content_type=wire.content_type,
            type=wire.type,
            message_id=wire.message_id,
            correlation_id=wire.correlation_id,
            delivery_mode=2,
            **properties,
        )
    channel.basic_publish(exchange, routing_key, body, props, mandatory=True)


def drain(channel: Any, queue: str, expect: int, timeout: float = 10.0) -> list[Any]:
    """Take ``expect`` messages off ``queue`` (waiting up to ``timeout``): (props, body)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        got.append((props, body))
    return got


def replies(channel: Any, expect: int) -> list[Any]:
    """Decoded replies waiting in the orchestrator's replies queue."""
    return [decode(body) for _, body in drain(channel, topology.REPLIES_QUEUE, expect)]

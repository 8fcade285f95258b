"""What the running stack says about itself: sagas by `orchestrator list --json`, the outbox
by `orchestrator stats --json`, queue depths by the broker. Never another service's tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from messages.plumbing.settings import split_amqp_urls
from scripts.harness.stack import CliError, Stack


@dataclass(frozen=True)
class Sagas:
    """The orchestrator's sagas as `list --json` shows them: status and reason by saga id."""

    rows: dict[str, dict[str, Any]]

    def statuses(self) -> dict[str, str]:
        return {s: str(row.get("status") or row.get("state")) for s, row in self.rows.items()}

    def fingerprint(self) -> frozenset[tuple[str, str]]:
        """Changes whenever any saga is committed again (its updated_at moves)."""
        return frozenset((s, str(r.get("updated_at"))) for s, r in self.rows.items())


class Orchestrator:
    """The orchestrator, read through its command line."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def sagas(self) -> Sagas | None:
        """Every saga (`python -m orchestrator list --limit 0 --json`); None if it fails."""
        try:
            return Sagas({row["saga_id"]: row for row in self.stack.sagas()})
        except CliError:
            return None

    def outbox(self) -> int | None:
        """Messages not yet confirmed published (`stats --json`), or None if that fails."""
        try:
            return int(self.stack.cli("orchestrator", "stats")["outbox"])
        except (CliError, KeyError, TypeError, ValueError):
            return None


class Probe:
    """Exact ready-message counts by passive queue.declare (the API's numbers lag).

    ``url`` may list several nodes of a cluster: the first that answers is asked.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._parameters = [pika.URLParameters(node) for node in split_amqp_urls(url)]
        self._connection: Any = None

    def depths(self, queues: Iterable[str]) -> dict[str, int] | None:
        """Messages ready in each queue, or None while the broker cannot be asked."""
        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = pika.BlockingConnection(self._parameters)
            channel = self._connection.channel()
            depths = {
                q: int(channel.queue_declare(q, passive=True).method.message_count) for q in queues
            }
            channel.close()
            return depths
        except (pika.exceptions.AMQPError, OSError):
            self.close()
            return None

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                if self._connection.is_open:
                    self._connection.close()
        self._connection = None

"""RabbitMQ's management HTTP API: the few calls provisioning, the harness and the tests make."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from yarl import URL

from messages.errors import ConfigurationError
from messages.plumbing.settings import first_amqp_url, redact


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none); of a list, the first node's."""
    return unquote(urlsplit(first_amqp_url(amqp_url)).path.lstrip("/")) or "/"


class ManagementApi:
    """JSON over HTTP with basic auth; every failure is a ConfigurationError saying what."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.user = user
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "content-type": "application/json"}

    @classmethod
    def for_amqp_url(cls, amqp_url: str, base_url: str | None = None) -> ManagementApi:
        """With the AMQP URL's credentials; by default on port 15672 of the broker's host.

        Of a list of node URLs, the first: a cluster's nodes share users and vhosts.
        ``base_url`` may carry credentials of its own (http://admin:pw@host:15672): they
        are used instead of the AMQP URL's.
        """
        url = URL(first_amqp_url(amqp_url))
        if base_url and (given := URL(base_url)).user:
            return cls(
                str(given.with_user(None)),
                unquote(given.user or ""),
                unquote(given.password or ""),
            )
        return cls(
            base_url or f"http://{url.host}:15672",
            unquote(url.user or "guest"),
            unquote(url.password or "guest"),
        )

    def call(self, method: str, path: str, body: object = None) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=self._headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise ConfigurationError(
                f"management API {method} /api/{path}: HTTP {exc.code} {exc.reason}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigurationError(
                f"the management API at {redact(self.base_url)} does not answer ({exc})"
            ) from exc
        try:
            return json.loads(payload) if payload else None
        except ValueError as exc:  # a proxy's error page, say
            raise ConfigurationError(
                f"management API {method} /api/{path}: not JSON ({payload[:80]!r})"
            ) from exc

    # --- vhosts, queues and connections: what the harness and the tests use -----------------

    def create_vhost(self, name: str) -> None:
        """Create ``name`` and give this API's user every permission on it."""
        vhost = quote(name, safe="")
        self.call("PUT", f"vhosts/{vhost}", {})
        self.call(
            "PUT",
            f"permissions/{vhost}/{quote(self.user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, name: str) -> None:
        """Delete ``name`` with everything in it."""
        self.call("DELETE", f"vhosts/{quote(name, safe='')}")

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """The queues of ``vhost`` with their statistics, by name."""
        rows = self.call("GET", f"queues/{quote(vhost, safe='')}")
        return {row["name"]: row for row in rows or []}

    def peek(self, vhost: str, queue: str, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` messages from the head of ``queue``, put back where they were.

        As the management UI's "Get messages" does: they are requeued, so their order stays
        and they are marked redelivered.
        """
        body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 4096}
        path = f"queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/get"
        return list(self.call("POST", path, body) or [])

    def connections(self, vhost: str) -> list[dict[str, Any]]:
        """The client connections open on ``vhost``."""
        return list(self.call("GET", f"vhosts/{quote(vhost, safe='')}/connections") or [])

    def close_connection(self, name: str) -> None:
        """Close one connection, as the broker would on its way down."""
        self.call("DELETE", f"connections/{quote(name, safe='')}")

"""`saga provision`: one RabbitMQ user per service, each allowed only what its role needs.

Run once with an administrator's URL (SAGA_AMQP_URL) before the services start. It creates
the vhost, the users and their permissions through the management HTTP API, and declares
the topology, so the services can run with SAGA_DECLARE_TOPOLOGY=false and no configure
rights at all. Running it again is harmless: every step is a PUT or an idempotent declare.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from pydantic import Field, SecretStr
from yarl import URL

from messages import amqp, topology
from messages.errors import ConfigurationError
from messages.settings import BrokerSettings, redact

log = logging.getLogger(__name__)

_NOTHING = "^$"
# Server-named queues (amq.gen-...) are how clients get their answers.
_REPLY_QUEUES = r"amq\.gen-.*"


def _any_of(*names: str) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def permissions() -> dict[str, tuple[str, str, str]]:
    """User -> (configure, write, read) regular expressions, as RabbitMQ applies them.

    Publishing is checked on the exchange, so a participant that may write only to
    saga.replies and saga.dead-letter cannot put a command in anyone's queue.
    """
    t = topology
    roles = {
        "orchestrator": (
            _NOTHING,
            # amq.default: results and refusals go to each requester's reply_to queue.
            _any_of(t.COMMANDS_EXCHANGE, t.EVENTS_EXCHANGE, t.DEAD_LETTER_EXCHANGE, "amq.default"),
            _any_of(t.REQUESTS_QUEUE, t.REPLIES_QUEUE),
        ),
        "client": (
            f"^{_REPLY_QUEUES}$",
            f"^({re.escape(t.REQUESTS_EXCHANGE)}|{_REPLY_QUEUES})$",
            f"^({re.escape(t.EVENTS_EXCHANGE)}|{_REPLY_QUEUES})$",
        ),
    }
    for participant in t.PARTICIPANTS:
        roles[participant] = (
            _NOTHING,
            _any_of(t.REPLIES_EXCHANGE, t.DEAD_LETTER_EXCHANGE),
            _any_of(t.command_queue(participant)),
        )
    return roles


class ProvisionSettings(BrokerSettings):
    """What `saga provision` reads: an administrator's URL, and a password per user."""

    management_url: str | None = Field(
        default=None, description="Management HTTP API; default http://<broker host>:15672"
    )
    orchestrator_password: SecretStr = Field(description="Password of the orchestrator user")
    inventory_password: SecretStr = Field(description="Password of the inventory user")
    payment_password: SecretStr = Field(description="Password of the payment user")
    order_password: SecretStr = Field(description="Password of the order user")
    client_password: SecretStr = Field(description="Password of place_order and the saga CLI")

    def password(self, user: str) -> str:
        secret: SecretStr = getattr(self, f"{user}_password")
        return secret.get_secret_value()


class ManagementApi:
    """The few calls of RabbitMQ's management HTTP API that provisioning needs."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "content-type": "application/json"}

    def put(self, path: str, body: dict[str, Any], patience_s: float = 60.0) -> None:
        """PUT, retrying while the broker is still starting (its listener or users not yet up)."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                self._put(path, body)
                return
            except ConfigurationError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying in 2s", exc)
                time.sleep(2)

    def _put(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}",
            method="PUT",
            data=json.dumps(body).encode(),
            headers=self._headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            raise ConfigurationError(
                f"management API refused PUT /api/{path}: {exc.code} {exc.reason} "
                "(is SAGA_AMQP_URL an administrator's?)"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot reach the management API at {self.base_url}: {exc}"
            ) from exc


async def provision(settings: ProvisionSettings) -> list[str]:
    """Create the vhost, users and permissions, then declare the topology; say what was done."""
    url = URL(settings.amqp_url)
    vhost = url.path[1:] or "/"
    admin, admin_password = url.user or "guest", url.password or "guest"
    api = ManagementApi(
        settings.management_url or f"http://{url.host}:15672", admin, admin_password
    )
    where = quote(vhost, safe="")
    done = []
    api.put(f"vhosts/{where}", {})
    api.put(f"permissions/{where}/{quote(admin, safe='')}", _grant(".*", ".*", ".*"))
    done.append(f"vhost {vhost!r}, administered by {admin}")
    for user, (configure, write, read) in permissions().items():
        api.put(f"users/{quote(user, safe='')}", {"password": settings.password(user), "tags": ""})
        api.put(f"permissions/{where}/{quote(user, safe='')}", _grant(configure, write, read))
        done.append(f"user {user}: configure {configure}  write {write}  read {read}")
    connection = await amqp.connect(settings, "provision")
    async with connection:
        await amqp.declare_topology(await connection.channel(), declare=True)
    done.append(f"topology declared on {redact(settings.amqp_url)}")
    return done


def _grant(configure: str, write: str, read: str) -> dict[str, str]:
    return {"configure": configure, "write": write, "read": read}

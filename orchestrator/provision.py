"""`saga provision`: one RabbitMQ user per service, each allowed only what its role needs.

Run once with an administrator's URL (SAGA_AMQP_URL) before the services start. It creates
the vhost, the users and their permissions through the management HTTP API, and declares
the topology, so the services can run with SAGA_DECLARE_TOPOLOGY=false and no configure
rights at all. Running it again is harmless: every step is a PUT or an idempotent declare.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator
from yarl import URL

from messages.contract import topology
from messages.errors import ConfigurationError
from messages.plumbing import amqp
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import BrokerSettings, redact

log = logging.getLogger(__name__)

_NOTHING = "^$"
# Server-named queues (amq.gen-...) are how clients get their answers.
_REPLY_QUEUES = r"amq\.gen-.*"
# The roles `saga provision` makes a user for; the user is named <SAGA_USER_PREFIX><role>.
ROLES = ("orchestrator", *topology.PARTICIPANTS, "client")
# Safe in a URL's user part and in a management API path, unquoted.
_PREFIX = re.compile(r"[A-Za-z0-9._-]*")


def _any_of(*names: str) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def user_names(prefix: str = "") -> dict[str, str]:
    """Role -> the RabbitMQ user `saga provision` creates for it: ``<prefix><role>``.

    Every role, in the order of ROLES: orchestrator, the participants, client.
    """
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"user prefix {prefix!r}: only letters, digits, '.', '_' and '-'")
    return {role: prefix + role for role in ROLES}


def permissions() -> dict[str, tuple[str, str, str]]:
    """Role -> (configure, write, read) regular expressions, as RabbitMQ applies them.

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

    user_prefix: str = Field(
        default="",
        description="Prepended to every user name (`<prefix>orchestrator`, ...); default none",
    )
    management_url: str | None = Field(
        default=None, description="Management HTTP API; default http://<broker host>:15672"
    )
    orchestrator_password: SecretStr = Field(description="Password of the orchestrator user")
    inventory_password: SecretStr = Field(description="Password of the inventory user")
    payment_password: SecretStr = Field(description="Password of the payment user")
    order_password: SecretStr = Field(description="Password of the order user")
    client_password: SecretStr = Field(description="Password of place_order and the saga CLI")

    @field_validator("user_prefix")
    @classmethod
    def _user_prefix(cls, value: str) -> str:
        user_names(value)  # raises ValueError for a prefix unfit for a URL
        return value

    def password(self, role: str) -> str:
        secret: SecretStr = getattr(self, f"{role}_password")
        return secret.get_secret_value()


def _put(api: ManagementApi, path: str, body: dict[str, Any], patience_s: float = 60.0) -> None:
    """PUT, retrying while the broker is still starting (its listener or users not yet up)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            api.call("PUT", path, body)
            return
        except ConfigurationError as exc:
            if time.monotonic() > deadline:
                raise ConfigurationError(f"{exc} (is SAGA_AMQP_URL an administrator's?)") from exc
            log.warning("%s; retrying in 2s", exc)
            time.sleep(2)


async def provision(settings: ProvisionSettings) -> list[str]:
    """Create the vhost, users and permissions, then declare the topology; say what was done."""
    vhost = URL(settings.amqp_urls[0]).path[1:] or "/"  # the same in every node URL
    api = ManagementApi.for_amqp_url(settings.amqp_url, settings.management_url)
    admin = api.user
    where = quote(vhost, safe="")
    done = []
    _put(api, f"vhosts/{where}", {})
    _put(api, f"permissions/{where}/{quote(admin, safe='')}", _grant(".*", ".*", ".*"))
    done.append(f"vhost {vhost!r}, administered by {admin}")
    users = user_names(settings.user_prefix)
    for role, (configure, write, read) in permissions().items():
        path = quote(users[role], safe="")
        _put(api, f"users/{path}", {"password": settings.password(role), "tags": ""})
        _put(api, f"permissions/{where}/{path}", _grant(configure, write, read))
        done.append(f"user {users[role]}: configure {configure}  write {write}  read {read}")
    connection = await amqp.connect(settings, "provision")
    async with connection:
        await amqp.declare_topology(await connection.channel(), settings, declare=True)
    done.append(f"topology declared on {redact(settings.amqp_url)}")
    return done


def _grant(configure: str, write: str, read: str) -> dict[str, str]:
    return {"configure": configure, "write": write, "read": read}

"""One RabbitMQ user per service (`saga provision`), each allowed only what its role needs."""

from __future__ import annotations

import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest

from messages import topology
from messages.models import ReserveStock
from orchestrator.provision import permissions
from tests.integration.broker import Broker
from tests.integration.stack import ROOT, Stack, send
from tests.integration.test_saga_flows import ORDER

pytestmark = pytest.mark.broker

USERS = tuple(permissions())


@dataclass
class Provisioned:
    """A vhost provisioned with per-service users; ``url(user)`` logs in as one of them."""

    admin_url: str
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        parts = urlsplit(self.admin_url)
        netloc = f"{user}:{quote(self.passwords[user])}@{parts.hostname}:{parts.port or 5672}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.fixture
def provisioned(broker: Broker, amqp_url: str) -> Iterator[Provisioned]:
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    env = {f"SAGA_{user.upper()}_PASSWORD": password for user, password in passwords.items()}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "provision"],
        cwd=ROOT,
        env={
            **Stack(amqp_url, ROOT).environment(),
            **env,
            "SAGA_MANAGEMENT_URL": broker.management_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "topology declared" in done.stdout
    try:
        yield Provisioned(amqp_url, passwords)
    finally:
        for user in USERS:
            broker.api("DELETE", f"users/{user}")


def refused(url: str, exchange: str, routing_key: str) -> bool:
    """Whether the broker refuses to let this user publish there (ACCESS_REFUSED)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        command = ReserveStock(saga_id=uuid.uuid4(), sku="item-1", quantity=1)
        try:
            send(channel, exchange, routing_key, command)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 403, exc
            return True
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_a_participant_cannot_command_another(provisioned: Provisioned) -> None:
    inventory = provisioned.url("inventory")
    # Not through the commands exchange, not through the default exchange
    assert refused(inventory, topology.COMMANDS_EXCHANGE, "payment")
    assert refused(inventory, "", topology.command_queue("payment"))
    # ... and not by posing as a client either
    assert refused(inventory, topology.REQUESTS_EXCHANGE, topology.REQUEST_ROUTING_KEY)
    # The client may only place requests
    assert refused(provisioned.url("client"), topology.COMMANDS_EXCHANGE, "payment")
    # What a participant may do, it can: reply
    assert not refused(inventory, topology.REPLIES_EXCHANGE, topology.REPLY_ROUTING_KEY)

    # Nothing reached payment's queue
    admin = pika.BlockingConnection(pika.URLParameters(provisioned.admin_url))
    try:
        queue = admin.channel().queue_declare(topology.command_queue("payment"), passive=True)
        assert queue.method.message_count == 0
    finally:
        admin.close()


def test_a_participant_cannot_read_another_participants_commands(
    provisioned: Provisioned,
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(provisioned.url("order")))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            connection.channel().basic_get(topology.command_queue("payment"))
        assert caught.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()


def test_the_saga_runs_with_least_privileged_users(provisioned: Provisioned, stack: Stack) -> None:
    no_declaring = {"SAGA_DECLARE_TOPOLOGY": "false"}
    for participant, options in (
        ("inventory", ("--stock", "item-1=10")),
        ("payment", ()),
        ("order", ()),
    ):
        stack.worker(
            participant, *options, SAGA_AMQP_URL=provisioned.url(participant), **no_declaring
        )
    stack.orchestrator(SAGA_AMQP_URL=provisioned.url("orchestrator"), **no_declaring)
    stack.env["SAGA_AMQP_URL"] = provisioned.url("client")

    code, result = stack.place_order(*ORDER, "--amount", "25.00")

    assert code == 0, result
    assert stack.stock("item-1") == 9


def test_a_service_without_the_topology_says_to_provision(stack: Stack) -> None:
    service = stack.start(
        "orchestrator", "orchestrator", "run", ready=None, SAGA_DECLARE_TOPOLOGY="false"
    )
    assert service.process.wait(30) == 2
    assert "run `saga provision` first" in service.output()
    assert "Traceback" not in service.output()

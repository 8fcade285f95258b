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

from messages.contract import topology
from messages.contract.models import CommandSucceeded, ReserveStock
from messages.errors import ConfigurationError
from orchestrator.engine import command_id
from orchestrator.provision import ROLES, user_names
from tests.integration.broker import Broker
from tests.integration.stack import ROOT, Stack, drain, send
from tests.integration.test_saga_flows import ORDER

pytestmark = pytest.mark.broker


@dataclass
class Provisioned:
    """A vhost provisioned with per-service users; ``url(role)`` logs in as one of them."""

    admin_url: str
    users: dict[str, str]
    passwords: dict[str, str]

    def participant_users(self) -> str:
        """SAGA_PARTICIPANT_USERS for the orchestrator: who each participant logs in as."""
        return ",".join(f"{p}={self.users[p]}" for p in topology.PARTICIPANTS)

    def url(self, role: str) -> str:
        parts = urlsplit(self.admin_url)
        host = parts.netloc.rpartition("@")[2]
        login = f"{self.users[role]}:{quote(self.passwords[role])}"
        return urlunsplit((parts.scheme, f"{login}@{host}", parts.path, "", ""))


def provision(broker: Broker, amqp_url: str, prefix: str) -> Provisioned:
    """Run `saga provision` on the test's vhost, with this run's user names."""
    passwords = {role: secrets.token_urlsafe(12) for role in ROLES}
    env = {f"SAGA_{role.upper()}_PASSWORD": password for role, password in passwords.items()}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "provision"],
        cwd=ROOT,
        env={
            **Stack(amqp_url, ROOT).environment(),
            **env,
            "SAGA_USER_PREFIX": prefix,
            "SAGA_MANAGEMENT_URL": broker.management_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "topology declared" in done.stdout
    return Provisioned(amqp_url, user_names(prefix), passwords)


def delete_users(broker: Broker, prefix: str) -> None:
    """Delete this run's users, and only those; ones never made are no error."""
    assert prefix, "a test run deletes only users of its own prefix"
    for user in user_names(prefix).values():
        try:
            broker.api("DELETE", f"users/{quote(user, safe='')}")
        except ConfigurationError as exc:
            if "HTTP 404" not in str(exc):
                raise


@pytest.fixture
def provisioned(broker: Broker, amqp_url: str, user_prefix: str) -> Iterator[Provisioned]:
    try:
        yield provision(broker, amqp_url, user_prefix)
    finally:
        delete_users(broker, user_prefix)


def shared_users(broker: Broker) -> dict[str, str]:
    """The users a real `saga provision` (no prefix) makes, if any: name -> password hash."""
    plain = set(user_names(""))
    return {u["name"]: u["password_hash"] for u in broker.api("GET", "users") if u["name"] in plain}


def test_a_test_run_makes_and_removes_only_users_of_its_own(
    broker: Broker, amqp_url: str, user_prefix: str
) -> None:
    # Given whatever users a real provisioning made on this broker
    before = shared_users(broker)

    # When the tests provision and clean up
    try:
        provisioned = provision(broker, amqp_url, user_prefix)
        on_broker = {u["name"] for u in broker.api("GET", "users")}
        # Then they made users of this run's names
        assert set(provisioned.users.values()) <= on_broker
        assert all(name.startswith(user_prefix) for name in provisioned.users.values())
    finally:
        delete_users(broker, user_prefix)

    # And removed those, leaving the shared ones as they were
    after = {u["name"] for u in broker.api("GET", "users")}
    assert not set(provisioned.users.values()) & after
    assert shared_users(broker) == before


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
    stack.orchestrator(
        SAGA_AMQP_URL=provisioned.url("orchestrator"),
        SAGA_PARTICIPANT_USERS=provisioned.participant_users(),
        **no_declaring,
    )
    stack.env["SAGA_AMQP_URL"] = provisioned.url("client")

    code, result = stack.place_order(*ORDER, "--amount", "25.00")

    # Every reply came from its participant's own user, so every one was accepted
    assert code == 0, result
    assert stack.stock("item-1") == 9


def test_a_participant_cannot_answer_for_another(provisioned: Provisioned, stack: Stack) -> None:
    # Given a saga waiting for ChargePayment (no payment service yet), and an orchestrator
    # that knows which user each participant logs in as
    stack.env["SAGA_DECLARE_TOPOLOGY"] = "false"
    stack.worker("inventory", "--stock", "item-1=10", SAGA_AMQP_URL=provisioned.url("inventory"))
    stack.orchestrator(
        SAGA_AMQP_URL=provisioned.url("orchestrator"),
        SAGA_PARTICIPANT_USERS=provisioned.participant_users(),
        SAGA_STEP_TIMEOUT_S="60",
    )
    stack.env["SAGA_AMQP_URL"] = provisioned.url("client")
    order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60)
    stack.wait_for_log("orchestrator", "sent ChargePayment attempt 1")
    saga_id = next(iter(stack.query("inventory", "SELECT saga_id FROM reservations")))[0]

    # When inventory, logged in as itself (RabbitMQ checks user_id against the login),
    # claims that the charge went through
    forged = CommandSucceeded(
        saga_id=uuid.UUID(saga_id),
        command_id=command_id(uuid.UUID(saga_id), "charge_payment", compensating=False),
        command_type="ChargePayment",
        participant="payment",
        detail="charged (not really)",
    )
    connection = pika.BlockingConnection(pika.URLParameters(provisioned.url("inventory")))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        send(
            channel,
            topology.REPLIES_EXCHANGE,
            topology.REPLY_ROUTING_KEY,
            forged,
            user_id=provisioned.users["inventory"],
        )
    finally:
        connection.close()

    # Then the orchestrator dead-letters it, and the saga still waits for payment
    admin = pika.BlockingConnection(pika.URLParameters(provisioned.admin_url))
    try:
        dead = drain(admin.channel(), topology.dead_letter_queue(topology.REPLIES_QUEUE), 1)
    finally:
        admin.close()
    assert [props.headers[topology.REASON_HEADER] for props, _ in dead] == ["unauthenticated_reply"]
    assert "charge_payment: succeeded" not in stack.services["orchestrator"].output()

    # And the real payment service's answer is taken
    stack.worker("payment", SAGA_AMQP_URL=provisioned.url("payment"))
    stack.worker("order", SAGA_AMQP_URL=provisioned.url("order"))
    out, err = order.communicate(timeout=60)
    assert order.returncode == 0, (out, err)


def test_a_service_without_the_topology_says_to_provision(stack: Stack) -> None:
    service = stack.start(
        "orchestrator", "orchestrator", "run", ready=None, SAGA_DECLARE_TOPOLOGY="false"
    )
    assert service.wait(30) == 2
    assert "run `saga provision` first" in service.output()
    assert "Traceback" not in service.output()

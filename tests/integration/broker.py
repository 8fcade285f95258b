"""A real RabbitMQ for the tests: the one at SAGA_TEST_AMQP_URL, else a testcontainers one.

Each test gets its own vhost, made and removed through the management HTTP API, so tests
never see each other's queues and the production code needs no test-only naming.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from messages.errors import ConfigurationError
from messages.plumbing.management import ManagementApi
from scripts.harness.vhost import vhost_url

HOW_TO = (
    "set SAGA_TEST_AMQP_URL to a RabbitMQ with the management plugin "
    "(e.g. amqp://guest:guest@127.0.0.1:5672/; SAGA_TEST_MANAGEMENT_URL if its management API "
    "is not on port 15672 of the same host), or make Docker available for testcontainers"
)


@dataclass(frozen=True)
class Broker:
    """Where the broker is, and how to manage vhosts on it."""

    amqp_url: str
    management_url: str

    @classmethod
    def from_url(cls, amqp_url: str, management_url: str | None = None) -> Broker:
        parts = urlsplit(amqp_url)
        default = f"http://{parts.hostname}:15672"
        return cls(amqp_url, (management_url or default).rstrip("/"))

    def url_for(self, vhost: str) -> str:
        """The AMQP URL of ``vhost`` on this broker."""
        return vhost_url(self.amqp_url, vhost)

    @property
    def management(self) -> ManagementApi:
        """The management HTTP API (the project's one client), with the AMQP URL's login."""
        return ManagementApi.for_amqp_url(self.amqp_url, self.management_url)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the management HTTP API with the AMQP URL's credentials."""
        return self.management.call(method, path, body)

    def check(self) -> None:
        """Raise RuntimeError with one line saying what is wrong and what to do about it."""
        parts = urlsplit(self.amqp_url)
        host = parts.hostname or "localhost"
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise RuntimeError(
                f"no RabbitMQ answers AMQP at {host}:{port} ({exc.strerror or exc}): start one "
                f"there, or {HOW_TO}"
            ) from None
        try:
            self.api("GET", "overview")
        except ConfigurationError as exc:
            raise RuntimeError(self._management_problem(exc)) from None

    def _management_problem(self, exc: ConfigurationError) -> str:
        cause = exc.__cause__
        if isinstance(cause, urllib.error.HTTPError) and cause.code == 401:
            return (
                f"the management API at {self.management_url} refused the login of "
                "SAGA_TEST_AMQP_URL's user: check its password, and that it is tagged administrator"
            )
        if isinstance(cause, urllib.error.HTTPError):
            return f"{exc}: is SAGA_TEST_MANAGEMENT_URL RabbitMQ's management API?"
        return (
            f"RabbitMQ answers AMQP but its management API at {self.management_url} does not: "
            "run `rabbitmq-plugins enable rabbitmq_management` on the broker, or set "
            "SAGA_TEST_MANAGEMENT_URL to where it listens"
        )

    def create_vhost(self, name: str) -> None:
        self.management.create_vhost(name)

    def delete_vhost(self, name: str) -> None:
        self.management.delete_vhost(name)


def start_container() -> tuple[Broker, Any]:
    """A broker in Docker via testcontainers; raises RuntimeError with instructions if none."""
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:4-management").with_exposed_ports(15672)
        container.start()
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        message = f"testcontainers could not start RabbitMQ ({reason}): {HOW_TO}"
        raise RuntimeError(message) from None
    host = container.get_container_host_ip()
    amqp = f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
    broker = Broker(amqp, f"http://{host}:{container.get_exposed_port(15672)}")
    deadline = time.monotonic() + 60
    while True:  # the management plugin starts a little after AMQP answers
        try:
            broker.check()
            return broker, container
        except RuntimeError:
            if time.monotonic() > deadline:
                container.stop()
                raise
            time.sleep(0.5)


def from_environment() -> Broker | None:
    """The broker named by SAGA_TEST_AMQP_URL, if set."""
    url = os.environ.get("SAGA_TEST_AMQP_URL")
    if not url:
        return None
    return Broker.from_url(url, os.environ.get("SAGA_TEST_MANAGEMENT_URL"))

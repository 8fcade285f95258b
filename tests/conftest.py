"""Fixtures shared by every test: a real broker, a vhost per test, a stack of processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.broker import Broker, from_environment, start_container
from tests.integration.stack import Stack


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """SAGA_TEST_AMQP_URL when set, else a testcontainers RabbitMQ; never a silent skip."""
    broker = from_environment()
    if broker is not None:
        try:
            broker.check()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield broker
        return
    try:
        broker, container = start_container()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield broker
    finally:
        container.stop()


@pytest.fixture
def amqp_url(broker: Broker) -> Iterator[str]:
    """The URL of a fresh vhost, deleted after the test."""
    vhost = f"saga-test-{uuid.uuid4().hex[:12]}"
    broker.create_vhost(vhost)
    try:
        yield broker.url_for(vhost)
    finally:
        broker.delete_vhost(vhost)


@pytest.fixture
def stack(amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    """Real service processes on the test's vhost; all stopped after the test."""
    stack = Stack(amqp_url, tmp_path)
    try:
        yield stack
    finally:
        stack.stop_all()

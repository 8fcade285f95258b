"""SAGA_AMQP_URL with several node URLs: services and clients use the first that answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from messages.plumbing import amqp
from messages.plumbing.settings import BrokerSettings
from scripts.harness.processes import free_port
from tests.integration.stack import Stack
from tests.integration.test_saga_flows import ORDER

pytestmark = pytest.mark.broker


def dead_node(amqp_url: str) -> str:
    """The URL of a node that is not there: the same vhost on a port nothing listens on."""
    vhost = amqp_url.rsplit("/", 1)[1]
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}"


def test_connect_skips_a_dead_node(amqp_url: str) -> None:
    settings = BrokerSettings(amqp_url=f"{dead_node(amqp_url)},{amqp_url}", connect_retry_s=30)

    async def run() -> None:
        # Within one round: no pause of SAGA_CONNECT_RETRY_S before the second node.
        connection = await asyncio.wait_for(amqp.connect(settings, "test"), 10)
        await connection.close()

    asyncio.run(run())


def test_a_saga_completes_when_the_first_node_is_dead(amqp_url: str, tmp_path: Path) -> None:
    stack = Stack(f"{dead_node(amqp_url)},{amqp_url}", tmp_path)
    try:
        stack.worker("all", "--stock", "item-1=10")
        stack.orchestrator()

        code, result = stack.place_order(*ORDER, "--amount", "25.00")  # pika, given the list

        assert code == 0, result
        assert result["status"] == "COMPLETED"
        log = stack.services["orchestrator"].output()
        assert "does not answer" in log and "connected to RabbitMQ node" in log
        assert "guest:guest" not in log  # every URL of the list redacted
    finally:
        stack.stop_all()

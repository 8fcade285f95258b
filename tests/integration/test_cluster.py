"""A 3-node RabbitMQ cluster with quorum queues: the node the services use goes away.

The nodes are private (scripts/harness/rabbit_cluster.py), never the shared broker, so one
can be stopped for real. The services are given every node's URL; they connect to the
first, and when it stops they move to another node and the sagas go on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.rabbit_cluster import PrivateCluster
from tests.integration.stack import Stack
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker

SETTINGS = {
    "SAGA_QUEUE_TYPE": "quorum",
    "SAGA_CONNECT_RETRY_S": "0.2",
    "SAGA_CONNECT_TIMEOUT_S": "10",
}
CONNECTED = re.compile(r"connected to RabbitMQ node amqp://guest:\*\*\*@127\.0\.0\.1:(\d+)/")


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    with PrivateCluster.create(size=3) as cluster:  # stops and removes every node, always
        yield cluster


def nodes_in_use(stack: Stack) -> list[int]:
    """The AMQP port each service last connected to, by its log."""
    return [int(CONNECTED.findall(s.output())[-1]) for s in stack.services.values()]


def test_a_saga_completes_after_the_services_node_stops(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    stack = Stack(cluster.amqp_url, tmp_path, env=dict(SETTINGS))
    try:
        # Given the services on the cluster, with replicated quorum queues
        stack.worker("all", "--stock", "item-1=10")
        stack.orchestrator()
        code, result = stack.place_order(*ORDER, "--amount", "25.00", timeout=30)
        assert code == 0, result
        queues = cluster.node(2).ctl("list_queues", "-q", "--no-table-headers", "name", "type")
        types = dict(line.split() for line in queues.splitlines() if line.strip())
        assert types["orchestrator.requests"] == "quorum", queues
        assert set(types.values()) == {"quorum"}, queues
        first = cluster.node(1).state.amqp_port
        assert nodes_in_use(stack) == [first, first]  # the first node that answers

        # When the node they are connected to stops
        cluster.stop_node(1)
        for name in stack.services:
            stack.wait_for_log(name, "reconnected to RabbitMQ", timeout=45)

        # Then they are on another node, and a second saga completes
        assert first not in nodes_in_use(stack)
        code, result = stack.place_order(*ORDER, "--amount", "25.00", timeout=30)
        assert code == 0, result
        assert result["status"] == "COMPLETED"
        assert sent(result) == ["ReserveStock", "ChargePayment", "CompleteOrder"]
        assert stack.stock("item-1") == 8

        # And the cluster, as scripts/cluster.py reads it, says so; node 1 comes back into it
        status = PrivateCluster.load(cluster.base_dir).status()
        assert [node["up"] for node in status["nodes"]] == [False, True, True]
        assert len(status["cluster_status"]["running_nodes"]) == 2
        cluster.start_node(1)
        cluster.wait_running(3, timeout=60)
    finally:
        stack.stop_all()

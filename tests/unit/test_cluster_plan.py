"""The private cluster's plan, before anything starts: its own names and ports, never 5672's."""

from __future__ import annotations

from pathlib import Path

from scripts.harness.rabbit_cluster import SHARED_PORTS, PrivateCluster


def test_three_nodes_with_their_own_names_ports_and_directories(tmp_path: Path) -> None:
    cluster = PrivateCluster.create(size=3, management=True, parent_dir=tmp_path)
    try:
        names = [node.name for node in cluster.nodes]
        ports = [
            port
            for node in cluster.nodes
            for port in (node.state.amqp_port, node.state.dist_port, node.state.management_port)
        ]
        assert len(set(names)) == 3 and not any(name.startswith("rabbit@") for name in names)
        assert len(set(ports)) == 9 and not set(ports) & SHARED_PORTS
        assert all(node.base_dir.parent == cluster.base_dir for node in cluster.nodes)
        assert cluster.amqp_url.count(",") == 2 and len(cluster.management_urls) == 3
    finally:
        cluster.stop()  # nothing started: only the directory to remove
    assert not cluster.base_dir.exists()

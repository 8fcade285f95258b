"""A private RabbitMQ cluster: several PrivateNodes beside the shared node, joined as one.

Each node is a :class:`~scripts.harness.rabbit_node.PrivateNode` (own node name, ports,
config and data directory, owned by the ``rabbitmq`` user when run as root), all under one
temp directory and sharing one Erlang cookie; the second and later nodes join the first
(``stop_app``, ``join_cluster``, ``start_app``). The shared node (``rabbit@localhost``,
5672, 15672, 25672) is never touched: the names and ports are checked before anything starts.

    with PrivateCluster.create(size=3) as cluster:   # start(): all up and joined
        url = cluster.amqp_url                        # SAGA_AMQP_URL: the nodes, comma-separated
        cluster.stop_node(1)                          # the whole Erlang node down, data kept
        cluster.start_node(1)                         # back, and in the cluster again
    # stop(): every node killed and the cluster's directory removed, also when start() failed

The cluster's state is ``cluster.json`` in its directory (each node keeps its own
``node.json``), so ``scripts/cluster.py`` can start it in one command and stop it in another.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from scripts.harness.rabbit_node import NodeError, PrivateNode

CLUSTER_FILE = "cluster.json"
# What the machine's shared node uses: AMQP, management, distribution (AMQP + 20000).
SHARED_PORTS = frozenset({5672, 15672, 25672})
SHARED_NODE = "rabbit@"


@dataclass
class NodeStatus:
    """One node as ``status()`` sees it."""

    number: int
    name: str
    amqp_url: str
    management_url: str | None
    up: bool


class PrivateCluster:
    """Several private nodes clustered together: start, status, stop_node/start_node, stop."""

    def __init__(self, base_dir: Path, nodes: list[PrivateNode]) -> None:
        self.base_dir = base_dir
        self.nodes = nodes

    # --- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        size: int = 3,
        management: bool = False,
        parent_dir: str | Path | None = None,
    ) -> PrivateCluster:
        """``size`` nodes with fresh free ports under a new temp directory; not started."""
        if size < 1:
            raise NodeError(f"a cluster needs at least one node, not {size}")
        base = Path(tempfile.mkdtemp(prefix="saga-cluster-", dir=parent_dir))
        cookie = secrets.token_hex(20).upper()  # nodes of one cluster share it
        suffix = secrets.token_hex(3)
        nodes: list[PrivateNode] = []
        try:
            for number in range(1, size + 1):
                name = f"saga-cluster-{suffix}-{number}@localhost"
                nodes.append(_fresh_node(nodes, management, name, base, cookie))
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        base.chmod(0o755)  # the server, as the rabbitmq user, reaches its node's directory
        cluster = cls(base, nodes)
        cluster._save()
        return cluster

    @classmethod
    def load(cls, base_dir: str | Path) -> PrivateCluster:
        """The cluster ``create()`` wrote to ``base_dir`` (for another process)."""
        path = Path(base_dir) / CLUSTER_FILE
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NodeError(f"no private cluster at {path}: {exc}") from exc
        return cls(Path(base_dir), [PrivateNode.load(d) for d in raw["node_dirs"]])

    def __enter__(self) -> PrivateCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what clients need -------------------------------------------------------------

    @property
    def amqp_url(self) -> str:
        """Every node's AMQP URL, comma-separated: a SAGA_AMQP_URL."""
        return ",".join(node.amqp_url for node in self.nodes)

    @property
    def management_urls(self) -> list[str]:
        return [url for node in self.nodes if (url := node.management_url)]

    def node(self, number: int) -> PrivateNode:
        """Node ``number``, counted from 1 as the command line counts them."""
        if not 1 <= number <= len(self.nodes):
            raise NodeError(f"no node {number}: the cluster has nodes 1 to {len(self.nodes)}")
        return self.nodes[number - 1]

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start every node (at once), join the others to the first, wait until all run.

        On failure every node is killed and the directory removed.
        """
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                for started in [pool.submit(n.start, timeout) for n in self.nodes]:
                    started.result()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.stop_app(timeout=timeout)
                node.ctl("join_cluster", first.name, timeout=timeout)
                node.start_app(timeout=timeout)
            self.wait_running(len(self.nodes), timeout)
        except BaseException:
            self.stop()
            raise

    def stop_node(self, number: int, timeout: float = 60.0) -> None:
        """Stop node ``number``'s whole Erlang node, keeping its data (``start_node`` again)."""
        self.node(number).halt(timeout=timeout)

    def start_node(self, number: int, timeout: float = 120.0) -> None:
        """Start node ``number`` again on its ports and data: it rejoins the cluster."""
        node = self.node(number)
        if node.is_up():
            return
        node.start(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Kill every node (all at once) and remove the cluster's directory."""

        def stop(node: PrivateNode) -> None:
            with contextlib.suppress(NodeError, OSError):
                node.stop(timeout=timeout)

        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(stop, self.nodes))
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # --- looking at it -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Each node (up or not) and, from a node that answers, ``cluster_status``."""
        nodes = [
            NodeStatus(i, n.name, n.amqp_url, n.management_url, n.is_up())
            for i, n in enumerate(self.nodes, 1)
        ]
        cluster: dict[str, Any] | None = None
        for status, node in zip(nodes, self.nodes, strict=True):
            if status.up:
                with contextlib.suppress(NodeError, ValueError):
                    cluster = json.loads(node.ctl("cluster_status", "--formatter", "json"))
                    break
        return {"nodes": [vars(s) for s in nodes], "cluster_status": cluster}

    def running_nodes(self) -> list[str]:
        """The names of the nodes the cluster says are running (empty if none answers)."""
        cluster = self.status()["cluster_status"] or {}
        return sorted(cluster.get("running_nodes", []))

    def wait_running(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` nodes of the cluster run, by its own account."""
        deadline = time.monotonic() + timeout
        while len(self.running_nodes()) < count:
            if time.monotonic() > deadline:
                raise NodeError(f"{count} nodes not running after {timeout}s: {self.status()}")
            time.sleep(0.5)

    def _save(self) -> None:
        state = {"node_dirs": [str(node.base_dir) for node in self.nodes]}
        (self.base_dir / CLUSTER_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _fresh_node(
    others: list[PrivateNode], management: bool, name: str, base: Path, cookie: str
) -> PrivateNode:
    """A node whose ports are the shared node's and no other node's (free ports can repeat)."""
    taken = set(SHARED_PORTS)
    for other in others:
        taken |= _ports(other)
    for _ in range(20):
        node = PrivateNode.create(management=management, name=name, parent_dir=base, cookie=cookie)
        if not _ports(node) & taken and not name.startswith(SHARED_NODE):
            return node
        shutil.rmtree(node.base_dir, ignore_errors=True)
    raise NodeError(f"found no free ports for {name} apart from the other nodes'")


def _ports(node: PrivateNode) -> set[int]:
    state = node.state
    ports = {state.amqp_port, state.dist_port}
    if state.management_port is not None:
        ports.add(state.management_port)
    return ports

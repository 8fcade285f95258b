"""A local RabbitMQ cluster of private nodes beside the machine's shared one.

    python scripts/cluster.py start [--nodes 3] [--management]   # prints SAGA_AMQP_URL
    python scripts/cluster.py status        # which nodes are up; the cluster's own account
    python scripts/cluster.py stop-node 1   # node 1's Erlang node down (data kept), for chaos
    python scripts/cluster.py start-node 1  # back, and in the cluster again
    python scripts/cluster.py ctl 2 list_queues name type leader   # rabbitmqctl on node 2
    python scripts/cluster.py stop          # kill every node, remove their directories

The cluster is named by --cluster-dir, else $SAGA_CLUSTER_DIR, else the last one `start` made
(remembered in $TMPDIR/saga-cluster.last). Run the services on it with quorum queues:

    export SAGA_AMQP_URL=<the amqp_url start printed> SAGA_QUEUE_TYPE=quorum

Never touches the shared node (rabbit@localhost, 5672): see scripts/harness/rabbit_cluster.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.harness.rabbit_cluster import PrivateCluster
from scripts.harness.rabbit_node import NodeError, Remembered

LAST = Remembered(
    "SAGA_CLUSTER_DIR",
    Path(tempfile.gettempdir()) / "saga-cluster.last",
    "cluster",
    "--cluster-dir",
)


def describe(cluster: PrivateCluster) -> dict[str, object]:
    return {
        "cluster_dir": str(cluster.base_dir),
        "amqp_url": cluster.amqp_url,
        "management_urls": cluster.management_urls,
        "nodes": [node.name for node in cluster.nodes],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cluster-dir", help="the cluster's directory, as `start` printed it")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the nodes, cluster them, print the URLs")
    start.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    start.add_argument("--management", action="store_true", help="management plugin on each")
    start.add_argument("--timeout", type=float, default=120.0)
    sub.add_parser("status", help="which nodes are up, and cluster_status")
    for name, what in (("stop-node", "stop node N (data kept)"), ("start-node", "start node N")):
        one = sub.add_parser(name, help=what)
        one.add_argument("number", type=int, help="the node, from 1")
    sub.add_parser("stop", help="kill every node and remove their directories")
    ctl = sub.add_parser("ctl", help="rabbitmqctl -n NODE ARGS on node N, with the cookie")
    ctl.add_argument("number", type=int, help="the node, from 1")
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            cluster = PrivateCluster.create(size=args.nodes, management=args.management)
            cluster.start(timeout=args.timeout)
            LAST.remember(cluster.base_dir)
            print(json.dumps(describe(cluster), indent=2))
            return 0
        cluster = PrivateCluster.load(LAST.find(args.cluster_dir))
        if args.command == "status":
            status = cluster.status()
            print(json.dumps({**describe(cluster), **status}, indent=2))
            return 0 if all(node["up"] for node in status["nodes"]) else 1
        if args.command == "stop-node":
            cluster.stop_node(args.number)
            print(f"stopped node {args.number} ({cluster.node(args.number).name})")
        elif args.command == "start-node":
            cluster.start_node(args.number)
            print(f"started node {args.number} ({cluster.node(args.number).name})")
        elif args.command == "stop":
            cluster.stop()
            LAST.forget(cluster.base_dir)
            print(f"stopped {len(cluster.nodes)} nodes, removed {cluster.base_dir}")
        elif args.command == "ctl":
            sys.stdout.write(cluster.node(args.number).ctl(*args.ctl_args))
        return 0
    except NodeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

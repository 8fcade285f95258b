"""A private RabbitMQ node beside the machine's shared one, for restarts by hand or in a soak.

    python scripts/broker_node.py start [--management]   # prints the AMQP URL, node dir, start time
    python scripts/broker_node.py status                  # up? consumers per queue
    python scripts/broker_node.py restart --down 2        # stop_app, 2 s, start_app
    python scripts/broker_node.py restart --full --down 45   # the whole node down for 45 s
    python scripts/broker_node.py ctl list_connections name  # any rabbitmqctl command, -n NODE
    python scripts/broker_node.py stop                    # kill the node, remove its directory

The node is named by --node-dir, else $SAGA_BROKER_NODE_DIR, else the last one `start` made
(remembered in $TMPDIR/saga-broker-node.last). For the chaos soak:
    --broker-restart-cmd "python scripts/broker_node.py restart --down 2"

Never touches the shared node (rabbit@localhost, 5672): see scripts/harness/rabbit_node.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.harness.rabbit_node import NodeError, PrivateNode, Remembered

LAST = Remembered(
    "SAGA_BROKER_NODE_DIR",
    Path(tempfile.gettempdir()) / "saga-broker-node.last",
    "node",
    "--node-dir",
)


def describe(node: PrivateNode) -> dict[str, object]:
    return {
        "name": node.name,
        "node_dir": str(node.base_dir),
        "amqp_url": node.amqp_url,
        "management_url": node.management_url,
        "up": node.is_up(),
        "startup_s": None if node.startup_s is None else round(node.startup_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--node-dir", help="the node's directory, as `start` printed it")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a new private node and wait for AMQP")
    start.add_argument("--management", action="store_true", help="enable the management plugin")
    start.add_argument("--name", help="Erlang node name (default saga-test-<random>@localhost)")
    start.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("status", help="is it up, and the consumers of each queue")
    restart = sub.add_parser("restart", help="stop_app, wait, start_app, wait for AMQP")
    restart.add_argument("--down", type=float, default=1.0, help="seconds down (default 1)")
    restart.add_argument("--full", action="store_true", help="stop the whole Erlang node")
    restart.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("stop_app", help="rabbitmqctl stop_app")
    sub.add_parser("start_app", help="rabbitmqctl start_app, wait for AMQP")
    sub.add_parser("stop", help="kill the node and remove its directory")
    ctl = sub.add_parser("ctl", help="rabbitmqctl -n NODE ARGS with the node's cookie")
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            node = PrivateNode.create(management=args.management, name=args.name)
            node.start(timeout=args.timeout)
            LAST.remember(node.base_dir)
            print(json.dumps(describe(node), indent=2))
            return 0
        node = PrivateNode.load(LAST.find(args.node_dir))
        if args.command == "status":
            info = describe(node)
            if info["up"]:
                info["consumers"] = node.consumers()
            print(json.dumps(info, indent=2))
            return 0 if info["up"] else 1
        if args.command == "restart":
            node.restart(args.down, timeout=args.timeout, full=args.full)
            print(json.dumps(describe(node), indent=2))
        elif args.command == "stop_app":
            node.stop_app()
        elif args.command == "start_app":
            node.start_app()
            print(json.dumps(describe(node), indent=2))
        elif args.command == "stop":
            node.stop()
            LAST.forget(node.base_dir)
            print(f"stopped {node.name}, removed {node.base_dir}")
        elif args.command == "ctl":
            sys.stdout.write(node.ctl(*args.ctl_args))
        return 0
    except NodeError as exc:
        print(f"broker_node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A chaos soak: run the whole stack, break it on purpose while orders flow, then audit it.

Starts the orchestrator and the three participants as separate processes, on a vhost of
their own (made through the management API, deleted at the end) and a data directory of
their own, and places --sagas orders, --concurrency at a time: a mix that completes, is
declined (over the credit limit), runs out of stock, or is refused by the order service
(so the charge is refunded and the stock released). While they run it SIGKILLs the
orchestrator and each participant at random moments and restarts them, restarts the broker
once with --broker-restart-cmd (or, safe on a shared broker, closes every connection of its
vhost with --drop-connections), and has the participants drop, delay and duplicate replies
and crash after committing (SAGA_FAULT_*). When every saga has ended it checks stock,
money, orders and queues, prints one row per check, and ends with `violations: N`; the exit
code is 0 only when N is 0 (1 with violations, 2 when the soak could not run).

--scale runs it at scale: two orchestrators and two of each participant on a fresh
PostgreSQL database, on a private 3-node RabbitMQ cluster it starts (and removes) with quorum
queues, one node of which it stops and starts again mid-run (scripts/harness/scale.py).

    python scripts/chaos.py
    python scripts/chaos.py --sagas 200 --concurrency 16 --orchestrator-kills 1
    python scripts/broker_node.py start --management     # a private node: never the shared one
    python scripts/chaos.py --url amqp://guest:guest@127.0.0.1:PORT/ \
        --management-url http://127.0.0.1:MGMT_PORT \
        --broker-restart-cmd "python scripts/broker_node.py restart --down 2"
    python scripts/chaos.py --scale --sagas 1000 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

# `python scripts/chaos.py` puts scripts/ on the path, not the checkout that holds the harness.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from messages.errors import ConfigurationError
from messages.plumbing.settings import redact
from scripts.harness.chaos_options import (
    FAULT_FLAGS,
    PARTICIPANTS,
    SCARCE_SKU,
    ChaosError,
    Options,
    say,
)
from scripts.harness.chaos_report import format_report
from scripts.harness.rabbit_node import NodeError
from scripts.harness.scale import (
    Infrastructure,
    ScaleError,
    add_arguments,
    infrastructure,
    scale_from,
)
from scripts.harness.soak import cleanup, prepare_data_dir, soak
from scripts.harness.vhost import new_vhost_name

MANAGEMENT_HINT = "give --management-url, or enable it: rabbitmq-plugins enable rabbitmq_management"


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _participants(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(PARTICIPANTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown participant(s) {', '.join(unknown)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("SAGA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument(
        "--url", default=default_url, help="RabbitMQ URL (default: SAGA_AMQP_URL, else %(default)s)"
    )
    parser.add_argument("--management-url", help="management API (default http://HOST:15672)")
    parser.add_argument("--sagas", type=int, default=2000, help="orders to place (%(default)s)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="orders in flight (%(default)s)"
    )
    parser.add_argument(
        "--orchestrator-kills",
        type=_count,
        default=3,
        help="SIGKILLs of the orchestrator (%(default)s)",
    )
    parser.add_argument(
        "--participant-kills",
        type=_count,
        default=1,
        help="SIGKILLs of each participant (%(default)s)",
    )
    parser.add_argument(
        "--kill-participants",
        type=_participants,
        default=PARTICIPANTS,
        metavar="NAME,...",
        help="the participants to kill (default: all three)",
    )
    parser.add_argument(
        "--broker-restart-cmd",
        help="shell command that restarts the broker once mid-run, e.g. "
        "'rabbitmqctl stop_app && rabbitmqctl start_app' (skipped when not given); it runs "
        "with CHAOS_VHOST set to the soak's vhost",
    )
    parser.add_argument(
        "--drop-connections",
        type=_count,
        default=0,
        help="times to close every connection of the soak's vhost through the management "
        "API: what clients see of a broker restart, safe on a shared broker (%(default)s)",
    )
    for name, (setting, rate) in FAULT_FLAGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_rate,
            default=rate,
            metavar="RATE",
            help=f"chance per command ({setting}; %(default)s)",
        )
    parser.add_argument(
        "--fault-delay-s",
        type=float,
        default=3.0,
        help="how late a delayed reply is, past the 1 s step timeout (%(default)s)",
    )
    parser.add_argument("--no-faults", action="store_true", help="inject no participant faults")
    parser.add_argument(
        "--scarce-stock",
        type=_count,
        help=f"initial stock of {SCARCE_SKU} (default: sagas / 40, at least 5)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds for every saga to end (%(default)s)",
    )
    parser.add_argument(
        "--settle-s", type=float, help="quiet time before the audit (default: fault delay + 1)"
    )
    parser.add_argument("--data-dir", type=Path, help="where SQLite files and logs go (new)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the vhost, data directory and database"
    )
    parser.add_argument("--seed", type=int, help="random seed, to replay a run's choices")
    parser.add_argument("--json", dest="json_path", type=Path, help="also write the report here")
    add_arguments(parser)
    return parser


def parse_options(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sagas < 1 or args.concurrency < 1:
        parser.error("--sagas and --concurrency must be at least 1")
    if args.drain_timeout <= 0 or args.fault_delay_s < 0:
        parser.error("--drain-timeout must be positive and --fault-delay-s not negative")
    faults = {} if args.no_faults else {name: getattr(args, name) for name in FAULT_FLAGS}
    host = urlsplit(args.url).hostname or "localhost"
    return Options(
        url=args.url,
        management_url=(args.management_url or f"http://{host}:15672").rstrip("/"),
        sagas=args.sagas,
        concurrency=args.concurrency,
        orchestrator_kills=args.orchestrator_kills,
        participant_kills=args.participant_kills,
        kill_participants=args.kill_participants,
        broker_restart_cmd=args.broker_restart_cmd,
        drop_connections=args.drop_connections,
        faults={k: v for k, v in faults.items() if v > 0},
        fault_delay_s=args.fault_delay_s,
        scarce_stock=(
            args.scarce_stock if args.scarce_stock is not None else max(5, args.sagas // 40)
        ),
        drain_timeout=args.drain_timeout,
        settle_s=args.settle_s if args.settle_s is not None else args.fault_delay_s + 1,
        data_dir=args.data_dir,
        keep=args.keep,
        seed=args.seed if args.seed is not None else random.randrange(2**32),
        json_path=args.json_path,
        scale=scale_from(args, parser),
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one soak; 0 without violations, 1 with, 2 when it could not run, 130 interrupted."""
    opts = parse_options(argv)
    signal.signal(signal.SIGTERM, _terminate)
    interrupted = False
    report: dict[str, Any] | None = None
    try:
        # The cluster and the database, when asked for, go at the end whatever happens.
        with infrastructure(opts.scale, opts.url, opts.management_url, opts.keep) as infra:
            report = _run(opts, infra)
    except ConfigurationError as exc:
        print(f"error: {exc}; {MANAGEMENT_HINT}", file=sys.stderr)
    except (ChaosError, NodeError, ScaleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: stopping the stack", file=sys.stderr)
        interrupted = True
    if report is None:
        return 130 if interrupted else 2
    if opts.json_path:
        opts.json_path.write_text(json.dumps(report, indent=2, default=str))
    for line in format_report(report):
        print(line)
    return 0 if report["violations"] == 0 else 1


def _spotless(report: dict[str, Any]) -> bool:
    """No violation, and nothing in the logs worth keeping them for."""
    return not (report["violations"] or report["unexpected_exits"] or report["log_tracebacks"])


def _run(opts: Options, infra: Infrastructure) -> dict[str, Any] | None:
    """The soak on a vhost of its own and a data directory; both removed after it."""
    mgmt = infra.management
    vhost = new_vhost_name("saga-chaos")
    data_dir: Path | None = None
    created = interrupted = False
    report: dict[str, Any] | None = None
    try:
        data_dir = prepare_data_dir(opts)
        mgmt.create_vhost(vhost)
        created = True
        say(f"vhost {vhost} on {redact(infra.amqp_url)}; data and logs in {data_dir}")
        if not opts.broker_restart_cmd and not opts.scale.node_stops:
            say("broker restart: skipped (give --broker-restart-cmd to restart the broker mid-run)")
        report = soak(opts, infra, vhost, data_dir)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        clean = interrupted or (report is not None and _spotless(report))
        cleanup(opts, mgmt, vhost if created else None, data_dir, clean)
    return report


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(0)

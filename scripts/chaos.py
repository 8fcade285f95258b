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

    python scripts/chaos.py
    python scripts/chaos.py --sagas 200 --concurrency 16 --orchestrator-kills 1
    python scripts/broker_node.py start --management     # a private node: never the shared one
    python scripts/chaos.py --url amqp://guest:guest@127.0.0.1:PORT/ \
        --management-url http://127.0.0.1:MGMT_PORT \
        --broker-restart-cmd "python scripts/broker_node.py restart --down 2"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import UUID

import pika
import pika.exceptions

from messages.contract import topology
from messages.contract.models import Money, PlaceOrder, SagaFinished
from messages.errors import ConfigurationError, SagaError
from messages.plumbing.client import Client
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import redact
from workers.faults import CRASH_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
PARTICIPANTS: tuple[str, ...] = tuple(topology.PARTICIPANTS)
SERVICES = ("orchestrator", *PARTICIPANTS)
BROKER = "broker"
CONNECTIONS = "connections"
TERMINAL = frozenset({"COMPLETED", "COMPENSATED", "FAILED"})

# The services' time-outs, short so that a soak drains in seconds. The pivot and the
# compensations are resent until answered, so they outlast any participant restart.
SERVICE_SETTINGS = {
    "SAGA_STEP_TIMEOUT_S": "1",
    "SAGA_STEP_MAX_ATTEMPTS": "3",
    "SAGA_TICK_S": "0.1",
    "SAGA_MAX_RETRY_WAIT_S": "5",
    "SAGA_CONNECT_RETRY_S": "0.5",
    "SAGA_DEFAULT_CREDIT_LIMIT": "1000.00",
    "SAGA_LOG_LEVEL": "INFO",
    "SAGA_LOG_FORMAT": "text",  # the fault counter reads the text format
    "SAGA_METRICS_PORT": "0",  # four processes cannot share one port
}

# The order mix. Customers c-1 and c-2 have limits of their own; the others the default.
CUSTOMERS = ("c-1", "c-2", "c-3", "c-4")
LIMITS = {"c-1": Decimal("100.00"), "c-2": Decimal("250.00")}
DEFAULT_LIMIT = Decimal(SERVICE_SETTINGS["SAGA_DEFAULT_CREDIT_LIMIT"])
BLOCKED_CUSTOMER = "c-blocked"
PLENTY_SKUS = ("item-1", "item-2", "item-3")
PLENTY_STOCK = 1_000_000
SCARCE_SKU = "scarce-1"
KINDS = {"complete": 0.60, "declined": 0.15, "scarce": 0.15, "blocked": 0.10}
KIND_HELP = {
    "complete": "to complete",
    "declined": "over the credit limit",
    "scarce": f"for {SCARCE_SKU} (runs out)",
    "blocked": "from a blocked customer",
}

FAULT_FLAGS = {  # option -> (setting, default rate)
    "drop_reply": ("SAGA_FAULT_DROP_REPLY", 0.02),
    "delay_reply": ("SAGA_FAULT_DELAY_REPLY", 0.02),
    "duplicate_reply": ("SAGA_FAULT_DUPLICATE_REPLY", 0.02),
    "crash_after_commit": ("SAGA_FAULT_CRASH_AFTER_COMMIT", 0.005),
}
FAULT_LINE = re.compile(rb"FAULT (\w+) injected")

READY_TIMEOUT_S = 90.0
STATS_LAG_S = 6.0  # the management API's queue statistics are refreshed every 5 s
RECONCILE_AFTER_S = 10.0  # a saga in flight this long is looked up in the store too
STALL_NOTICE_S = 30.0  # no saga finished for this long: say what may be wrong
MAX_LISTED = 10  # problems shown per check; the JSON report has them all

CLIENT_ERRORS = (SagaError, pika.exceptions.AMQPError, OSError)


class ChaosError(Exception):
    """The soak cannot go on; the message says why. Printed without a traceback."""


def say(text: str) -> None:
    """A progress line, flushed at once so a watcher sees it as it happens."""
    print(text, flush=True)


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    url: str
    management_url: str
    sagas: int
    concurrency: int
    orchestrator_kills: int
    participant_kills: int
    kill_participants: tuple[str, ...]
    broker_restart_cmd: str | None
    drop_connections: int
    faults: dict[str, float]
    fault_delay_s: float
    scarce_stock: int
    drain_timeout: float
    settle_s: float
    data_dir: Path | None
    keep: bool
    seed: int
    json_path: Path | None


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
    parser.add_argument("--keep", action="store_true", help="keep the vhost and data directory")
    parser.add_argument("--seed", type=int, help="random seed, to replay a run's choices")
    parser.add_argument("--json", dest="json_path", type=Path, help="also write the report here")
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
    )


# --- the broker: a vhost of our own, queue depths -----------------------------------------


class Management:
    """The RabbitMQ management HTTP API, with the AMQP URL's credentials."""

    def __init__(self, api: ManagementApi) -> None:
        self.api = api
        self.user = api.user

    @classmethod
    def for_url(cls, amqp_url: str, base: str) -> Management:
        return cls(ManagementApi.for_amqp_url(amqp_url, base))

    def call(self, method: str, path: str, body: object = None) -> Any:
        try:
            return self.api.call(method, path, body)
        except ConfigurationError as exc:
            raise ChaosError(
                f"{exc}; give --management-url, or enable it: "
                "rabbitmq-plugins enable rabbitmq_management"
            ) from exc

    def create_vhost(self, name: str) -> None:
        self.call("PUT", f"vhosts/{quote(name, safe='')}", {})
        self.call(
            "PUT",
            f"permissions/{quote(name, safe='')}/{quote(self.user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, name: str) -> None:
        self.call("DELETE", f"vhosts/{quote(name, safe='')}")

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        rows = self.call("GET", f"queues/{quote(vhost, safe='')}")
        return {row["name"]: row for row in rows or []}


def vhost_url(url: str, vhost: str) -> str:
    """``url`` pointing at ``vhost`` (query parameters such as heartbeat kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))


class Probe:
    """Exact ready-message counts by passive queue.declare (the API's numbers lag)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Any = None

    def depths(self, queues: Iterable[str]) -> dict[str, int] | None:
        """Messages ready in each queue, or None while the broker cannot be asked."""
        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = self._connection.channel()
            depths = {
                q: int(channel.queue_declare(q, passive=True).method.message_count) for q in queues
            }
            channel.close()
            return depths
        except (pika.exceptions.AMQPError, OSError):
            self.close()
            return None

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                if self._connection.is_open:
                    self._connection.close()
        self._connection = None


# --- the stack: four processes, restarted whenever they exit --------------------------------


@dataclass
class Service:
    """One service process, its log, and what happened to it."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    crashes: int = 0
    unexpected: list[int] = field(default_factory=list)
    _log_offset: int = 0
    _ready: bool = False
    _kill_requested: bool = False
    _restart_at: float | None = None

    def spawn(self) -> None:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.argv],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C is ours to handle, not theirs
            )
        self.starts += 1
        self._ready = self._kill_requested = False
        self._restart_at = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """The current process has logged that it consumes its queue(s)."""
        if not self._ready and self.running():
            with self.log.open("rb") as log:
                log.seek(self._log_offset)
                self._ready = f"{self.name} ready: consuming".encode() in log.read()
        return self._ready and self.running()

    def kill(self) -> None:
        assert self.process is not None
        self._kill_requested = True
        self.kills += 1
        self.process.send_signal(signal.SIGKILL)

    def reap(self, now: float) -> str | None:
        """If the process has exited, note why and when to restart it; say so if unexpected."""
        if self.process is None or self._restart_at is not None:
            return None
        code = self.process.poll()
        if code is None:
            return None
        if self._kill_requested and code == -signal.SIGKILL:
            self._restart_at = now
            return None
        if code == CRASH_EXIT_CODE:
            self.crashes += 1
            self._restart_at = now
            return None
        self.unexpected.append(code)
        self._restart_at = now + 1.0  # no tight loop if it cannot start at all
        return f"{self.name} exited unexpectedly with code {code} (see {self.log})"

    def due(self, now: float) -> bool:
        return self._restart_at is not None and now >= self._restart_at

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.terminate()

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts the services, restarts any that exits, and kills them when told to."""

    def __init__(self, services: list[Service], started: float) -> None:
        self.services = {s.name: s for s in services}
        self.started = started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        """Start every service and wait until each consumes; then supervise them."""
        for service in self.services.values():
            service.spawn()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for service in self.services.values():
            while not service.ready():
                if not service.running():
                    raise ChaosError(f"{service.name} exited at start:\n{service.tail()}")
                if time.monotonic() > deadline:
                    raise ChaosError(f"{service.name} was not ready in time:\n{service.tail()}")
                time.sleep(0.05)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                for service in self.services.values():
                    if notice := service.reap(now):
                        say(f"[{now - self.started:7.1f}s] {notice}")
                    if service.due(now):
                        service.spawn()

    def kill(self, name: str) -> bool:
        """SIGKILL ``name`` if it is up and consuming; False when it is not (yet)."""
        with self._lock:
            service = self.services[name]
            if not service.ready():
                return False
            service.kill()
            return True

    def all_ready(self) -> bool:
        with self._lock:
            return all(s.ready() for s in self.services.values())

    def stop(self) -> None:
        """Stop supervising, then stop every process (SIGTERM, SIGKILL after 10 s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for service in self.services.values():
            service.stop()
        for service in self.services.values():
            service.wait_stopped()


def service_env(url: str, data_dir: Path, faults: dict[str, str]) -> dict[str, str]:
    """The environment of a service: ours, minus anything SAGA_* that would skew the soak."""
    dropped = ("SAGA_FAULT_", "SAGA_AMQP_URL", "SAGA_DATA_DIR", "SAGA_METRICS_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(SERVICE_SETTINGS)
    env.update(faults)
    env.update(SAGA_AMQP_URL=url, SAGA_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    return env


def fault_env(opts: Options) -> dict[str, str]:
    env = {FAULT_FLAGS[name][0]: str(rate) for name, rate in opts.faults.items()}
    if opts.faults:
        env["SAGA_FAULT_DELAY_S"] = str(opts.fault_delay_s)
    return env


def seeded_stock(opts: Options) -> dict[str, int]:
    return {**dict.fromkeys(PLENTY_SKUS, PLENTY_STOCK), SCARCE_SKU: opts.scarce_stock}


def build_services(opts: Options, url: str, data_dir: Path) -> list[Service]:
    stock = ",".join(f"{sku}={n}" for sku, n in seeded_stock(opts).items())
    limits = ",".join(f"{c}={limit}" for c, limit in LIMITS.items())
    options = {
        "inventory": ("--stock", stock),
        "payment": ("--limit", limits),
        "order": ("--block", BLOCKED_CUSTOMER),
    }
    plain = service_env(url, data_dir, {})
    faulty = service_env(url, data_dir, fault_env(opts))
    services = [
        Service("orchestrator", ("orchestrator", "run"), plain, data_dir / "orchestrator.log")
    ]
    services += [
        Service(p, ("workers", "run", p, *options[p]), faulty, data_dir / f"{p}.log")
        for p in PARTICIPANTS
    ]
    return services


# --- chaos: kills and a broker restart at random points of the load -----------------------


@dataclass
class Progress:
    """How far the load is; the chaos thread reads it."""

    placed: int = 0
    finished: int = 0


@dataclass(frozen=True)
class Action:
    """Kill ``target`` (or restart the broker) once ``at`` sagas have finished."""

    at: int
    target: str


@dataclass
class BrokerRestart:
    command: str | None
    vhost: str = ""  # given to the command as CHAOS_VHOST
    exit_code: int | None = None
    seconds: float | None = None
    output: str = ""


def plan_chaos(opts: Options, rng: random.Random) -> list[Action]:
    """Kills at random points between 10% and 85% of the sagas; the broker restart mid-run."""
    low, high = opts.sagas // 10, max(opts.sagas // 10, opts.sagas * 85 // 100)
    actions = [
        Action(rng.randint(low, high), "orchestrator") for _ in range(opts.orchestrator_kills)
    ]
    actions += [
        Action(rng.randint(low, high), name)
        for name in opts.kill_participants
        for _ in range(opts.participant_kills)
    ]
    actions += [Action(rng.randint(low, high), CONNECTIONS) for _ in range(opts.drop_connections)]
    if opts.broker_restart_cmd:
        actions.append(Action(rng.randint(opts.sagas * 2 // 5, opts.sagas * 3 // 5), BROKER))
    return sorted(actions, key=lambda a: a.at)


class Chaos:
    """Carries out the plan in a thread of its own, as the load reaches each point."""

    def __init__(
        self,
        actions: list[Action],
        supervisor: Supervisor,
        progress: Progress,
        broker: BrokerRestart,
        management: Management,
    ) -> None:
        self.actions = actions
        self.management = management
        self.supervisor = supervisor
        self.progress = progress
        self.broker = broker
        self.done: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def count(self, target: str) -> int:
        return sum(1 for d in self.done if d["target"] == target)

    def planned(self, target: str) -> int:
        return sum(1 for a in self.actions if a.target == target)

    def _run(self) -> None:
        for action in self.actions:
            while self.progress.finished < action.at:
                if self._stop.wait(0.05):
                    return
            if action.target == BROKER:
                self._restart_broker()
                continue
            if action.target == CONNECTIONS:
                self._drop_connections()
                continue
            while not self.supervisor.kill(action.target):
                if self._stop.wait(0.05):
                    return
            self._note(action.target, f"SIGKILL {action.target}")

    def _note(self, target: str, what: str) -> None:
        elapsed = time.monotonic() - self.supervisor.started
        self.done.append(
            {"target": target, "at_s": round(elapsed, 1), "finished": self.progress.finished}
        )
        say(f"[{elapsed:7.1f}s] {what} ({self.progress.finished} sagas finished)")

    def _drop_connections(self) -> None:
        """Close every connection of our vhost: each client must reconnect and resume."""
        vhost = quote(self.broker.vhost, safe="")
        try:
            names = [c["name"] for c in self.management.call("GET", f"vhosts/{vhost}/connections")]
            for name in names:
                with contextlib.suppress(ChaosError):  # it may have closed on its own
                    self.management.call("DELETE", f"connections/{quote(name, safe='')}")
        except ChaosError as exc:
            say(f"could not drop connections: {exc}")
            return
        self._note(CONNECTIONS, f"closed {len(names)} connections of the vhost")

    def _restart_broker(self) -> None:
        assert self.broker.command is not None
        self._note(BROKER, f"restarting the broker: {self.broker.command}")
        began = time.monotonic()
        try:
            done = subprocess.run(
                self.broker.command,
                shell=True,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
                env={**os.environ, "CHAOS_VHOST": self.broker.vhost},
            )
            self.broker.exit_code = done.returncode
            self.broker.output = (done.stdout + done.stderr).strip()[-500:] or "no output"
        except subprocess.TimeoutExpired:
            self.broker.exit_code = -1
            self.broker.output = "timed out after 300 s"
        self.broker.seconds = round(time.monotonic() - began, 1)
        state = "done" if self.broker.exit_code == 0 else f"FAILED ({self.broker.output})"
        say(f"[{time.monotonic() - self.supervisor.started:7.1f}s] broker restart {state}")


# --- the load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    kind: str
    request: PlaceOrder


def cents(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low, high)) / 100


def make_order(rng: random.Random) -> Order:
    """One order of a kind drawn from KINDS."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    customer, sku, quantity = rng.choice(CUSTOMERS), rng.choice(PLENTY_SKUS), rng.randint(1, 3)
    amount = cents(rng, 100, 9_999)  # under every limit
    if kind == "declined":
        amount = LIMITS.get(customer, DEFAULT_LIMIT) + cents(rng, 1, 50_000)
    elif kind == "scarce":
        sku, quantity = SCARCE_SKU, rng.randint(1, 2)
    elif kind == "blocked":
        customer = BLOCKED_CUSTOMER
    request = PlaceOrder(
        saga_id=uuid.UUID(int=rng.getrandbits(128), version=4),
        customer_id=customer,
        sku=sku,
        quantity=quantity,
        amount=Money(amount=amount),
    )
    return Order(kind, request)


class Requester:
    """A Client that survives the broker going away: reconnect, and say so once."""

    def __init__(self, url: str, started: float) -> None:
        self.url = url
        self.started = started
        self.client: Client | None = None
        self.reconnects = 0
        self._down_since: float | None = None

    def connect(self) -> Client | None:
        """The client, connecting if needed; None (after a short wait) while it cannot."""
        if self.client is not None:
            return self.client
        try:
            self.client = Client(self.url, watch_events=True)
        except CLIENT_ERRORS as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._say(f"cannot reach the broker ({exc}); retrying")
            time.sleep(0.5)
            return None
        if self._down_since is not None:
            self.reconnects += 1
            self._say(f"reconnected after {time.monotonic() - self._down_since:.1f}s")
            self._down_since = None
        return self.client

    def lost(self, exc: BaseException) -> None:
        self._say(f"lost the broker connection ({exc!r})")
        self._down_since = time.monotonic()
        self.close()

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(*CLIENT_ERRORS):
                self.client.close()
        self.client = None

    def _say(self, text: str) -> None:
        say(f"[{time.monotonic() - self.started:7.1f}s] load: {text}")


@dataclass
class LoadStats:
    placed: int = 0
    by_event: int = 0
    by_store: int = 0
    reconnects: int = 0
    first_placed: float = 0.0
    last_placed: float = 0.0
    all_finished: float | None = None
    stalled: bool = False


class Load:
    """Closed loop: keep ``concurrency`` orders in flight until every one has a result.

    Results come from saga.events; a saga in flight for a while is also looked up in the
    store, since a result published while we were reconnecting is gone with our old queue.
    Requests are durable and the orchestrator drops repeats, so a request whose publish
    failed is simply published again.
    """

    def __init__(
        self,
        opts: Options,
        url: str,
        store: Path,
        orders: list[Order],
        progress: Progress,
        started: float,
    ) -> None:
        self.opts = opts
        self.store = store
        self.progress = progress
        self.started = started
        self.requester = Requester(url, started)
        self.ids = {o.request.saga_id for o in orders}
        self.unsent: deque[Order] = deque(orders)
        self.in_flight: dict[UUID, float] = {}
        self.results: dict[UUID, str] = {}
        self.stats = LoadStats()
        self._last_result = started
        self._reconcile_all = False
        self._next_reconcile = 0.0
        self._next_report = started + 5
        self._stall_noticed = False
        self._probe = Probe(url)

    def run(self) -> LoadStats:
        self.stats.first_placed = time.monotonic()
        try:
            while len(self.results) < len(self.ids) and not self._out_of_time():
                self._turn()
        finally:
            self.requester.close()
            self._probe.close()
        self.stats.reconnects = self.requester.reconnects
        return self.stats

    def _turn(self) -> None:
        client = self.requester.connect()
        if client is not None:
            try:
                self._top_up(client)
                self._receive(client)
            except CLIENT_ERRORS as exc:
                self.requester.lost(exc)
                self._reconcile_all = True
        now = time.monotonic()
        if now >= self._next_reconcile:
            self._reconcile(now)
            self._next_reconcile = now + 1.0
        if now >= self._next_report:
            self._report(now)
            self._next_report = now + 5
        if now - self._last_result > STALL_NOTICE_S and not self._stall_noticed:
            self._stall_noticed = True
            self._notice_stall()

    def _top_up(self, client: Client) -> None:
        while self.unsent and len(self.in_flight) < self.opts.concurrency:
            order = self.unsent[0]
            # A publish that raised may still have reached the broker: then the saga ran,
            # and sending it again is harmless (the orchestrator drops a repeated request).
            if order.request.saga_id not in self.results:
                client.request(order.request)  # raises while the broker is away
                self.in_flight[order.request.saga_id] = time.monotonic()
            self.unsent.popleft()
            self.stats.placed += 1
            self.stats.last_placed = time.monotonic()
            self.progress.placed = self.stats.placed

    def _receive(self, client: Client) -> None:
        for message in client.answers(0.2):
            if isinstance(message, SagaFinished) and self._record(
                message.saga_id, message.status.value
            ):
                self.stats.by_event += 1
                if self.unsent:
                    return  # a slot is free: place the next order

    def _record(self, saga_id: UUID, status: str) -> bool:
        if saga_id not in self.ids or saga_id in self.results or status not in TERMINAL:
            return False
        self.results[saga_id] = status
        self.in_flight.pop(saga_id, None)
        self.progress.finished = len(self.results)
        self._last_result = time.monotonic()
        self._stall_noticed = False
        if len(self.results) == len(self.ids):
            self.stats.all_finished = self._last_result
        return True

    def _reconcile(self, now: float) -> None:
        """Look up sagas in flight for a while (all of them after a reconnect) in the store."""
        stale = [
            sid
            for sid, since in self.in_flight.items()
            if self._reconcile_all or now - since > RECONCILE_AFTER_S
        ]
        if not stale:
            return
        statuses = store_statuses(self.store, [str(s) for s in stale])
        self._reconcile_all = False
        for sid in stale:
            if self._record(sid, statuses.get(str(sid), "")):
                self.stats.by_store += 1

    def _out_of_time(self) -> bool:
        now = time.monotonic()
        if now - self._last_result > self.opts.drain_timeout:
            self.stats.stalled = True
            say(f"load: no saga finished for {self.opts.drain_timeout:g}s; giving up")
            return True
        if not self.unsent and now - self.stats.last_placed > self.opts.drain_timeout:
            say(f"load: sagas still running {self.opts.drain_timeout:g}s after the last order")
            return True
        return False

    def _notice_stall(self) -> None:
        """Say once what may be holding the load up; it goes on until --drain-timeout."""
        queues = [topology.dead_letter_queue(q) for q, _, _ in topology.consumed_queues()]
        depths = self._probe.depths(queues) or {}
        dead = ", ".join(f"{q} {n}" for q, n in depths.items() if n) or "none"
        say(
            f"load: no saga finished for {STALL_NOTICE_S:g}s ({len(self.in_flight)} in "
            f"flight); dead-lettered: {dead}; service logs in {self.store.parent}"
        )

    def _report(self, now: float) -> None:
        say(
            f"[{now - self.started:7.1f}s] placed {self.stats.placed}/{len(self.ids)}, "
            f"finished {len(self.results)}, in flight {len(self.in_flight)}"
        )


# --- reading the services' databases (read-only) ------------------------------------------


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        db.execute("PRAGMA busy_timeout=5000")
        yield db


def store_statuses(store: Path, saga_ids: list[str]) -> dict[str, str]:
    """Status of each of ``saga_ids`` found in the orchestrator's store."""
    if not store.exists():
        return {}
    found: dict[str, str] = {}
    try:
        with read_only(store) as db:
            for i in range(0, len(saga_ids), 500):
                chunk = saga_ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    db.execute(
                        f"SELECT saga_id, status FROM sagas WHERE saga_id IN ({marks})", chunk
                    ).fetchall()
                )
    except sqlite3.Error:
        return found
    return found


@dataclass(frozen=True)
class StoreState:
    statuses: dict[str, str]
    outbox: int
    fingerprint: tuple[int, int]  # sagas and the sum of their versions: changes on any commit


def store_state(store: Path) -> StoreState | None:
    try:
        with read_only(store) as db:
            statuses = dict(db.execute("SELECT saga_id, status FROM sagas").fetchall())
            outbox = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            count, versions = db.execute("SELECT count(*), total(version) FROM sagas").fetchone()
    except sqlite3.Error:
        return None
    return StoreState(statuses, outbox, (int(count), int(versions)))


@dataclass(frozen=True)
class Saga:
    saga_id: str
    status: str
    reason: str | None
    outcome: str
    customer: str
    sku: str
    quantity: int
    amount: Decimal
    timeouts: int


@dataclass(frozen=True)
class Snapshot:
    """Everything the audit looks at, read once the stack is quiet."""

    sagas: dict[str, Saga]
    outbox: int
    stock: dict[str, int]
    reservations: dict[str, tuple[str, int, str]]  # saga -> sku, quantity, status
    charges: dict[str, tuple[str, Decimal, str, str]]  # saga -> customer, amount, currency, status
    orders: dict[str, tuple[str, str, int, Decimal]]  # saga -> customer, sku, quantity, amount


def _saga(row: tuple[str, str, str | None, str]) -> Saga:
    saga_id, status, reason, text = row
    state = json.loads(text)
    request = state["input"]
    unanswered = state.get("unanswered") or []
    outcome = "; then ".join([reason or "compensation", *unanswered]) if unanswered else reason
    return Saga(
        saga_id=saga_id,
        status=status,
        reason=reason,
        outcome=outcome or "",
        customer=request["customer_id"],
        sku=request["sku"],
        quantity=int(request["quantity"]),
        amount=Decimal(request["amount"]["amount"]),
        timeouts=sum(1 for e in state.get("history", []) if e.get("event") == "timed_out"),
    )


def read_snapshot(data_dir: Path) -> Snapshot:
    try:
        with read_only(data_dir / "orchestrator.db") as db:
            rows = db.execute("SELECT saga_id, status, reason, state FROM sagas").fetchall()
            outbox = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        with read_only(data_dir / "inventory.db") as db:
            stock = dict(db.execute("SELECT sku, quantity FROM stock").fetchall())
            reservations = {
                r[0]: (r[1], int(r[2]), r[3])
                for r in db.execute("SELECT saga_id, sku, quantity, status FROM reservations")
            }
        with read_only(data_dir / "payment.db") as db:
            charges = {
                r[0]: (r[1], Decimal(r[2]), r[3], r[4])
                for r in db.execute(
                    "SELECT saga_id, customer_id, amount, currency, status FROM charges"
                )
            }
        with read_only(data_dir / "order.db") as db:
            orders = {
                r[0]: (r[1], r[2], int(r[3]), Decimal(r[4]))
                for r in db.execute(
                    "SELECT saga_id, customer_id, sku, quantity, amount FROM orders"
                )
            }
    except sqlite3.Error as exc:
        raise ChaosError(f"cannot read the services' databases in {data_dir}: {exc}") from exc
    sagas = {row[0]: _saga(row) for row in rows}
    return Snapshot(sagas, outbox, stock, reservations, charges, orders)


# --- draining -----------------------------------------------------------------------------


@dataclass
class Drain:
    drained_at: float | None = None  # every saga ended and the outbox was empty
    quiet_since: float | None = None  # ... and nothing has changed or been queued since
    timed_out: bool = False


def _idle(state: StoreState, probe: Probe, supervisor: Supervisor) -> bool:
    """Nothing queued anywhere, and every service up to take what comes."""
    depths = probe.depths(q for q, _, _ in topology.consumed_queues())
    return (
        state.outbox == 0
        and depths is not None
        and not any(depths.values())
        and supervisor.all_ready()
    )


def drain(
    store: Path,
    saga_ids: set[str],
    supervisor: Supervisor,
    probe: Probe,
    end_by: float,
    settle_s: float,
    progress: Progress,
) -> Drain:
    """Wait until every saga ended, the outbox and main queues are empty, and all is quiet.

    Sagas must end by ``end_by``. Quiet means the store has not changed for ``settle_s``
    (longer than a delayed reply) with nothing queued and every service up, so that a
    compensation or late reply still on its way has landed before the audit.
    """
    result = Drain()
    fingerprint: tuple[int, int] | None = None
    while True:
        now = time.monotonic()
        state = store_state(store)
        ended = False
        if state is not None:
            progress.finished = sum(1 for s in saga_ids if state.statuses.get(s) in TERMINAL)
            ended = progress.finished == len(saga_ids)
        if state is not None and ended and state.outbox == 0 and result.drained_at is None:
            result.drained_at = now
        if state is not None and ended and _idle(state, probe, supervisor):
            if state.fingerprint != fingerprint or result.quiet_since is None:
                fingerprint, result.quiet_since = state.fingerprint, now
            elif now - result.quiet_since >= settle_s:
                return result
        else:
            result.quiet_since = None
        quiet_by = (result.drained_at or end_by) + settle_s + 30
        if now > (quiet_by if ended else end_by):
            result.timed_out = True
            return result
        time.sleep(0.25)


# --- the audit ----------------------------------------------------------------------------


@dataclass
class Check:
    """One row of the audit: OK when it found no problem."""

    number: int
    title: str
    summary: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_finished(snap: Snapshot, placed: set[str], drain_timeout: float, faults: bool) -> Check:
    problems: list[str] = []
    missing = sorted(placed - snap.sagas.keys())
    problems += [f"{s}: placed but not in the store" for s in missing]
    for s in sorted(placed & snap.sagas.keys()):
        saga = snap.sagas[s]
        if saga.status not in TERMINAL:
            problems.append(f"{s}: still {saga.status} ({saga.outcome or 'no reason'})")
        elif saga.status == "FAILED":
            problems.append(f"{s}: FAILED: {saga.outcome}")
    failed = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status == "FAILED")
    ended = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status in TERMINAL)
    expect = (
        "0 expected: faults hit the pivot and compensations too, but both are resent until answered"
        if faults
        else "0 expected: no faults injected"
    )
    summary = (
        f"{ended}/{len(placed)} ended within {drain_timeout:g}s of the last order; "
        f"FAILED {failed} ({expect})"
    )
    return Check(1, "every saga ended", summary, problems)


def _with_status(snap: Snapshot, status: str) -> dict[str, Saga]:
    return {s: saga for s, saga in snap.sagas.items() if saga.status == status}


def _state(snap: Snapshot, saga_id: str) -> str:
    return snap.sagas[saga_id].status if saga_id in snap.sagas else "not in the store"


def _set_aside(failed: dict[str, Saga], what: str) -> str:
    """FAILED sagas wait for an operator (check 1 lists them): what they hold is theirs."""
    return f"; {what} of {len(failed)} FAILED saga(s) set aside" if failed else ""


def check_stock(snap: Snapshot, seeded: dict[str, int]) -> Check:
    """Seeded = in stock + sold (+ held by FAILED sagas); reserved only for COMPLETED ones."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    sold: Counter[str] = Counter()
    for saga in completed.values():
        sold[saga.sku] += saga.quantity
    held: Counter[str] = Counter()
    for s in failed:
        sku, quantity, status = snap.reservations.get(s, ("", 0, ""))
        held[sku] += quantity if status == "reserved" else 0
    for sku, initial in sorted(seeded.items()):
        now = snap.stock.get(sku, 0)
        if initial != now + sold[sku] + held[sku]:
            problems.append(
                f"{sku}: seeded {initial} != {now} in stock + {sold[sku]} sold + {held[sku]} "
                f"held ({initial - now - sold[sku] - held[sku]:+d} units unaccounted for)"
            )
    for s, (sku, quantity, status) in sorted(snap.reservations.items()):
        if status == "reserved" and s not in completed and s not in failed:
            problems.append(f"{s}: {quantity} x {sku} still reserved, saga {_state(snap, s)}")
    for s, saga in sorted(completed.items()):
        reservation = snap.reservations.get(s)
        if reservation != (saga.sku, saga.quantity, "reserved"):
            problems.append(f"{s}: COMPLETED but its reservation is {reservation}")
    scarce = f"{SCARCE_SKU}: {seeded[SCARCE_SKU]} seeded, {snap.stock.get(SCARCE_SKU, 0)} left"
    summary = (
        f"seeded = in stock + sold, for {len(seeded)} SKUs ({scarce}); units reserved only "
        f"for completed sagas{_set_aside(failed, 'reservations')}"
    )
    return Check(2, "stock conserved", summary, problems)


def check_money(snap: Snapshot) -> Check:
    """Charged = sold, one matching charge per COMPLETED saga, none left for the others."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    charged = {s: c for s, c in snap.charges.items() if c[3] == "charged" and s not in failed}
    total_charged = sum((c[1] for c in charged.values()), Decimal(0))
    total_sold = sum((saga.amount for saga in completed.values()), Decimal(0))
    if total_charged != total_sold:
        problems.append(f"charged {total_charged} != {total_sold} sold")
    for s, saga in sorted(completed.items()):
        charge = charged.get(s)
        if charge is None:
            problems.append(f"{s}: COMPLETED without a charge")
        elif (charge[0], charge[1]) != (saga.customer, saga.amount):
            problems.append(f"{s}: charged {charge[:2]} for an order of {saga.amount}")
        if saga.amount > LIMITS.get(saga.customer, DEFAULT_LIMIT):
            problems.append(f"{s}: {saga.amount} charged to {saga.customer}, over the limit")
    for s, charge in sorted(charged.items()):
        if s not in completed:
            problems.append(f"{s}: {charge[1]} still charged, saga {_state(snap, s)}")
    refunded = sum(1 for c in snap.charges.values() if c[3] == "refunded" and c[1] > 0)
    summary = (
        f"charged {total_charged} EUR in {len(charged)} charges = {total_sold} EUR of "
        f"{len(completed)} completed orders; {refunded} refunded; no saga charged twice or "
        f"left charged{_set_aside(failed, 'charges')}"
    )
    return Check(3, "money adds up", summary, problems)


def check_orders(snap: Snapshot) -> Check:
    """Exactly one matching order per COMPLETED saga, none for COMPENSATED ones."""
    completed, failed = _with_status(snap, "COMPLETED"), _with_status(snap, "FAILED")
    problems: list[str] = []
    for s, saga in sorted(completed.items()):
        row = snap.orders.get(s)
        if row is None:
            problems.append(f"{s}: COMPLETED without an order")
        elif row != (saga.customer, saga.sku, saga.quantity, saga.amount):
            problems.append(f"{s}: order {row} does not match the saga")
    for s in sorted(snap.orders.keys() - completed.keys() - failed.keys()):
        problems.append(f"{s}: has an order, saga {_state(snap, s)}")
    summary = (
        f"{len(snap.orders)} orders: one for each of {len(completed)} completed sagas, none "
        f"for a compensated one{_set_aside(failed, 'orders')}"
    )
    return Check(4, "one order per completed saga", summary, problems)


def queue_problems(
    stats: dict[str, dict[str, Any]] | None, exact: dict[str, int] | None
) -> list[str]:
    """What is wrong with the queues, from the API's statistics and exact ready counts."""
    if stats is None or exact is None:
        return ["the broker cannot be asked about its queues"]
    problems = []
    for queue, _, _ in topology.consumed_queues():
        row = stats.get(queue, {})
        if "messages" not in row:
            problems.append(f"{queue}: no statistics yet")
            continue
        ready, unacked = exact[queue], int(row.get("messages_unacknowledged", 0))
        if ready or unacked or row["messages"]:
            problems.append(
                f"{queue}: {max(ready, row['messages'] - unacked)} ready, {unacked} unacked"
            )
        if not row.get("consumers"):
            problems.append(f"{queue}: no consumer")
        dlq = topology.dead_letter_queue(queue)
        if exact[dlq] or stats.get(dlq, {}).get("messages"):
            problems.append(f"{dlq}: {exact[dlq]} dead-lettered message(s)")
    return problems


def check_queues(
    mgmt: Management, vhost: str, probe: Probe, quiet_since: float, outbox: int
) -> Check:
    """Poll until the API's statistics are newer than the quiet moment and all is clean."""
    queues = [q for q, _, _ in topology.consumed_queues()]
    queues += [topology.dead_letter_queue(q) for q in queues]
    deadline = time.monotonic() + STATS_LAG_S + 30
    while True:
        try:
            stats: dict[str, dict[str, Any]] | None = mgmt.queues(vhost)
        except ChaosError:
            stats = None
        problems = queue_problems(stats, probe.depths(queues))
        if outbox:
            problems.append(f"orchestrator outbox: {outbox} message(s) never confirmed sent")
        fresh = time.monotonic() - quiet_since >= STATS_LAG_S
        if (fresh and not problems) or time.monotonic() > deadline:
            break
        time.sleep(1)
    summary = (
        f"outbox empty; {len(queues) // 2} main queues: no message ready or unacked, a "
        f"consumer each; {len(queues) // 2} dead-letter queues: empty"
    )
    return Check(5, "queues clean", summary, problems)


# --- the report ---------------------------------------------------------------------------


def count_log_lines(logs: Iterable[Path]) -> tuple[Counter[str], int, int]:
    """Faults injected by kind, ERROR lines and tracebacks, over the given logs."""
    faults: Counter[str] = Counter()
    errors = tracebacks = 0
    for path in logs:
        if not path.exists():
            continue
        with path.open("rb") as log:
            for line in log:
                if match := FAULT_LINE.search(line):
                    faults[match[1].decode()] += 1
                errors += b" ERROR " in line
                tracebacks += line.startswith(b"Traceback")
    return faults, errors, tracebacks


def outcome_text(snap: Snapshot, placed: set[str]) -> str:
    by_status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in placed:
        saga = snap.sagas.get(s)
        status = saga.status if saga else "MISSING"
        by_status[status] += 1
        if saga and status == "COMPENSATED":
            reasons[(saga.reason or "?").split(":")[0]] += 1
    parts = []
    for status in ("COMPLETED", "COMPENSATED", "FAILED", "RUNNING", "COMPENSATING", "MISSING"):
        if by_status[status] or status in TERMINAL:
            detail = ""
            if status == "COMPENSATED" and reasons:
                detail = " (" + ", ".join(f"{r} {n}" for r, n in reasons.most_common()) + ")"
            parts.append(f"{status} {by_status[status]}{detail}")
    return ", ".join(parts)


def build_report(
    opts: Options,
    vhost: str,
    data_dir: Path,
    orders: list[Order],
    snap: Snapshot,
    load: LoadStats,
    drained: Drain,
    chaos: Chaos,
    supervisor: Supervisor,
    checks: list[Check],
) -> dict[str, Any]:
    placed = {str(o.request.saga_id) for o in orders[: load.placed]}
    services = supervisor.services.values()
    faults, errors, tracebacks = count_log_lines(s.log for s in services)
    kinds = Counter(o.kind for o in orders[: load.placed])
    load_s = max((load.all_finished or load.last_placed) - load.first_placed, 0.001)
    finished = sum(1 for s in placed if s in snap.sagas and snap.sagas[s].status in TERMINAL)
    drain_s = None if drained.drained_at is None else drained.drained_at - load.last_placed
    broker = chaos.broker
    return {
        "params": {
            "sagas": opts.sagas,
            "concurrency": opts.concurrency,
            "seed": opts.seed,
            "faults": opts.faults,
            "fault_delay_s": opts.fault_delay_s,
            "vhost": vhost,
            "data_dir": str(data_dir),
            "service_settings": SERVICE_SETTINGS,
        },
        "orders": {k: kinds[k] for k in KINDS},
        "placed": load.placed,
        "finished": finished,
        "outcomes": outcome_text(snap, placed),
        "kills": {
            name: {"done": chaos.count(name), "planned": chaos.planned(name)} for name in SERVICES
        },
        "connection_drops": {
            "done": chaos.count(CONNECTIONS),
            "planned": chaos.planned(CONNECTIONS),
        },
        "kill_log": chaos.done,
        "broker_restart": asdict(broker) | {"skipped": broker.command is None},
        "restarts": {s.name: s.starts - 1 for s in services},
        "crashes": {s.name: s.crashes for s in services if s.name != "orchestrator"},
        "unexpected_exits": {s.name: s.unexpected for s in services if s.unexpected},
        "faults_injected": dict(faults),
        "log_errors": errors,
        "log_tracebacks": tracebacks,
        "step_timeouts": sum(s.timeouts for s in snap.sagas.values()),
        "results": {"by_event": load.by_event, "by_store": load.by_store},
        "reconnects": load.reconnects,
        "load_s": round(load_s, 1),
        "sagas_per_s": round(finished / load_s, 1),
        "drain_s": None if drain_s is None else round(drain_s, 1),
        "drain_timed_out": drained.timed_out,
        "stalled": load.stalled,
        "checks": [
            {
                "n": c.number,
                "title": c.title,
                "ok": c.ok,
                "summary": c.summary,
                "problems": c.problems,
            }
            for c in checks
        ],
        "violations": sum(len(c.problems) for c in checks),
    }


def _kills_text(report: dict[str, Any]) -> str:
    parts = [f"{name} {k['done']}/{k['planned']}" for name, k in report["kills"].items()]
    broker = report["broker_restart"]
    if broker["skipped"]:
        restart = "skipped (no --broker-restart-cmd)"
    elif broker["exit_code"] == 0:
        restart = f"done in {broker['seconds']}s"
    elif broker["exit_code"] is None:
        restart = "not reached"
    else:
        restart = f"FAILED (exit {broker['exit_code']}): {broker['output']}"
    dropped = report["connection_drops"]
    drops = (
        f"; connections dropped {dropped['done']}/{dropped['planned']}"
        if dropped["planned"]
        else ""
    )
    return f"SIGKILL {', '.join(parts)}{drops}; broker restart {restart}"


def _restarts_text(report: dict[str, Any]) -> str:
    restarts = ", ".join(f"{n} {c}" for n, c in report["restarts"].items())
    crashes = ", ".join(f"{n} {c}" for n, c in report["crashes"].items())
    text = f"{restarts}; crashes seen (exit {CRASH_EXIT_CODE}): {crashes}"
    if report["unexpected_exits"]:
        unexpected = "; ".join(
            f"{n}: exit {codes}" for n, codes in report["unexpected_exits"].items()
        )
        text += f"; UNEXPECTED exits: {unexpected}"
    return text


def format_report(report: dict[str, Any]) -> list[str]:
    params = report["params"]
    faults = report["faults_injected"]
    injected = (
        ", ".join(f"{k} {faults.get(k, 0)}" for k in FAULT_FLAGS)
        if params["faults"]
        else "none (--no-faults)"
    )
    rows = [
        (
            "orders placed",
            f"{report['placed']}/{params['sagas']} at concurrency {params['concurrency']}: "
            + ", ".join(f"{n} {KIND_HELP[k]}" for k, n in report["orders"].items()),
        ),
        ("sagas by outcome", report["outcomes"]),
        ("kills", _kills_text(report)),
        ("restarts", _restarts_text(report)),
        ("faults injected", injected),
        ("time-outs", f"{report['step_timeouts']} deadlines missed (then resent or given up)"),
        (
            "results seen",
            f"{report['results']['by_event']} on saga.events, {report['results']['by_store']} "
            f"read from the store; {report['reconnects']} reconnects",
        ),
        (
            "service logs",
            f"{report['log_errors']} ERROR lines, {report['log_tracebacks']} tracebacks",
        ),
        (
            "time to drain",
            "did not drain"
            if report["drain_s"] is None
            else f"{report['drain_s']}s after the last order",
        ),
        ("sagas/s", f"{report['sagas_per_s']} ({report['finished']} in {report['load_s']}s)"),
    ]
    lines = [
        f"chaos soak: vhost {params['vhost']}, data {params['data_dir']}, seed {params['seed']}"
    ]
    lines += [f"{label:<17} {value}" for label, value in rows]
    lines.append("-" * 100)
    for c in report["checks"]:
        state = "OK  " if c["ok"] else "FAIL"
        lines.append(f"{state} {c['n']}. {c['title']:<30} {c['summary']}")
        lines += [f"       {p}" for p in c["problems"][:MAX_LISTED]]
        if len(c["problems"]) > MAX_LISTED:
            lines.append(f"       ... and {len(c['problems']) - MAX_LISTED} more (see --json)")
    lines.append(f"violations: {report['violations']}")
    return lines


# --- main ---------------------------------------------------------------------------------


def prepare_data_dir(opts: Options) -> Path:
    if opts.data_dir is None:
        return Path(tempfile.mkdtemp(prefix="saga-chaos-"))
    if opts.data_dir.exists() and any(opts.data_dir.glob("*.db")):
        raise ChaosError(f"{opts.data_dir} holds databases already; give a new or empty directory")
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    return opts.data_dir


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def audit(opts: Options, snap: Snapshot, placed: set[str]) -> list[Check]:
    """Checks 1 to 4: every saga ended, and stock, money and orders agree with the outcomes."""
    return [
        check_finished(snap, placed, opts.drain_timeout, bool(opts.faults)),
        check_stock(snap, seeded_stock(opts)),
        check_money(snap),
        check_orders(snap),
    ]


def soak(opts: Options, mgmt: Management, vhost: str, data_dir: Path) -> dict[str, Any]:
    """Start the stack, run load and chaos, drain, audit; return the report."""
    url = vhost_url(opts.url, vhost)
    rng = random.Random(opts.seed)
    orders = [make_order(rng) for _ in range(opts.sagas)]
    started = time.monotonic()
    supervisor = Supervisor(build_services(opts, url, data_dir), started)
    probe = Probe(url)
    progress = Progress()
    chaos = Chaos(
        plan_chaos(opts, rng),
        supervisor,
        progress,
        BrokerRestart(opts.broker_restart_cmd, vhost),
        mgmt,
    )
    store = data_dir / "orchestrator.db"
    try:
        if probe.depths([]) is None:
            raise ChaosError(f"cannot reach RabbitMQ at {redact(url)} over AMQP")
        say("starting the orchestrator, inventory, payment and order ...")
        supervisor.start()
        say(f"[{time.monotonic() - started:7.1f}s] stack ready; placing {opts.sagas} orders")
        chaos.start()
        load = Load(opts, url, store, orders, progress, started).run()
        placed = {str(o.request.saga_id) for o in orders[: load.placed]}
        say(f"[{time.monotonic() - started:7.1f}s] load done; waiting for the stack to drain")
        end_by = time.monotonic() if load.stalled else load.last_placed + opts.drain_timeout
        drained = drain(store, placed, supervisor, probe, end_by, opts.settle_s, progress)
        chaos.stop()
        snap = read_snapshot(data_dir)
        quiet_since = drained.quiet_since or time.monotonic()
        queues = check_queues(mgmt, vhost, probe, quiet_since, snap.outbox)
        checks = [*audit(opts, snap, placed), queues]
        return build_report(
            opts, vhost, data_dir, orders, snap, load, drained, chaos, supervisor, checks
        )
    finally:
        chaos.stop()
        supervisor.stop()
        probe.close()


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    signal.signal(signal.SIGTERM, _terminate)
    mgmt = Management.for_url(opts.url, opts.management_url)
    vhost = f"saga-chaos-{uuid.uuid4().hex[:10]}"
    data_dir: Path | None = None
    created = interrupted = False
    report: dict[str, Any] | None = None
    try:
        data_dir = prepare_data_dir(opts)
        mgmt.create_vhost(vhost)
        created = True
        say(f"vhost {vhost} on {redact(opts.url)}; data and logs in {data_dir}")
        if not opts.broker_restart_cmd:
            say("broker restart: skipped (give --broker-restart-cmd to restart the broker mid-run)")
        report = soak(opts, mgmt, vhost, data_dir)
    except ChaosError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: stopping the stack", file=sys.stderr)
        interrupted = True
    finally:
        clean = interrupted or (report is not None and report["violations"] == 0)
        cleanup(opts, mgmt, vhost if created else None, data_dir, clean)
    if report is None:
        return 130 if interrupted else 2
    if opts.json_path:
        opts.json_path.write_text(json.dumps(report, indent=2, default=str))
    for line in format_report(report):
        print(line)
    return 0 if report["violations"] == 0 else 1


def cleanup(
    opts: Options, mgmt: Management, vhost: str | None, data_dir: Path | None, clean: bool
) -> None:
    """Delete the vhost, and a temporary data directory unless there is something to see."""
    if opts.keep:
        say(f"kept: vhost {vhost}, data {data_dir}")
        return
    if vhost is not None:
        try:
            mgmt.delete_vhost(vhost)
        except ChaosError as exc:
            print(f"warning: could not delete vhost {vhost}: {exc}", file=sys.stderr)
    if data_dir is not None and opts.data_dir is None:
        if clean or not any(data_dir.iterdir()):
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            say(f"logs and databases kept in {data_dir}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(0)

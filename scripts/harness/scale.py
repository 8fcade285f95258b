"""The soak at scale: what it runs on when it is not one broker and SQLite.

``--scale`` is the shorthand for ``--orchestrators 2 --replicas 2 --postgres-url (the local
one) --cluster 3 --queue-type quorum --node-stops 1``: a fresh PostgreSQL database for the
orchestrators' store and the participants (made here, dropped at the end), a private RabbitMQ
cluster of its own (started here, stopped and removed at the end, even on failure or Ctrl-C)
with quorum queues, and a node of it stopped and started again mid-run.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
import urllib.error
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from messages.errors import ConfigurationError
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import redact
from scripts.harness.rabbit_cluster import PrivateCluster
from scripts.harness.rabbit_node import NodeError

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
QUEUE_TYPES = ("classic", "quorum")
NODE_DOWN_S = 5.0


class ScaleError(Exception):
    """Raised when the soak's database cannot be made; the message says why."""


@dataclass(frozen=True)
class Scale:
    """How many of each, on what: the defaults are the plain soak (one of each, SQLite)."""

    orchestrators: int = 1
    replicas: int = 1  # of each participant
    postgres_url: str | None = None  # the server to make the soak's database on
    cluster: int = 0  # nodes of a private cluster; 0: the broker at --url
    queue_type: str | None = None  # None: whatever the services' settings say
    node_stops: int = 0
    node_down_s: float = NODE_DOWN_S

    def describe(self) -> str:
        """One line for the report, empty for the plain soak."""
        parts = []
        if self.orchestrators > 1 or self.replicas > 1:
            parts.append(f"{self.orchestrators} orchestrators, {self.replicas} of each participant")
        if self.postgres_url:
            parts.append("on PostgreSQL")
        if self.cluster:
            parts.append(f"a private {self.cluster}-node RabbitMQ cluster")
        if self.queue_type:
            parts.append(f"{self.queue_type} queues")
        return ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale flags, in a group of their own."""
    group = parser.add_argument_group("at scale")
    group.add_argument(
        "--scale",
        action="store_true",
        help="shorthand for --orchestrators 2 --replicas 2 --postgres-url "
        f"{LOCAL_POSTGRES} --cluster 3 --queue-type quorum --node-stops 1 (each can be overridden)",
    )
    group.add_argument("--orchestrators", type=int, metavar="N", help="orchestrator processes (1)")
    group.add_argument(
        "--replicas", type=int, metavar="N", help="processes of each participant (1)"
    )
    group.add_argument(
        "--postgres-url",
        metavar="URL",
        help="run the store and the participants on PostgreSQL: a fresh database made on this "
        "server, dropped at the end (default: SQLite files in the data directory)",
    )
    group.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="start a private RabbitMQ cluster of N nodes for the soak, instead of --url; "
        "stopped and removed at the end",
    )
    group.add_argument("--queue-type", choices=QUEUE_TYPES, help="SAGA_QUEUE_TYPE of every service")
    group.add_argument(
        "--node-stops",
        type=int,
        metavar="N",
        help="times a node of --cluster (a random one, never the last one again) is stopped "
        "and started again mid-run (1 with --scale, else 0)",
    )
    group.add_argument(
        "--node-down-s",
        type=float,
        metavar="S",
        default=NODE_DOWN_S,
        help="how long a stopped node stays down (%(default)s)",
    )


def scale_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Scale:
    """The Scale the flags ask for; parser.error() for what cannot work."""
    full = args.scale

    def pick(value: Any, scaled: Any, plain: Any) -> Any:
        return value if value is not None else (scaled if full else plain)

    scale = Scale(
        orchestrators=pick(args.orchestrators, 2, 1),
        replicas=pick(args.replicas, 2, 1),
        postgres_url=pick(args.postgres_url, LOCAL_POSTGRES, None),
        cluster=pick(args.cluster, 3, 0),
        queue_type=pick(args.queue_type, "quorum", None),
        node_stops=pick(args.node_stops, 1, 0),
        node_down_s=args.node_down_s,
    )
    if scale.orchestrators < 1 or scale.replicas < 1 or scale.cluster < 0 or scale.node_stops < 0:
        parser.error("--orchestrators and --replicas must be at least 1, the others not negative")
    if (scale.orchestrators > 1 or scale.replicas > 1) and not scale.postgres_url:
        parser.error("several orchestrators or replicas share a store: give --postgres-url")
    if scale.node_stops and scale.cluster < 3:
        parser.error("--node-stops needs --cluster 3 or more, so that a majority stays up")
    return scale


# --- what the soak runs on -----------------------------------------------------------------


class ClusterManagement(ManagementApi):
    """The management API of whichever node answers: each one sees the whole cluster."""

    def __init__(self, base_urls: list[str], user: str, password: str) -> None:
        super().__init__(base_urls[0], user, password)
        self.base_urls = [url.rstrip("/") for url in base_urls]

    def call(self, method: str, path: str, body: object = None) -> Any:
        error: ConfigurationError | None = None
        start = self.base_urls.index(self.base_url)
        for base in self.base_urls[start:] + self.base_urls[:start]:
            self.base_url = base
            try:
                return super().call(method, path, body)
            except ConfigurationError as exc:
                if isinstance(exc.__cause__, urllib.error.HTTPError):
                    raise  # the node answered: another would say the same
                error = exc
        assert error is not None
        raise error


@dataclass
class Infrastructure:
    """The broker (one, or the nodes of a cluster) and the store the soak runs on."""

    amqp_url: str  # one URL, or every node's, comma-separated
    management: ManagementApi
    service_env: dict[str, str] = field(default_factory=dict)  # for every service
    cluster: PrivateCluster | None = None
    database: str | None = None  # the soak's own PostgreSQL database


@contextlib.contextmanager
def infrastructure(
    scale: Scale, url: str, management_url: str | None, keep: bool
) -> Iterator[Infrastructure]:
    """Make the database and start the cluster the soak asks for; drop and stop them after.

    Both go whatever happens (an error, Ctrl-C); with ``keep`` the database stays.
    """
    with contextlib.ExitStack() as cleanup:
        env: dict[str, str] = {}
        if scale.queue_type:
            env["SAGA_QUEUE_TYPE"] = scale.queue_type
        database = None
        if scale.postgres_url:
            database, store_url = cleanup.enter_context(_database(scale.postgres_url, keep))
            env.update(SAGA_STORE_URL=store_url, SAGA_PARTICIPANT_DB_URL=store_url)
        if not scale.cluster:
            api = ManagementApi.for_amqp_url(url, management_url)
            yield Infrastructure(url, api, env, None, database)
            return
        cluster = cleanup.enter_context(_cluster(scale.cluster))
        api = ClusterManagement(cluster.management_urls, "guest", "guest")
        yield Infrastructure(cluster.amqp_url, api, env, cluster, database)


@contextlib.contextmanager
def _database(server_url: str, keep: bool) -> Iterator[tuple[str, str]]:
    """A fresh database on ``server_url``: (its name, its URL); dropped after unless ``keep``."""
    name = f"saga_chaos_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as db:
            db.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as exc:
        raise ScaleError(f"cannot make a database on {redact(server_url)}: {exc}") from exc
    print(f"database {name} on {redact(server_url)}", flush=True)
    try:
        yield name, urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        if keep:
            print(f"kept: database {name}", flush=True)
        else:
            try:
                with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as db:
                    db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except psycopg.Error as exc:
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def _cluster(size: int) -> Iterator[PrivateCluster]:
    """A private cluster with the management plugin, up and joined; stopped and removed after."""
    cluster = PrivateCluster.create(size=size, management=True)
    print(f"cluster: starting {size} private RabbitMQ nodes in {cluster.base_dir}", flush=True)
    began = time.monotonic()
    try:
        with cluster:  # start(); stop() and the directory removed on the way out, always
            print(f"cluster: {size} nodes up in {time.monotonic() - began:.1f}s", flush=True)
            yield cluster
    finally:
        print(f"cluster: stopped, {cluster.base_dir} removed", flush=True)


# --- a node stopped and brought back ----------------------------------------------------------


@dataclass
class NodeStop:
    """One node stopped mid-run: which, when, and how long each part took."""

    node: int
    at_s: float
    stopping_s: float | None = None  # until its Erlang node was gone
    down_s: float | None = None  # gone, before it was started again
    back_s: float | None = None  # from its start until the cluster ran every node again
    error: str | None = None


class NodeOutages:
    """Stops a node of the cluster (never the same one twice running) and starts it again."""

    def __init__(self, cluster: PrivateCluster, down_s: float, rng: random.Random) -> None:
        self.cluster = cluster
        self.down_s = down_s
        self.rng = rng
        self.done: list[NodeStop] = []
        self._last: int | None = None

    def pick(self) -> int:
        """The node to stop next: any but the one stopped last."""
        nodes = [n for n in range(1, len(self.cluster.nodes) + 1) if n != self._last]
        self._last = self.rng.choice(nodes)
        return self._last

    def stop_one(self, number: int, at_s: float) -> NodeStop:
        """Stop node ``number``, wait ``down_s``, start it, wait until every node runs."""
        stop = NodeStop(number, at_s)
        self.done.append(stop)
        began = time.monotonic()
        try:
            self.cluster.stop_node(number)
            stop.stopping_s, began = _since(began), time.monotonic()
            time.sleep(self.down_s)
            stop.down_s, began = _since(began), time.monotonic()
            self.cluster.start_node(number)
            self.cluster.wait_running(len(self.cluster.nodes), timeout=120)
            stop.back_s = _since(began)
        except (NodeError, OSError) as exc:
            stop.error = str(exc)[:300]
        return stop


def _since(began: float) -> float:
    return round(time.monotonic() - began, 1)

"""A private RabbitMQ node for tests that restart the broker.

The machine's own RabbitMQ (the Debian package's ``rabbit@localhost`` on 5672) is shared and
must never be stopped. Tests and the chaos soak that need a broker restart start a node of
their own beside it with :class:`PrivateNode`: its own node name, free AMQP, distribution and
(optionally) management ports, its own config, cookie, data and log directories under one temp
directory, owned by the ``rabbitmq`` user when run as root (the server refuses to run as root
and drops to that user). Nothing of the shared node is read or written, apart from registering
the private node's name with the machine's epmd, as every Erlang node does.

    with PrivateNode.create() as node:          # start() waits until AMQP answers
        url = node.amqp_url                     # amqp://guest:guest@127.0.0.1:<port>/
        node.restart(down_s=1.5)                # stop_app, sleep, start_app, wait for AMQP
    # stop(): the node is killed and its directories removed, also when start() failed

The state (ports, directories, process group) is a small JSON file in the node's directory,
so ``scripts/broker_node.py`` can start a node in one command and stop it in another.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from scripts.harness.processes import free_port

RABBITMQ_BIN = Path(os.environ.get("SAGA_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
SERVER_USER = "rabbitmq"
STATE_FILE = "node.json"
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
# Class 10 (connection), method 10 (start): the first frame a broker sends.
CONNECTION_START = struct.pack(">HH", 10, 10)


class NodeError(RuntimeError):
    """The private node could not be started, controlled or stopped."""


@dataclass(frozen=True)
class Remembered:
    """Which private node (or cluster) a command works on: the one given, the one named in
    the environment, else the last one `start` made (kept in a file under $TMPDIR)."""

    env_var: str
    last: Path
    what: str  # for the error: "node", "cluster"
    option: str  # for the error: "--node-dir", ...

    def find(self, given: str | None) -> str:
        chosen = given or os.environ.get(self.env_var)
        if chosen:
            return chosen
        try:
            return self.last.read_text().strip()
        except OSError:
            raise NodeError(
                f"which {self.what}? give {self.option} or {self.env_var}, or `start` one"
            ) from None

    def remember(self, directory: Path) -> None:
        self.last.write_text(f"{directory}\n")

    def forget(self, directory: Path) -> None:
        if self.last.exists() and self.last.read_text().strip() == str(directory):
            self.last.unlink()


def amqp_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True if an AMQP 0-9-1 broker answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(AMQP_HEADER)
            data = b""
            while len(data) < 11:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    # frame: type 1 (method), channel 0, size, then class and method ids
    return data[0] == 1 and data[7:11] == CONNECTION_START


@dataclass
class NodeState:
    """What identifies a private node; written to ``<base_dir>/node.json``."""

    name: str
    base_dir: str
    amqp_port: int
    dist_port: int
    management_port: int | None
    pgid: int | None = None


class PrivateNode:
    """One private RabbitMQ node: start, stop_app/start_app, restart, stop."""

    def __init__(self, state: NodeState, cookie: str | None = None) -> None:
        self.state = state
        self._cookie = cookie  # for the first start; later ones read it from the directory
        self._process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        """Seconds the last start() or start_app() took until AMQP answered."""

    # --- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        management: bool = False,
        name: str | None = None,
        parent_dir: str | os.PathLike[str] | None = None,
        cookie: str | None = None,
    ) -> PrivateNode:
        """A node with fresh free ports and a new temp directory; not started yet.

        Nodes that are to form a cluster need the same Erlang ``cookie``; by default each
        node gets one of its own.
        """
        suffix = secrets.token_hex(3)
        base = tempfile.mkdtemp(prefix=f"saga-node-{suffix}-", dir=parent_dir)
        ports: set[int] = set()
        while len(ports) < (3 if management else 2):
            ports.add(free_port())
        amqp_port, dist_port, *rest = sorted(ports)
        state = NodeState(
            name=name or f"saga-test-{suffix}@localhost",
            base_dir=base,
            amqp_port=amqp_port,
            dist_port=dist_port,
            management_port=rest[0] if rest else None,
        )
        return cls(state, cookie)

    @classmethod
    def load(cls, base_dir: str | os.PathLike[str]) -> PrivateNode:
        """The node whose state ``start()`` wrote to ``base_dir`` (for another process)."""
        path = Path(base_dir) / STATE_FILE
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NodeError(f"no private node state at {path}: {exc}") from exc
        return cls(NodeState(**raw))

    def __enter__(self) -> PrivateNode:
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
    def name(self) -> str:
        return self.state.name

    @property
    def base_dir(self) -> Path:
        return Path(self.state.base_dir)

    @property
    def amqp_url(self) -> str:
        """guest/guest; RabbitMQ accepts guest only over loopback, which this is."""
        return f"amqp://guest:guest@127.0.0.1:{self.state.amqp_port}/"

    @property
    def management_url(self) -> str | None:
        port = self.state.management_port
        return None if port is None else f"http://127.0.0.1:{port}"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    def is_up(self) -> bool:
        """True if AMQP answers on the node's port."""
        return amqp_answers(self.state.amqp_port)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until AMQP answers.

        The first start writes the config and makes the directories; if it fails, the node is
        killed and they are removed. A later start (after ``halt()``) reuses them, and on
        failure leaves them for ``stop()``, the data being the point of a restart.
        """
        first = not (self.base_dir / STATE_FILE).exists()
        try:
            if first:
                self._write_files()
            started = time.monotonic()
            self._spawn()
            self._wait_up(timeout, started)
            self.startup_s = time.monotonic() - started
        except BaseException:
            if first:
                self.stop()
            else:
                self._kill(10.0)
            raise

    def stop_app(self, timeout: float = 60.0) -> None:
        """``rabbitmqctl stop_app``: the Erlang node stays, AMQP connections are closed."""
        self.ctl("stop_app", timeout=timeout)

    def start_app(self, timeout: float = 60.0) -> None:
        """``rabbitmqctl start_app``, then wait until AMQP answers."""
        started = time.monotonic()
        self.ctl("start_app", timeout=timeout)
        self._wait_up(timeout, started)
        self.startup_s = time.monotonic() - started

    def restart(self, down_s: float = 1.0, timeout: float = 60.0, *, full: bool = False) -> None:
        """stop_app, stay down ``down_s`` seconds, start_app, wait for AMQP.

        With ``full`` the whole Erlang node goes down (``halt()``) and is started again on
        the same ports and data, as after a machine or container restart.
        """
        if full:
            self.halt(timeout=timeout)
            time.sleep(down_s)
            self.start(timeout=timeout)
            return
        self.stop_app(timeout=timeout)
        time.sleep(down_s)
        self.start_app(timeout=timeout)

    def halt(self, timeout: float = 30.0) -> None:
        """Stop the whole node but keep its data; ``start()`` brings it back."""
        self._kill(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Kill the node (gracefully if it answers, else SIGKILL) and remove its directory."""
        try:
            self._kill(timeout)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> ARGS`` with the node's cookie; its stdout."""
        env = self._env()
        env["HOME"] = str(self.base_dir)  # the CLI reads $HOME/.erlang.cookie
        try:
            done = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
                env=env,
                cwd=self.base_dir,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"rabbitmqctl {' '.join(args)} timed out after {timeout}s") from exc
        if done.returncode != 0:
            err = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise NodeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {err}")
        return done.stdout.decode(errors="replace")

    def consumers(self) -> dict[str, int]:
        """Each queue of the default vhost with its number of consumers."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "consumers")
        result: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                result[parts[0]] = int(parts[1])
        return result

    # --- internals ---------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.state.amqp_port),
            RABBITMQ_DIST_PORT=str(self.state.dist_port),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "node.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _write_files(self) -> None:
        base = self.base_dir
        (base / "mnesia").mkdir(parents=True, exist_ok=True)
        (base / "log").mkdir(exist_ok=True)
        (base / "rabbitmq-env.conf").write_text("# private node: no settings of the shared one\n")
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.state.amqp_port}",
            "loopback_users.guest = true",
            "log.file.level = info",
            "log.console = false",
        ]
        plugins = "[]."
        if self.state.management_port is not None:
            lines += [
                f"management.tcp.port = {self.state.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
            plugins = "[rabbitmq_management]."
        (base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (base / "advanced.config").write_text("[].\n")
        (base / "enabled_plugins").write_text(plugins + "\n")
        cookie = base / ".erlang.cookie"
        cookie.write_text(self._cookie or secrets.token_hex(20).upper())
        owner = self._server_owner()
        for path in [base, *base.rglob("*")]:
            if owner is not None:
                os.chown(path, owner[0], owner[1])
        cookie.chmod(0o400)
        base.chmod(0o755)  # the CLI, run as root, and the server both read the cookie here
        self._save()

    def _server_owner(self) -> tuple[int, int] | None:
        """(uid, gid) the server runs as: ``rabbitmq`` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise NodeError(f"running as root but there is no {SERVER_USER!r} user") from exc
        return entry.pw_uid, entry.pw_gid

    def _spawn(self) -> None:
        env = self._env()
        owner = self._server_owner()
        env["HOME"] = str(self.base_dir)  # the server reads $HOME/.erlang.cookie
        if owner is not None:
            env.update(USER=SERVER_USER, LOGNAME=SERVER_USER)
        out = (self.log_dir / "startup_stdout.log").open("wb")
        err = (self.log_dir / "startup_stderr.log").open("wb")
        with out, err:
            self._process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=env,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so stop() can kill it all
                user=owner[0] if owner else None,
                group=owner[1] if owner else None,
                extra_groups=[] if owner else None,
            )
        self.state.pgid = self._process.pid
        self._save()

    def _wait_up(self, timeout: float, started: float) -> None:
        deadline = started + timeout
        while not self.is_up():
            if self._process is not None and self._process.poll() is not None:
                raise NodeError(
                    f"node {self.name} exited with {self._process.returncode} during start:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node {self.name}: AMQP did not answer on port {self.state.amqp_port} "
                    f"within {timeout}s:\n" + self._log_tail()
                )
            time.sleep(0.05)
        if self.state.management_port is not None:
            while not _port_open(self.state.management_port):
                if time.monotonic() > deadline:
                    raise NodeError(f"node {self.name}: management did not start in {timeout}s")
                time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in sorted(self.log_dir.glob("*.log")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                texts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(texts) or "(no logs)"

    def _kill(self, timeout: float) -> None:
        pgid = self.state.pgid
        if self._process is not None:
            self._process.poll()
        if pgid is None or not _group_alive(pgid):
            self._reap()
            return
        with contextlib.suppress(NodeError):
            self.ctl("stop", timeout=timeout)  # graceful; returns once the node is down
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self._process is not None:
                self._process.poll()  # reap our child, else its zombie keeps the group "alive"
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self._reap()
        self.state.pgid = None

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            self._process = None

    def _save(self) -> None:
        path = self.base_dir / STATE_FILE
        if self.base_dir.is_dir():
            path.write_text(json.dumps(asdict(self.state), indent=2) + "\n")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

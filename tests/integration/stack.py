"""The system under test as real processes: orchestrator, participants and place_order.py.

Each stack lives in its own vhost and data directory. Processes are started the way a user
starts them (`python -m ...`), their logs go to files the tests read, and they can be
killed for real.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from messages.contract import topology
from messages.contract.codec import decode, encode
from messages.contract.models import Envelope

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
# Settings that make a silent participant time out in ~1 s, resends of the pivot and of
# compensations reach their longest wait (1 s) quickly, and a saga count as stuck after 2 s.
FAST_TIMEOUTS = {
    "SAGA_STEP_TIMEOUT_S": "0.3",
    "SAGA_STEP_MAX_ATTEMPTS": "2",
    "SAGA_MAX_RETRY_WAIT_S": "1",
    "SAGA_STUCK_AFTER_S": "2",
    "SAGA_TICK_S": "0.05",
}


@dataclass
class Service:
    """One running process and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Stack:
    """Processes of one test, sharing a vhost and a data directory."""

    amqp_url: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)

    def environment(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
        env.update(
            SAGA_AMQP_URL=self.amqp_url,
            SAGA_DATA_DIR=str(self.data_dir),
            SAGA_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        env.update(extra)
        return env

    def start(self, name: str, *argv: str, ready: str | None = "ready", **env: str) -> Service:
        """Start ``python -m argv...`` and wait until its log says ``ready``."""
        log = self.data_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", *argv],
                cwd=ROOT,
                env=self.environment(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, process, log)
        self.services[name] = service
        if ready:
            self.wait_for_log(name, ready)
        return service

    def orchestrator(self, **env: str) -> Service:
        return self.start("orchestrator", "orchestrator", "run", **env)

    def worker(self, participant: str, *options: str, **env: str) -> Service:
        return self.start(
            participant,
            "workers",
            "run",
            participant,
            *options,
            ready=f"{participant}.commands" if participant != "all" else "order.commands",
            **env,
        )

    def wait_for_log(self, name: str, text: str, timeout: float = READY_TIMEOUT_S) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        while text not in service.output():
            if service.process.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({service.process.returncode}):\n{service.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}:\n{service.output()}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up, no flush, like a crash."""
        service = self.services.pop(name)
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)

    def stop_all(self) -> None:
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.terminate()
        for service in self.services.values():
            try:
                service.process.wait(10)
            except subprocess.TimeoutExpired:
                service.process.kill()
        self.services.clear()

    # --- the user's client -------------------------------------------------------------

    def place_order(self, *args: str, timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
        """Run scripts/place_order.py --json; return its exit code and parsed output."""
        done = self.place_order_async(*args, timeout=timeout)
        out, err = done.communicate(timeout=timeout + 30)
        return done.returncode, _json_or_error(out, err)

    def place_order_async(self, *args: str, timeout: float = 20.0) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "place_order.py"),
                *args,
                "--json",
                "--timeout",
                str(timeout),
            ],
            cwd=ROOT,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # --- looking at state ----------------------------------------------------------------

    def query(self, participant: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Read a service's own SQLite file (read-only)."""
        path = self.data_dir / f"{participant}.db"
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return db.execute(sql, args).fetchall()

    def stock(self, sku: str) -> int:
        return int(self.query("inventory", "SELECT quantity FROM stock WHERE sku = ?", sku)[0][0])

    def saga(self, saga_id: str) -> dict[str, Any]:
        """`python -m orchestrator show SAGA_ID --json`, as a user would read it."""
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "show", saga_id, "--json"],
            cwd=ROOT,
            env=self.environment(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(json.loads(out))


def _json_or_error(out: str, err: str) -> dict[str, Any]:
    try:
        return dict(json.loads(out))
    except json.JSONDecodeError:
        return {"stdout": out, "stderr": err}


@contextmanager
def amqp_channel(url: str) -> Iterator[Any]:
    """A pika channel with confirms, for tests that talk to queues directly."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


def send(
    channel: Any, exchange: str, routing_key: str, message: Envelope | bytes, **properties: Any
) -> None:
    """Publish a model (with our usual properties) or raw bytes (with only those given)."""
    if isinstance(message, bytes):
        body, props = message, pika.BasicProperties(**properties)
    else:
        wire = encode(message)
        body = wire.body
        props = pika.BasicProperties(
            content_type=wire.content_type,
            type=wire.type,
            message_id=wire.message_id,
            correlation_id=wire.correlation_id,
            delivery_mode=2,
            **properties,
        )
    channel.basic_publish(exchange, routing_key, body, props, mandatory=True)


def drain(channel: Any, queue: str, expect: int, timeout: float = 10.0) -> list[Any]:
    """Take ``expect`` messages off ``queue`` (waiting up to ``timeout``): (props, body)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        got.append((props, body))
    return got


def replies(channel: Any, expect: int) -> list[Any]:
    """Decoded replies waiting in the orchestrator's replies queue."""
    return [decode(body) for _, body in drain(channel, topology.REPLIES_QUEUE, expect)]

"""The soak's stack: the service processes (replicas too), restarted whenever they exit, and
killed when told."""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts.harness.chaos_options import (
    BLOCKED_CUSTOMER,
    LIMITS,
    PARTICIPANTS,
    READY_TIMEOUT_S,
    SERVICE_SETTINGS,
    ChaosError,
    Options,
    fault_env,
    say,
    seeded_stock,
)
from scripts.harness.processes import Process, Processes
from scripts.harness.stack import Stack
from workers.faults import CRASH_EXIT_CODE


@dataclass
class Service:
    """One service process and what happened to it: starts, kills, crashes."""

    process: Process
    role: str  # "orchestrator" or a participant: what the replicas of one service share
    starts: int = 0
    kills: int = 0
    crashes: int = 0
    unexpected: list[int] = field(default_factory=list)
    _ready: bool = False
    _kill_requested: bool = False
    _restart_at: float | None = None

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def log(self) -> Path:
        return self.process.log

    def spawn(self) -> None:
        self.process.start()
        self.starts += 1
        self._ready = self._kill_requested = False
        self._restart_at = None

    def running(self) -> bool:
        return self.process.running()

    def ready(self) -> bool:
        """The current process has logged that it consumes its queue(s)."""
        if not self._ready and self.running():
            self._ready = f"{self.role} ready: consuming" in self.process.output(since_start=True)
        return self._ready and self.running()

    def kill(self) -> None:
        self._kill_requested = True
        self.kills += 1
        self.process.kill()

    def reap(self, now: float) -> str | None:
        """If the process has exited, note why and when to restart it; say so if unexpected."""
        if self._restart_at is not None:
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
                    raise ChaosError(f"{service.name} exited at start:\n{service.process.tail()}")
                if time.monotonic() > deadline:
                    raise ChaosError(
                        f"{service.name} was not ready in time:\n{service.process.tail()}"
                    )
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

    def kill(self, role: str, rng: random.Random) -> str | None:
        """SIGKILL a replica of ``role`` that is up and consuming; its name, or None if none is.

        Of those, one killed the fewest times so far, so that every replica gets its turn.
        """
        with self._lock:
            ready = [s for s in self.services.values() if s.role == role and s.ready()]
            if not ready:
                return None
            fewest = min(s.kills for s in ready)
            service = rng.choice([s for s in ready if s.kills == fewest])
            service.kill()
            return service.name

    def of_role(self, role: str) -> list[Service]:
        """The replicas of ``role``."""
        return [s for s in self.services.values() if s.role == role]

    def all_ready(self) -> bool:
        with self._lock:
            return all(s.ready() for s in self.services.values())

    def stop(self) -> None:
        """Stop supervising, then stop every process (SIGTERM, SIGKILL after 10 s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        Processes({name: s.process for name, s in self.services.items()}).stop(10)


def replica_names(role: str, count: int) -> list[str]:
    """``role`` alone, or ``role-1``, ``role-2``... for several replicas."""
    return [role] if count == 1 else [f"{role}-{i}" for i in range(1, count + 1)]


def build_services(opts: Options, stack: Stack) -> list[Service]:
    """The orchestrator(s) and the faulty participants (every replica seeded alike).

    On PostgreSQL each process has a data directory of its own (for its health file).
    """
    stock = ",".join(f"{sku}={n}" for sku, n in seeded_stock(opts).items())
    limits = ",".join(f"{c}={limit}" for c, limit in LIMITS.items())
    options = {
        "inventory": ("--stock", stock),
        "payment": ("--limit", limits),
        "order": ("--block", BLOCKED_CUSTOMER),
    }

    def own(name: str) -> dict[str, str]:
        return stack.own_data_dir(name) if opts.scale.postgres_url else {}

    services = [
        Service(stack.process(name, "orchestrator", "run", **own(name)), "orchestrator")
        for name in replica_names("orchestrator", opts.scale.orchestrators)
    ]
    faults = fault_env(opts)
    argv = {p: ("workers", "run", p, *options[p]) for p in PARTICIPANTS}
    services += [
        Service(stack.process(name, *argv[p], **own(name), **faults), p)
        for p in PARTICIPANTS
        for name in replica_names(p, opts.scale.replicas)
    ]
    return services


def soak_stack(url: str, data_dir: Path, env: dict[str, str]) -> Stack:
    """The stack the soak drives: the soak's settings (and ``env``) over the user's SAGA_*."""
    # Its own session: a Ctrl-C is the soak's to handle. Not die_with_parent: the supervisor
    # restarts services from a thread, where preexec_fn is not safe.
    settings = {**SERVICE_SETTINGS, **env}
    return Stack(url, data_dir, settings, inherit_settings=True, own_session=True)

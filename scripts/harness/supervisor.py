"""The soak's stack: four service processes, restarted whenever they exit, killed when told."""

from __future__ import annotations

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
            self._ready = f"{self.name} ready: consuming" in self.process.output(since_start=True)
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
        Processes({name: s.process for name, s in self.services.items()}).stop(10)


def build_services(opts: Options, stack: Stack) -> list[Service]:
    """The orchestrator and the faulty participants."""
    stock = ",".join(f"{sku}={n}" for sku, n in seeded_stock(opts).items())
    limits = ",".join(f"{c}={limit}" for c, limit in LIMITS.items())
    options = {
        "inventory": ("--stock", stock),
        "payment": ("--limit", limits),
        "order": ("--block", BLOCKED_CUSTOMER),
    }
    services = [Service(stack.process("orchestrator", "orchestrator", "run"))]
    faults = fault_env(opts)
    services += [
        Service(stack.process(p, "workers", "run", p, *options[p], **faults)) for p in PARTICIPANTS
    ]
    return services


def soak_stack(url: str, data_dir: Path) -> Stack:
    """The stack the soak drives: the soak's settings over the user's other SAGA_* ones."""
    # Its own session: a Ctrl-C is the soak's to handle. Not die_with_parent: the supervisor
    # restarts services from a thread, where preexec_fn is not safe.
    return Stack(url, data_dir, dict(SERVICE_SETTINGS), inherit_settings=True, own_session=True)

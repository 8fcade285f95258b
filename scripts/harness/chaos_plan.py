"""Chaos: kills, connection drops and a broker restart at random points of the load."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from messages.errors import ConfigurationError
from messages.plumbing.management import ManagementApi
from scripts.harness.chaos_options import BROKER, CONNECTIONS, Options, say
from scripts.harness.supervisor import Supervisor


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
    """--broker-restart-cmd, and how its one run went."""

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
        management: ManagementApi,
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
        try:
            names = [c["name"] for c in self.management.connections(self.broker.vhost)]
            for name in names:
                with contextlib.suppress(ConfigurationError):  # it may have closed on its own
                    self.management.close_connection(name)
        except ConfigurationError as exc:
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

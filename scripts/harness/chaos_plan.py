"""Chaos: kills, connection drops, a broker restart or node stops at random points of the load."""

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
from scripts.harness.chaos_options import BROKER, CONNECTIONS, NODE, Options, say
from scripts.harness.scale import NodeOutages
from scripts.harness.supervisor import Supervisor


@dataclass
class Progress:
    """How far the load is; the chaos thread reads it."""

    placed: int = 0
    finished: int = 0


@dataclass(frozen=True)
class Action:
    """Kill a replica of ``target`` (or break the broker) once ``at`` sagas have finished."""

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
    """Kills at random points between 10% and 85% of the sagas; broker restart, node stops
    between 30% and 70%."""
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
    mid = (opts.sagas * 3 // 10, opts.sagas * 7 // 10)
    actions += [Action(rng.randint(*mid), NODE) for _ in range(opts.scale.node_stops)]
    return sorted(actions, key=lambda a: a.at)


class Chaos:
    """Carries out the plan in a thread of its own, as the load reaches each point.

    Which replica a kill hits is drawn from ``rng``. A node stop runs in a thread of its own
    (the node is down for seconds; kills go on meanwhile); stop() waits for it to be back.
    """

    def __init__(
        self,
        actions: list[Action],
        supervisor: Supervisor,
        progress: Progress,
        broker: BrokerRestart,
        management: ManagementApi,
        rng: random.Random,
        outages: NodeOutages | None = None,
    ) -> None:
        self.actions = actions
        self.rng = rng
        self.outages = outages
        self._outage_threads: list[threading.Thread] = []
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
        for thread in self._outage_threads:
            thread.join()

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
            if action.target == NODE:
                self._stop_node()
                continue
            while not (name := self.supervisor.kill(action.target, self.rng)):
                if self._stop.wait(0.05):
                    return
            self._note(action.target, f"SIGKILL {name}", name)

    def _note(self, target: str, what: str, name: str | None = None) -> None:
        elapsed = time.monotonic() - self.supervisor.started
        self.done.append(
            {
                "target": target,
                "name": name or target,
                "at_s": round(elapsed, 1),
                "finished": self.progress.finished,
            }
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

    def _stop_node(self) -> None:
        """Stop a node of the cluster and start it again, in a thread of its own.

        One node at a time: a second stop waits for the first node to be back, so that a
        majority of the cluster always runs.
        """
        if self.outages is None:
            return
        for previous in self._outage_threads:
            previous.join()
        outages, started = self.outages, self.supervisor.started
        number = outages.pick()

        def run() -> None:
            stop = outages.stop_one(number, round(time.monotonic() - started, 1))
            state = f"FAILED: {stop.error}" if stop.error else f"back after {stop.back_s}s"
            say(f"[{time.monotonic() - started:7.1f}s] broker node {number} {state}")

        self._note(NODE, f"stopping broker node {number}", f"node {number}")
        thread = threading.Thread(target=run, name="node-stop", daemon=True)
        self._outage_threads.append(thread)
        thread.start()

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

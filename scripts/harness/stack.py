"""The stack as real processes: the orchestrator and the participants on one vhost and data dir.

Started the way a user starts them (`python -m orchestrator run`, `python -m workers run
inventory`), each logging to ``<data_dir>/<name>.log``, and read back the way a user reads
them: through each service's own command line with `--json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.harness.processes import READY_TIMEOUT_S, ROOT, Process, Processes

PARTICIPANTS = ("inventory", "payment", "order")
# Settings a stack always sets itself; with inherit_settings the user's other SAGA_* stay.
OWN_SETTINGS = ("SAGA_FAULT_", "SAGA_AMQP_URL", "SAGA_DATA_DIR", "SAGA_METRICS_PORT")


class CliError(Exception):
    """Raised when a service's command line fails or prints no JSON."""


@dataclass
class Stack:
    """Service processes sharing a vhost (``amqp_url``) and a data directory."""

    amqp_url: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)  # settings for every service
    log_level: str = "INFO"
    inherit_settings: bool = False  # keep the caller's SAGA_* settings (except OWN_SETTINGS)
    own_session: bool = False  # children in their own session: a Ctrl-C reaches only us
    die_with_parent: bool = False  # children SIGTERMed if we die (see processes.Process)
    services: dict[str, Process] = field(default_factory=dict)

    def environment(self, **extra: str) -> dict[str, str]:
        """The environment of a service or of a command line run against this stack."""
        dropped = OWN_SETTINGS if self.inherit_settings else ("SAGA_",)
        env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        env.update(
            SAGA_AMQP_URL=self.amqp_url,
            SAGA_DATA_DIR=str(self.data_dir),
            SAGA_LOG_LEVEL=self.log_level,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        env.update(extra)
        return env

    def process(self, name: str, *argv: str, **env: str) -> Process:
        """``python -m argv...`` as service ``name``, not started yet."""
        log = self.data_dir / f"{name}.log"
        env = self.environment(**env)
        process = Process.python(name, argv, env, log, self.own_session, self.die_with_parent)
        self.services[name] = process
        return process

    def own_data_dir(self, name: str) -> dict[str, str]:
        """SAGA_DATA_DIR=<data_dir>/<name>, made: each replica of a service on a shared store
        needs a directory of its own (its health file)."""
        own = self.data_dir / name
        own.mkdir(exist_ok=True)
        return {"SAGA_DATA_DIR": str(own)}

    def start(
        self,
        name: str,
        *argv: str,
        ready: str | None = "ready",
        **env: str,
    ) -> Process:
        """Start ``python -m argv...`` and wait until its log says ``ready``."""
        process = self.process(name, *argv, **env).start()
        if ready:
            process.wait_for_log(ready, READY_TIMEOUT_S)
        return process

    def orchestrator(self, **env: str) -> Process:
        """`python -m orchestrator run`, once it consumes."""
        return self.start("orchestrator", "orchestrator", "run", **env)

    def worker(self, participant: str, *options: str, **env: str) -> Process:
        """`python -m workers run PARTICIPANT OPTIONS...`, once it consumes its commands."""
        ready = f"{participant}.commands" if participant != "all" else "order.commands"
        return self.start(participant, "workers", "run", participant, *options, ready=ready, **env)

    def wait_for_log(self, name: str, text: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Until service ``name`` logs ``text`` (in any of its runs)."""
        self.services[name].wait_for_log(text, timeout, since_start=False)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up, no flush, like a crash."""
        process = self.services.pop(name)
        process.kill()
        process.wait_stopped()

    @contextmanager
    def frozen(self, name: str) -> Iterator[Process]:
        """Service ``name`` SIGSTOPped for the block: its messages wait; thawed on the way out."""
        process = self.services[name]
        process.freeze()
        try:
            yield process
        finally:
            process.thaw()

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every service, SIGKILL what is left after ``grace_s``."""
        Processes(self.services).stop(grace_s)  # clears self.services too

    # --- reading it the way a user does -------------------------------------------------

    def cli(self, *argv: str, timeout: float = 60.0) -> Any:
        """``python -m argv... --json`` against this stack: its parsed output."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", *argv, "--json"],
                cwd=ROOT,
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise CliError(f"{' '.join(argv)}: no answer in {timeout:g}s") from exc
        if done.returncode != 0:
            raise CliError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise CliError(f"{' '.join(argv)} printed no JSON: {done.stdout[:200]!r}") from exc

    def saga(self, saga_id: str) -> dict[str, Any]:
        """`python -m orchestrator show SAGA_ID --json`."""
        return dict(self.cli("orchestrator", "show", saga_id))

    def sagas(self) -> list[dict[str, Any]]:
        """Every saga, newest first: `python -m orchestrator list --limit 0 --json`."""
        return list(self.cli("orchestrator", "list", "--limit", "0"))

    # --- the user's client ----------------------------------------------------------------

    def place_order(self, *args: str, timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
        """Run scripts/place_order.py --json; return its exit code and parsed output."""
        done = self.place_order_async(*args, timeout=timeout)
        out, err = done.communicate(timeout=timeout + 30)
        return done.returncode, _json_or_error(out, err)

    def place_order_async(self, *args: str, timeout: float = 20.0) -> subprocess.Popen[str]:
        """Start scripts/place_order.py --json; the caller collects its output."""
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


def _json_or_error(out: str, err: str) -> dict[str, Any]:
    try:
        return dict(json.loads(out))
    except json.JSONDecodeError:
        return {"stdout": out, "stderr": err}

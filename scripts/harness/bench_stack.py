"""--start-stack: the orchestrators and the participants, started by the harness.

One orchestrator and one of each participant on SQLite by default. With a PostgreSQL URL,
the bench makes a database of its own (dropped afterwards) for the orchestrators' store and
the participants, and may start several orchestrators and several replicas of each
participant, each process with a data directory of its own (its health file).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from scripts.harness.bench_common import BenchError
from scripts.harness.processes import Processes
from scripts.harness.stack import PARTICIPANTS, Stack


@dataclass
class BenchStack:
    """The services as separate processes in a new data directory, logging warnings only."""

    url: str
    sku: str
    stock: int
    parent_dir: Path | None
    keep_data: bool
    orchestrators: int = 1
    replicas: int = 1  # of each participant
    postgres_url: str | None = None
    queue_type: str = "classic"
    data_dir: Path | None = None
    processes: Processes = field(default_factory=Processes)
    database: str | None = None  # the bench's own, on postgres_url

    def start(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="saga-bench-", dir=self.parent_dir))
        env = {"SAGA_QUEUE_TYPE": self.queue_type}
        if self.postgres_url:
            url = self._create_database(self.postgres_url)
            env |= {"SAGA_STORE_URL": url, "SAGA_PARTICIPANT_DB_URL": url}
        # Its own session (Ctrl-C reaches the bench, which stops them) and SIGTERMed should
        # the bench die; readiness is read from the queues' consumers (see wait_ready).
        stack = Stack(
            self.url,
            self.data_dir,
            env,
            log_level="WARNING",
            own_session=True,
            die_with_parent=True,
        )
        options = {"inventory": ("--stock", f"{self.sku}={self.stock}")}
        for name in self.names("orchestrator", self.orchestrators):
            self._start(stack, name, "orchestrator", "run")
        for participant in PARTICIPANTS:
            for name in self.names(participant, self.replicas):
                argv = ("workers", "run", participant, *options.get(participant, ()))
                self._start(stack, name, *argv)

    @staticmethod
    def names(role: str, count: int) -> list[str]:
        """Process names of a role: the role itself when alone, else role-1, role-2, ..."""
        return [role] if count == 1 else [f"{role}-{i}" for i in range(1, count + 1)]

    def _start(self, stack: Stack, name: str, *argv: str) -> None:
        assert self.data_dir is not None
        env = {}
        if self.orchestrators > 1 or self.replicas > 1:
            (self.data_dir / name).mkdir()
            env["SAGA_DATA_DIR"] = str(self.data_dir / name)
        self.processes.add(stack.process(name, *argv, **env).start())

    def _create_database(self, url: str) -> str:
        self.database = f"saga_bench_{uuid.uuid4().hex[:12]}"
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as db:
                db.execute(f"CREATE DATABASE {self.database}")
        except psycopg.Error as exc:
            self.database = None
            raise BenchError(f"cannot make the bench's database on {url}: {exc}") from exc
        return urlunsplit(urlsplit(url)._replace(path=f"/{self.database}"))

    def pids(self) -> dict[str, int]:
        return self.processes.pids()

    def check_alive(self) -> None:
        exited = self.processes.exited()
        if exited is not None:
            name, code = exited
            raise BenchError(
                f"{name} exited with code {code} during the bench:\n" + self.log_tail(name)
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        return self.processes.log_tail(name, lines)

    def stop(self, *, failed: bool = False) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 10 s); idempotent."""
        self.processes.stop(10)
        if self.database is not None and self.postgres_url:
            with psycopg.connect(self.postgres_url, autocommit=True) as db:
                db.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
            self.database = None
        if self.data_dir is not None and self.data_dir.exists():
            if self.keep_data or failed:
                print(f"bench: services' data and logs kept in {self.data_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


def role(name: str) -> str:
    """The role of a process name: orchestrator-2 -> orchestrator."""
    return name.split("-")[0]

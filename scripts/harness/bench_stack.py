"""--start-stack: the orchestrator and the three participants, started by the harness."""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from scripts.harness.bench_common import SERVICES, BenchError
from scripts.harness.processes import Processes
from scripts.harness.stack import Stack


@dataclass
class BenchStack:
    """The services as separate processes in a new data directory, logging warnings only."""

    url: str
    sku: str
    stock: int
    parent_dir: Path | None
    keep_data: bool
    data_dir: Path | None = None
    processes: Processes = field(default_factory=Processes)

    def start(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="saga-bench-", dir=self.parent_dir))
        # Its own session (Ctrl-C reaches the bench, which stops them) and SIGTERMed should
        # the bench die; readiness is read from the queues' consumers (see wait_ready).
        stack = Stack(
            self.url, self.data_dir, log_level="WARNING", own_session=True, die_with_parent=True
        )
        options = {"inventory": ("--stock", f"{self.sku}={self.stock}")}
        for name in SERVICES:
            argv = ("orchestrator", "run") if name == "orchestrator" else ("workers", "run", name)
            self.processes.add(stack.process(name, *argv, *options.get(name, ())).start())

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
        if self.data_dir is not None and self.data_dir.exists():
            if self.keep_data or failed:
                print(f"bench: services' data and logs kept in {self.data_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

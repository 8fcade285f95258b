"""Child processes of a bench run: started with their output in log files, stopped for sure.

Shared by bench.py (the saga stack) and bench_limit.py (the pass-through stack).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the bench dies without stopping us."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Children:
    """Named child processes, each logging to ``log_dir/<name>.log``."""

    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path | None = None
    ) -> None:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops them
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its exit code; None while all run."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                return name, process.returncode
        return None

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "  (no log)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(f"  {line}" for line in tail) or "  (its log is empty)"

    def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; idempotent."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(grace_s)
        self.processes.clear()

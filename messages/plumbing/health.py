"""Liveness: each service says in a small file whether it is connected and consuming.

The service rewrites ``<data dir>/<name>.health`` every few seconds; `saga health` and
`python -m workers health` read it, so compose (or any supervisor) can tell a service that
is up from one that merely runs. A file that has not been rewritten lately means the process
is gone or its event loop is stuck: that is unhealthy too.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

INTERVAL_S = 2.0
STALE_AFTER_S = 3 * INTERVAL_S + 1


def path(data_dir: Path, name: str) -> Path:
    """Where the process called ``name`` (orchestrator, inventory, all, ...) reports."""
    return data_dir / f"{name}.health"


class Health:
    """What one process reports about itself."""

    def __init__(self, path: Path, expected: Sequence[str]) -> None:
        self.path = path
        self.expected = sorted(expected)
        self.consuming: list[str] = []
        self.problem = "starting"

    def up(self, consuming: Sequence[str]) -> None:
        self.consuming = sorted(consuming)
        missing = sorted(set(self.expected) - set(self.consuming))
        self.problem = f"not consuming {', '.join(missing)}" if missing else ""
        self.write()

    def down(self, why: str) -> None:
        self.consuming = []
        self.problem = why
        self.write()

    def write(self) -> None:
        report = {
            "pid": os.getpid(),
            "healthy": not self.problem,
            "problem": self.problem,
            "consuming": self.consuming,
            "expected": self.expected,
            "at": time.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(self.path)  # readers never see half a file

    async def run(self) -> None:
        """Rewrite the file every INTERVAL_S until cancelled, then remove it."""
        try:
            while True:
                self.write()
                await asyncio.sleep(INTERVAL_S)
        finally:
            self.path.unlink(missing_ok=True)


def check(path: Path, now: float | None = None) -> str | None:
    """None if the service behind ``path`` is connected and consuming, else why not."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no {path}: the service is not running (or uses another SAGA_DATA_DIR)"
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read: {exc}"
    age = (now or time.time()) - float(report.get("at", 0))
    if age > STALE_AFTER_S:
        return f"no report for {age:.0f}s: the service (pid {report.get('pid')}) is gone or hung"
    if not report.get("healthy"):
        return str(report.get("problem") or "unhealthy")
    return None

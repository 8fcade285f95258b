"""What the machine and each process used: CPU, memory, load, where the data lives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from scripts.harness.bench_client import (
    Progress,
)
from scripts.harness.processes import ROOT

# --- machine and processes ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def source_info() -> dict[str, Any]:
    """Which code ran: the checkout's commit, and whether tracked files differ from it."""
    info: dict[str, Any] = {"root": str(ROOT), "git_commit": None, "git_dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty"] = bool(dirty.stdout.strip())
    return info


def filesystem_of(path: Path) -> str | None:
    """The filesystem type ``path`` lives on (ext4, tmpfs...), from /proc/mounts."""
    best, kind = "", None
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process, in KiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    return None


def postgres_cpu_seconds() -> float:
    """CPU time of the machine's PostgreSQL processes so far (their command name is postgres).

    Backends of connections made since are counted whole, which is right for a difference
    over the measurement; one that exits during it takes its time along, so this errs low.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if stat.read_text().strip() == "postgres":
                total += cpu_seconds(int(stat.parent.name)) or 0.0
    return total


def machine_ticks() -> dict[str, int] | None:
    """Jiffies all CPUs spent per state since boot (/proc/stat), to see what else ran."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        return dict(zip(names, map(int, fields), strict=True))
    return None


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def machine_load(
    before: dict[str, int] | None,
    after: dict[str, int] | None,
    elapsed: float,
    cores: dict[str, float],
) -> dict[str, Any]:
    """How busy the whole machine was, and how much of that was not this bench's processes."""
    load: dict[str, Any] = {"loadavg_end": loadavg()}
    if before is None or after is None or elapsed <= 0:
        return load
    delta = {k: (after[k] - before[k]) / _TICKS / elapsed for k in after}
    busy = sum(delta.values()) - delta["idle"] - delta["iowait"]
    ours = sum(v for k, v in cores.items() if k != "rabbitmq")
    load.update(
        busy_cores=round(busy, 2),
        bench_and_stack_cores=round(ours, 2),
        rabbitmq_cores=round(cores.get("rabbitmq", 0.0), 2),
        other_cores=round(max(0.0, busy - ours - cores.get("rabbitmq", 0.0)), 2),
        steal_cores=round(delta["steal"], 2),
        iowait_cores=round(delta["iowait"], 2),
    )
    return load


def local_broker_pid(url: str) -> int | None:
    """The pid of the Erlang VM, when the broker runs on this machine."""
    if URL(url).host not in ("localhost", "127.0.0.1", "::1"):
        return None
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == "beam.smp":
                        return int(entry.name)
    return None


@dataclass
class Watch:
    """Samples the orchestrator's RSS while the bench runs; reads CPU time around it."""

    pids: dict[str, int]
    progress: Progress
    postgres: bool = False  # also the local PostgreSQL's CPU (the stack's store)
    trace_every_s: float = 5.0
    rss_max: int = 0
    trace: list[tuple[float, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def cpu(self) -> dict[str, float | None]:
        times: dict[str, float | None] = {n: cpu_seconds(p) for n, p in self.pids.items()}
        times["bench"] = time.process_time()
        if self.postgres:
            times["postgresql"] = postgres_cpu_seconds()
        return times

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        pid = self.pids.get("orchestrator", self.pids.get("orchestrator-1"))  # the first
        started = time.perf_counter()
        next_trace = started
        while pid is not None:
            rss = rss_kib(pid) or 0
            self.rss_max = max(self.rss_max, rss)
            now = time.perf_counter()
            if now >= next_trace:
                self.trace.append((round(now - started, 1), rss, self.progress.done))
                next_trace += self.trace_every_s
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

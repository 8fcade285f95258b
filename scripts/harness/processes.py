"""Child processes started the way a user starts them, with their output in a log file.

One class, `Process`, is what the tests, the soak and the bench start; `Processes` is a named
group of them that stops for sure.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a child to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessError(Exception):
    """Raised when a child exits or stays silent where it should be ready."""


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if our process dies without stopping it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Process:
    """One child process; its output (stdout and stderr) is appended to ``log``."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    log: Path
    cwd: Path = ROOT
    own_session: bool = False  # True: a Ctrl-C reaches only us, and we stop the child
    # SIGTERM the child when we die. preexec_fn is not safe while other threads run: only
    # for callers that start children from one thread.
    die_with_parent: bool = False
    popen: subprocess.Popen[bytes] | None = None
    log_offset: int = 0  # where the current run's output starts in ``log``

    @classmethod
    def python(
        cls,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        log: Path,
        own_session: bool = False,
        die_with_parent: bool = False,
    ) -> Process:
        """``python -m argv...`` with this interpreter."""
        argv = (sys.executable, "-m", *argv)
        return cls(name, argv, env, log, own_session=own_session, die_with_parent=die_with_parent)

    def start(self) -> Process:
        """Start (or start again) the process; returns self."""
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        pdeathsig = self.die_with_parent and sys.platform == "linux"
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                list(self.argv),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
                preexec_fn=die_with_parent if pdeathsig else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs (or was never started)."""
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self, since_start: bool = False) -> str:
        """Everything in the log, or only what the current run wrote."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(self.log_offset if since_start else 0)
            return log.read().decode(errors="replace")

    def tail(self, lines: int = 15, indent: str = "") -> str:
        """The last lines of the log, for an error message."""
        tail = self.output().strip().splitlines()[-lines:]
        return "\n".join(f"{indent}{line}" for line in tail)

    def wait_for_log(
        self, text: str, timeout: float = READY_TIMEOUT_S, since_start: bool = True
    ) -> None:
        """Until the current run (or any run) logs ``text``; ProcessError if it exits or hangs."""
        self.wait_until(lambda: text in self.output(since_start), f"logged {text!r}", timeout)

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        """Until ``done()``; ProcessError with the log if it exits first, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            if not self.running():
                raise ProcessError(f"{self.name} exited ({self.poll()}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} never {what}:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up, no flush, like a crash. Does not wait."""
        if self.popen is not None:
            self.popen.send_signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: alive, connected, and silent, like a process hung on a lock. Does not wait."""
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen process goes on where it stopped."""
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM, if it runs. Does not wait."""
        if self.running():
            assert self.popen is not None
            self.popen.terminate()

    def wait(self, timeout: float) -> int:
        """Its exit code, once it exits; TimeoutExpired after ``timeout``."""
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.wait(timeout)

    def wait_stopped(self, grace_s: float = 10.0) -> None:
        """Wait for it to exit; SIGKILL after ``grace_s``."""
        if self.popen is None:
            return
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(grace_s)


@dataclass
class Processes:
    """Named child processes, stopped together."""

    items: dict[str, Process] = field(default_factory=dict)

    def add(self, process: Process) -> Process:
        self.items[process.name] = process
        return process

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.items.items()}

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its exit code; None while all run."""
        for name, process in self.items.items():
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def log_tail(self, name: str, lines: int = 15) -> str:
        process = self.items.get(name)
        tail = process.tail(lines, indent="  ") if process else ""
        return tail or "  (its log is empty)"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM all, then SIGKILL what is left after ``grace_s``; idempotent."""
        for process in self.items.values():
            process.terminate()
        for process in self.items.values():
            process.wait_stopped(grace_s)
        self.items.clear()

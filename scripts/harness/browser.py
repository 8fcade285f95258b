"""The console in a real browser: `saga web` started as a process, chromium driven by Playwright.

The browser tests and scripts/console_screenshots.py start both the same way. The browser is
Debian's chromium: `playwright install` downloads its own, which a closed network cannot.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, Playwright

from scripts.harness.processes import READY_TIMEOUT_S, Process, free_port
from scripts.harness.stack import Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",  # root in a container: no user namespaces for the sandbox
    "--disable-gpu",
    # Chromium's own traffic (updates, sync, QUIC probes) is refused by a closed network,
    # and without these its connections to the console are refused too.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
INSTALL_HINT = (
    "install Debian's: apt-get install chromium (.ci/run does); "
    "not `playwright install`, which downloads a browser"
)
# Straight to 127.0.0.1, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BrowserError(Exception):
    """Raised when there is no chromium to launch."""


def chromium_problem() -> str | None:
    """Why chromium cannot be launched here, in one line; None when it can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM}: {INSTALL_HINT}"
    return None


def launch(playwright: Playwright) -> Browser:
    """Headless chromium with the flags this machine needs."""
    problem = chromium_problem()
    if problem:
        raise BrowserError(problem)
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS)
    )


@dataclass(frozen=True)
class Console:
    """A running `saga web`: its process, and where it answers."""

    process: Process
    url: str

    def at(self, path: str) -> str:
        return self.url + path


def start_console(
    stack: Stack,
    name: str = "web",
    operators: Mapping[str, str] | None = None,
    **env: str,
) -> Console:
    """`python -m orchestrator web` on a free port of 127.0.0.1, once /healthz says ok.

    ``operators``: name -> password (SAGA_WEB_OPERATORS); none makes a read-only console.
    The store must exist: start the orchestrator first.
    """
    port = free_port()
    process = stack.start(
        name,
        "orchestrator",
        "web",
        ready=None,
        SAGA_WEB_HOST="127.0.0.1",
        SAGA_WEB_PORT=str(port),
        SAGA_WEB_OPERATORS=json.dumps(dict(operators or {})),
        **env,
    )
    console = Console(process, f"http://127.0.0.1:{port}")
    wait_healthy(console)
    return console


def wait_healthy(console: Console, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the console's /healthz answers 200; ProcessError if it exits or never does."""
    healthz = console.at("/healthz")
    console.process.wait_until(lambda: _healthy(healthz), f"said ok at {healthz}", timeout)


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # refused while it starts; urllib's HTTPError (503) is an OSError too
        return False

"""Running a long-lived service process: stop cleanly on SIGTERM (docker stop) or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import uvloop

from messages.errors import UnavailableError

log = logging.getLogger(__name__)

EX_UNAVAILABLE = 69  # sysexits.h: a service this one needs is not there


def run_service(main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` until it ends or a stop signal arrives; return the exit code."""

    async def wrapper() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        await main

    try:
        # uvloop: the same asyncio, with its I/O loop in C; aio-pika spends much of its time there.
        uvloop.run(wrapper())
    except asyncio.CancelledError:
        log.info("stopped")
    except UnavailableError as exc:
        # Exit rather than hang: the supervisor (compose, systemd) restarts us.
        log.error("giving up: %s", exc)
        return EX_UNAVAILABLE
    return 0


async def run_all(coroutines: dict[str, Coroutine[Any, Any, None]]) -> None:
    """Run these together until one ends or fails; then stop the rest and raise its error."""
    tasks = [asyncio.create_task(c, name=name) for name, c in coroutines.items()]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises its error, if it had one
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""What every route of the console shares: the Console (settings, store, steering,
templates), reading the store in threads, pages, refusals and live updates.

Pages are rendered on the server. Live parts of a page (the list, a saga, the overview) are
fed by server-sent events: the server reads the store again every SAGA_WEB_REFRESH_S and
sends the part anew when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from markupsafe import escape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from messages.contract.models import (
    Envelope,
    OperatorAction,
    SagaStatus,
)
from messages.errors import SagaError, SagaNotFoundError
from messages.plumbing.management import ManagementApi
from messages.plumbing.timeline import format_offset
from orchestrator.engine import SagaState
from orchestrator.report import age, current_step, describe, seconds_text
from orchestrator.runtime import definition_from
from orchestrator.settings import WebSettings
from orchestrator.steer import send_action
from orchestrator.store import SagaStore
from orchestrator.web import auth

HERE = Path(__file__).parent
T = TypeVar("T")

# Sends an operator action and waits for what the orchestrator answers (None: nothing in
# time). Blocking: the app runs it in a thread.
Steer = Callable[[OperatorAction], Envelope | None]

STEER_WAIT_S = 5.0
MAX_STREAMS = 64  # live pages open at once: each reads the store every SAGA_WEB_REFRESH_S


def broker_steer(settings: WebSettings) -> Steer:
    """Send actions over RabbitMQ as `saga abort` and `saga retry` do; wait for the answer."""

    def steer(action: OperatorAction) -> Envelope | None:
        return send_action(settings.amqp_url, settings.ca_file, action, STEER_WAIT_S)

    return steer


class Console:
    """What the routes share: settings, the store (read in threads), the broker's edges."""

    def __init__(
        self,
        settings: WebSettings,
        store: SagaStore,
        steer: Steer,
        management: ManagementApi | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.steer = steer
        self.management = management
        self.operators = auth.Operators(settings.web_operators)
        self.stopping = asyncio.Event()  # set on SIGTERM/SIGINT: live streams end
        self.streams = 0  # live pages open now
        self.definition = definition_from(settings)
        # SQLite: one connection, so one reader at a time; PostgreSQL reads from a pool.
        self._reading: AbstractContextManager[Any] = (
            contextlib.nullcontext() if store.shared else threading.Lock()
        )
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.globals.update(
            offset=_offset,
            seconds_text=seconds_text,
            current_step=current_step,
            age=age,
            states=[s for s in SagaStatus if s is not SagaStatus.QUARANTINED],
        )

    async def read(self, function: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._reading:
                return function(*args)

        return await run_in_threadpool(locked)

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A whole page: the template with who is signed in and any message for them."""
        body = self.render(
            name,
            request=request,
            operator=self.operators.signed_in(request.session),
            read_only=not self.operators.configured,
            csrf=auth.csrf_token(request.session),
            flash=request.session.pop("flash", None),
            refresh_s=self.settings.web_refresh_s,
            **context,
        )
        return HTMLResponse(body, status)

    def describe(self, state: SagaState) -> str:
        return describe(state, self.definition)


def _offset(seconds: float) -> str:
    value, unit = format_offset(seconds)
    return f"{value} {unit}"


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def utcnow() -> datetime:
    return datetime.now(UTC)


def forbidden(console: Console, request: Request, why: str) -> Response:
    return console.page(request, "missing.html", 403, error=why)


# --- plumbing ----------------------------------------------------------------------------------


def live(request: Request, render: Callable[[], Awaitable[str]], every_s: float) -> Response:
    """Server-sent events: ``render()`` again every ``every_s``, sent when it changed.

    A stream ends when its client goes, or at once when the console is told to stop (the
    browser reconnects to whichever console answers next).
    """
    console = console_of(request)
    stopping = console.stopping
    if console.streams >= MAX_STREAMS:
        return PlainTextResponse(f"{MAX_STREAMS} live pages are open already", 503)
    console.streams += 1  # here, not in events(): the next request may come before it runs

    async def events() -> AsyncIterator[str]:
        try:
            async for event in changes():
                yield event
        finally:
            console.streams -= 1

    async def changes() -> AsyncIterator[str]:
        last = None
        yield "retry: 2000\n\n"
        while not stopping.is_set() and not await request.is_disconnected():
            try:
                html = await render()
            except SagaNotFoundError:
                return
            except (SagaError, sqlite3.Error) as exc:  # the store is out of reach: say so
                html = f'<p class="error">cannot read the store: {escape(exc)}</p>'
            if html != last:
                last = html
                yield "".join(f"data: {line}\n" for line in html.splitlines() or [""]) + "\n"
            else:
                yield ": still here\n\n"  # keeps proxies from closing an idle stream
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), every_s)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

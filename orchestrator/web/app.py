"""`saga web`: the console's routes put together, served by uvicorn.

The routes are in pages.py (reading) and steering.py (signing in, acting); what they share
is in console.py.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import secrets
import socket
import sqlite3
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from messages.errors import SagaError
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import redact
from orchestrator.settings import WebSettings
from orchestrator.store import SagaStore, open_store
from orchestrator.web import pages, steering
from orchestrator.web.console import HERE, Console, Steer, broker_steer, console_of

log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    console = console_of(request)
    try:
        await console.read(console.store.counts)
    except (SagaError, sqlite3.Error) as exc:
        return PlainTextResponse(f"cannot read the store: {exc}", 503)
    return PlainTextResponse("ok")


async def unavailable(request: Request, exc: Exception) -> Response:
    """The store (or the broker) did not answer: say so, and let the page be reloaded."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    why = f"cannot read the store right now: {exc}"
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": why}, 503)
    return console_of(request).page(request, "missing.html", 503, error=why)


async def home(request: Request) -> Response:
    return RedirectResponse("/sagas", 303)


class SecurityHeaders:
    """No framing (clickjacking of the action buttons), no scripts but our own file."""

    HEADERS = (
        (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'"),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(
    settings: WebSettings,
    store: SagaStore,
    steer: Steer | None = None,
    management: ManagementApi | None = None,
) -> Starlette:
    """The console over ``store``; actions through ``steer`` (the broker by default)."""
    secret = settings.web_secret.get_secret_value() if settings.web_secret else None
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=secret or secrets.token_urlsafe(32),
            session_cookie="saga_console",
            max_age=8 * 3600,
            same_site="strict",
        ),
    ]
    routes = [
        Route("/", home),
        Route("/healthz", healthz),
        Route("/sagas", pages.sagas_page),
        Route("/sagas/stream", pages.sagas_stream),
        Route("/sagas/{saga_id}", pages.saga_page),
        Route("/sagas/{saga_id}/stream", pages.saga_stream),
        Route("/sagas/{saga_id}/{action}", steering.act, methods=["POST"]),
        Route("/overview", pages.overview_page),
        Route("/overview/stream", pages.overview_stream),
        Route("/dead-letters/{queue}", pages.dead_letters_page),
        Route("/api/sagas", pages.sagas_json),
        Route("/api/sagas/{saga_id}", pages.saga_json),
        Route("/api/overview", pages.overview_json),
        Route("/login", steering.login_page),
        Route("/login", steering.login, methods=["POST"]),
        Route("/logout", steering.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={SagaError: unavailable, sqlite3.Error: unavailable},
    )
    app.state.console = Console(settings, store, steer or broker_steer(settings), management)
    return app


def management_for(settings: WebSettings) -> ManagementApi:
    return ManagementApi.for_amqp_url(settings.amqp_url, settings.management_url)


class _Server(uvicorn.Server):
    """uvicorn waits for open responses before it stops: tell the live streams to end."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()  # the signal arrives on the event loop's own thread
        super().handle_exit(sig, frame)


def serve(settings: WebSettings) -> int:
    """Serve the console until interrupted; the store is opened read-only."""
    store = open_store(settings, readonly=True, live=True)
    try:
        app = create_app(settings, store, management=management_for(settings))
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        operators = ", ".join(settings.web_operators) or "none: read-only"
        log.info(
            "console on http://%s:%d/ (run by %s; operators: %s; broker %s)",
            settings.web_host,
            settings.web_port,
            who,
            operators,
            redact(settings.amqp_url),
        )
        config = uvicorn.Config(
            app,
            host=settings.web_host,
            port=settings.web_port,
            log_config=None,  # our logging, configured by the CLI
            access_log=False,
            timeout_graceful_shutdown=2,  # live pages keep streams open
        )
        _Server(config, app.state.console.stopping).run()
    finally:
        store.close()
    return 0

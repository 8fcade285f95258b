"""`saga web`: the console's HTTP routes, over the store, the broker and the management API.

Pages are rendered on the server. Live parts of a page (the list, a saga, the overview) are
fed by server-sent events: the server reads the store again every SAGA_WEB_REFRESH_S and
sends the part anew when it changed. Actions go to the orchestrator as messages, like
`saga abort`; the console never writes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import secrets
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from uuid import UUID

import jinja2
import uvicorn
from markupsafe import escape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from messages.contract import topology
from messages.contract.models import (
    AbortSaga,
    ActionRefused,
    ActionTaken,
    Envelope,
    OperatorAction,
    RetrySaga,
    SagaStatus,
)
from messages.errors import ConfigurationError, InvalidQueryError, SagaError
from messages.plumbing import logs
from messages.plumbing.management import ManagementApi, vhost_of
from messages.plumbing.settings import redact
from messages.plumbing.timeline import format_offset
from orchestrator.definition import as_text
from orchestrator.engine import SagaState
from orchestrator.report import age, current_step, seconds_text, summary
from orchestrator.runtime import definition_from
from orchestrator.settings import WebSettings
from orchestrator.steer import send_action
from orchestrator.store import SagaFilter, SagaStore, open_store
from orchestrator.web import auth, views

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
T = TypeVar("T")

# Sends an operator action and waits for what the orchestrator answers (None: nothing in
# time). Blocking: the app runs it in a thread.
Steer = Callable[[OperatorAction], Envelope | None]

ACTIONS: dict[str, Callable[..., OperatorAction]] = {"abort": AbortSaga, "retry": RetrySaga}
OVERVIEW_MINUTES = 30
LATENCY_SAMPLE = 500  # newest sagas whose histories the step latencies are taken from
STEER_WAIT_S = 5.0
DLQ_PEEK = 20  # messages shown of a dead-letter queue
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
        self.definitions = {d.name: d for d in [definition_from(settings)]}
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
        definition = self.definitions.get(state.saga)
        return (definition.describe if definition else as_text)(state.input)


def _offset(seconds: float) -> str:
    value, unit = format_offset(seconds)
    return f"{value} {unit}"


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _now() -> datetime:
    return datetime.now(UTC)


# --- the list ----------------------------------------------------------------------------------


async def _list(request: Request) -> tuple[views.ListQuery, list[SagaState], bool]:
    console = _console(request)
    query = views.list_query(request.query_params, _now(), console.settings.stuck_after_s)
    offset = (query.page - 1) * views.PAGE_SIZE
    rows = await console.read(console.store.sagas, query.where, views.PAGE_SIZE + 1, offset)
    return query, rows[: views.PAGE_SIZE], len(rows) > views.PAGE_SIZE


def _rows(console: Console, query: views.ListQuery, sagas: list[SagaState], more: bool) -> str:
    return console.render(
        "_rows.html",
        sagas=sagas,
        query=query,
        more=more,
        now=_now(),
        stuck_after_s=console.settings.stuck_after_s,
        describe=console.describe,
    )


async def sagas_page(request: Request) -> Response:
    console = _console(request)
    try:
        query, sagas, more = await _list(request)
    except InvalidQueryError as exc:
        given = {name: request.query_params.get(name, "") for name in views.FILTERS}
        return console.page(request, "sagas.html", 400, error=str(exc), given=given, rows=None)
    rows = _rows(console, query, sagas, more)
    return console.page(
        request, "sagas.html", given=query.given, rows=rows, query=query, error=None
    )


async def sagas_json(request: Request) -> Response:
    console = _console(request)
    try:
        query, sagas, more = await _list(request)
    except InvalidQueryError as exc:
        return JSONResponse({"error": str(exc)}, 400)
    now, stuck_after_s = _now(), console.settings.stuck_after_s
    return JSONResponse(
        {
            "page": query.page,
            "more": more,
            "sagas": [summary(s, now, stuck_after_s) for s in sagas],
        }
    )


async def sagas_stream(request: Request) -> Response:
    console = _console(request)
    try:
        views.list_query(request.query_params, _now(), console.settings.stuck_after_s)
    except InvalidQueryError as exc:
        return PlainTextResponse(str(exc), 400)

    async def rows() -> str:
        return _rows(console, *await _list(request))

    return _stream(request, rows, console.settings.web_refresh_s)


# --- one saga ----------------------------------------------------------------------------------


async def _saga(request: Request) -> SagaState:
    console = _console(request)
    try:
        saga_id = UUID(request.path_params["saga_id"])
    except ValueError:
        raise _NotFound(f"{request.path_params['saga_id']!r} is not a saga id") from None
    state = await console.read(console.store.get, saga_id)
    if state is None:
        raise _NotFound(
            f"no saga {saga_id} in the store: the orchestrator has not started it "
            "(a request waits in orchestrator.requests until an orchestrator runs)"
        )
    return state


class _NotFound(Exception):
    pass


def _saga_body(console: Console, state: SagaState) -> str:
    now = _now()
    return console.render(
        "_saga.html",
        saga=state,
        description=console.describe(state),
        waterfall=views.waterfall(state.history, now),
        history_start=state.history[0].at if state.history else state.created_at,
        stuck_for=state.stuck_for(now, console.settings.stuck_after_s),
    )


async def saga_page(request: Request) -> Response:
    console = _console(request)
    try:
        state = await _saga(request)
    except _NotFound as exc:
        return console.page(request, "missing.html", 404, error=str(exc))
    return console.page(request, "saga.html", saga=state, body=_saga_body(console, state))


async def saga_json(request: Request) -> Response:
    try:
        state = await _saga(request)
    except _NotFound as exc:
        return JSONResponse({"error": str(exc)}, 404)
    return Response(state.model_dump_json(), media_type="application/json")


async def saga_stream(request: Request) -> Response:
    console = _console(request)
    try:
        await _saga(request)
    except _NotFound as exc:
        return PlainTextResponse(str(exc), 404)

    async def body() -> str:
        return _saga_body(console, await _saga(request))

    return _stream(request, body, console.settings.web_refresh_s)


# --- the overview ------------------------------------------------------------------------------


async def _overview(console: Console) -> dict[str, Any]:
    now = _now()
    store = console.store
    since = now - timedelta(minutes=OVERVIEW_MINUTES)
    per_minute = await console.read(store.finished_per_minute, since)
    counts = await console.read(store.counts)
    stuck_filter = SagaFilter(stuck_before=now - timedelta(seconds=console.settings.stuck_after_s))
    stuck = await console.read(store.sagas, stuck_filter, 20)
    sample = await console.read(store.sagas, SagaFilter(), LATENCY_SAMPLE)
    dead, dead_error = await _dead_letter_queues(console)
    return {
        "throughput": views.throughput(per_minute, now, OVERVIEW_MINUTES),
        "latencies": views.latencies(sample),
        "sampled": len(sample),
        "by_state": {s.value: counts.get(s.value, 0) for s in SagaStatus},
        "stuck": stuck,
        "stuck_count": await console.read(store.stuck, now, console.settings.stuck_after_s),
        "dead_letters": dead,
        "dead_letters_error": dead_error,
        "now": now,
    }


async def _dead_letter_queues(console: Console) -> tuple[list[views.DeadLetters], str | None]:
    """The dead-letter queues and their depth, or why the management API could not say."""
    if console.management is None:
        return [], "no management API configured (SAGA_MANAGEMENT_URL)"
    vhost = vhost_of(console.settings.amqp_url)
    try:
        queues = await run_in_threadpool(console.management.queues, vhost)
    except ConfigurationError as exc:
        return [], str(exc)
    return [
        views.DeadLetters(name, int(row.get("messages", 0) or 0))
        for name, row in sorted(queues.items())
        if name.endswith(topology.dead_letter_queue(""))
    ], None


def _overview_body(console: Console, data: dict[str, Any]) -> str:
    return console.render("_overview.html", **data, stuck_after_s=console.settings.stuck_after_s)


async def overview_page(request: Request) -> Response:
    console = _console(request)
    body = _overview_body(console, await _overview(console))
    return console.page(request, "overview.html", body=body)


async def overview_json(request: Request) -> Response:
    console = _console(request)
    data = await _overview(console)
    throughput = data["throughput"]
    return JSONResponse(
        {
            "throughput": {"minutes": throughput.minutes, "by_outcome": throughput.by_outcome},
            "latencies": [vars(row) for row in data["latencies"]],
            "sampled": data["sampled"],
            "by_state": data["by_state"],
            "stuck": data["stuck_count"],
            "dead_letters": {d.queue: d.messages for d in data["dead_letters"]},
            "dead_letters_error": data["dead_letters_error"],
        }
    )


async def overview_stream(request: Request) -> Response:
    console = _console(request)

    async def body() -> str:
        return _overview_body(console, await _overview(console))

    # The overview asks the management API too: not every second.
    return _stream(request, body, max(5.0, console.settings.web_refresh_s))


async def dead_letters_page(request: Request) -> Response:
    """The first messages of a dead-letter queue, for a signed-in operator.

    Only operators: the messages hold customers' data, and a look is not free: each one
    is returned to the queue, which a quorum queue may count towards its delivery limit.
    """
    console = _console(request)
    queue = request.path_params["queue"]
    if not queue.endswith(topology.dead_letter_queue("")) or console.management is None:
        return console.page(request, "missing.html", 404, error=f"no dead-letter queue {queue!r}")
    if console.operators.signed_in(request.session) is None:
        return _forbidden(console, request, "sign in as an operator to look into a queue")
    vhost = vhost_of(console.settings.amqp_url)
    try:
        row = (await run_in_threadpool(console.management.queues, vhost)).get(queue)
        if row is None:
            error = f"no dead-letter queue {queue!r}"
            return console.page(request, "missing.html", 404, error=error)
        raw = await run_in_threadpool(console.management.peek, vhost, queue, DLQ_PEEK)
    except ConfigurationError as exc:
        return console.page(request, "dead_letters.html", 502, queue=queue, error=str(exc))
    log.info("%s looked into %s", console.operators.signed_in(request.session), queue)
    return console.page(
        request,
        "dead_letters.html",
        queue=queue,
        quorum=row.get("type") == "quorum",
        messages=[views.dead_letter(m) for m in raw],
        error=None,
    )


# --- signing in and acting ---------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    next_page = _local(request.query_params.get("next", ""))
    return _console(request).page(request, "login.html", error=None, next_page=next_page)


async def login(request: Request) -> Response:
    console = _console(request)
    form = await request.form()
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return _forbidden(console, request, "the form has expired: reload the page and try again")
    if not console.operators.configured:
        return _forbidden(console, request, "no operators are configured: read-only console")
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    next_page = _local(str(form.get("next", "")))
    if not console.operators.check(name, password):
        log.warning("failed sign-in to the console as %r", name[:64])
        await asyncio.sleep(1.0)  # slows guessing down
        error = "wrong name or password"
        return console.page(request, "login.html", 401, error=error, next_page=next_page)
    console.operators.sign_in(request.session, name)
    log.info("operator %s signed in to the console", name)
    return RedirectResponse(next_page or "/sagas", 303)


async def logout(request: Request) -> Response:
    form = await request.form()
    if auth.csrf_ok(request.session, form.get("csrf")):
        auth.sign_out(request.session)
    return RedirectResponse("/sagas", 303)


async def act(request: Request) -> Response:
    """Abort or retry a saga for the signed-in operator, with their reason."""
    console = _console(request)
    form = await request.form()
    operator = console.operators.signed_in(request.session)
    if not console.operators.configured:
        return _forbidden(console, request, "read-only console: no operators are configured")
    if operator is None:
        return _forbidden(console, request, "sign in as an operator to act on sagas")
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return _forbidden(console, request, "the form has expired: reload the page and try again")
    try:
        state = await _saga(request)
    except _NotFound as exc:
        return console.page(request, "missing.html", 404, error=str(exc))
    kind = ACTIONS.get(request.path_params["action"])
    reason = str(form.get("reason", "")).strip()
    if kind is None:
        return console.page(request, "missing.html", 404, error="no such action")
    if not reason or len(reason) > 500:
        request.session["flash"] = ("error", "say why, in 1 to 500 characters")
        return RedirectResponse(f"/sagas/{state.saga_id}", 303)
    action = kind(saga_id=state.saga_id, reason=reason, requested_by=f"{operator} (web console)")
    with logs.saga_context(state.saga_id):
        log.info("%s requested by %s from the console: %s", action.type, operator, reason)
        try:
            answer = await run_in_threadpool(console.steer, action)
        except SagaError as exc:
            log.warning("%s not sent: %s", action.type, exc)
            request.session["flash"] = ("error", f"{action.type} not sent: {exc}")
            return RedirectResponse(f"/sagas/{state.saga_id}", 303)
    request.session["flash"] = _outcome(action, answer)
    return RedirectResponse(f"/sagas/{state.saga_id}", 303)


def _outcome(action: OperatorAction, answer: Envelope | None) -> tuple[str, str]:
    if isinstance(answer, ActionRefused):
        return "error", f"{action.type} refused: {answer.detail}"
    if isinstance(answer, ActionTaken):
        return "ok", f"{action.type} taken: {answer.detail}"
    return "error", (
        f"{action.type} sent, but the orchestrator has not answered in {STEER_WAIT_S:g}s: "
        "it acts on it when it runs; this page shows what happens"
    )


def _forbidden(console: Console, request: Request, why: str) -> Response:
    return console.page(request, "missing.html", 403, error=why)


def _local(path: str) -> str:
    """A path on this console to go back to after signing in; nothing that leaves it."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return ""  # "//host" and "/\\host" are other sites to a browser
    return path if path.isprintable() else ""


# --- plumbing ----------------------------------------------------------------------------------


def _stream(request: Request, render: Callable[[], Awaitable[str]], every_s: float) -> Response:
    """Server-sent events: ``render()`` again every ``every_s``, sent when it changed.

    A stream ends when its client goes, or at once when the console is told to stop (the
    browser reconnects to whichever console answers next).
    """
    console = _console(request)
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
            except _NotFound:
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


async def healthz(request: Request) -> Response:
    console = _console(request)
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
    return _console(request).page(request, "missing.html", 503, error=why)


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
        Route("/sagas", sagas_page),
        Route("/sagas/stream", sagas_stream),
        Route("/sagas/{saga_id}", saga_page),
        Route("/sagas/{saga_id}/stream", saga_stream),
        Route("/sagas/{saga_id}/{action}", act, methods=["POST"]),
        Route("/overview", overview_page),
        Route("/overview/stream", overview_stream),
        Route("/dead-letters/{queue}", dead_letters_page),
        Route("/api/sagas", sagas_json),
        Route("/api/sagas/{saga_id}", saga_json),
        Route("/api/overview", overview_json),
        Route("/login", login_page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
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

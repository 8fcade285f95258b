"""Signing operators in and out, and the actions they take: abort and retry.

Actions go to the orchestrator as messages, like `saga abort`; the console never writes the
store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    RedirectResponse,
    Response,
)

from messages.contract.models import (
    AbortSaga,
    ActionRefused,
    ActionTaken,
    Envelope,
    OperatorAction,
    RetrySaga,
)
from messages.errors import SagaError, SagaNotFoundError
from messages.plumbing import logs
from orchestrator.web import auth
from orchestrator.web.console import STEER_WAIT_S, console_of, forbidden
from orchestrator.web.pages import read_saga

ACTIONS: dict[str, Callable[..., OperatorAction]] = {"abort": AbortSaga, "retry": RetrySaga}

log = logging.getLogger(__name__)


# --- signing in and acting ---------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    next_page = _local(request.query_params.get("next", ""))
    return console_of(request).page(request, "login.html", error=None, next_page=next_page)


async def login(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return forbidden(console, request, "the form has expired: reload the page and try again")
    if not console.operators.configured:
        return forbidden(console, request, "no operators are configured: read-only console")
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
    console = console_of(request)
    form = await request.form()
    operator = console.operators.signed_in(request.session)
    if not console.operators.configured:
        return forbidden(console, request, "read-only console: no operators are configured")
    if operator is None:
        return forbidden(console, request, "sign in as an operator to act on sagas")
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return forbidden(console, request, "the form has expired: reload the page and try again")
    try:
        state = await read_saga(request)
    except SagaNotFoundError as exc:
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


def _local(path: str) -> str:
    """A path on this console to go back to after signing in; nothing that leaves it."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return ""  # "//host" and "/\\host" are other sites to a browser
    return path if path.isprintable() else ""

"""The console's reading pages: the sagas list, one saga, the overview, dead letters."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
)

from messages.contract import topology
from messages.contract.models import (
    SagaStatus,
)
from messages.errors import ConfigurationError, InvalidQueryError, SagaNotFoundError
from messages.plumbing.management import vhost_of
from orchestrator.engine import SagaState
from orchestrator.report import summary
from orchestrator.store import SagaFilter
from orchestrator.web import views
from orchestrator.web.console import (
    Console,
    console_of,
    forbidden,
    live,
    utcnow,
)

OVERVIEW_MINUTES = 30
LATENCY_SAMPLE = 500  # newest sagas whose histories the step latencies are taken from
DLQ_PEEK = 20  # messages shown of a dead-letter queue

log = logging.getLogger(__name__)


# --- the list ----------------------------------------------------------------------------------


async def _list(request: Request) -> tuple[views.ListQuery, list[SagaState], bool]:
    console = console_of(request)
    query = views.list_query(request.query_params, utcnow(), console.settings.stuck_after_s)
    offset = (query.page - 1) * views.PAGE_SIZE
    rows = await console.read(console.store.sagas, query.where, views.PAGE_SIZE + 1, offset)
    return query, rows[: views.PAGE_SIZE], len(rows) > views.PAGE_SIZE


def _rows(console: Console, query: views.ListQuery, sagas: list[SagaState], more: bool) -> str:
    return console.render(
        "_rows.html",
        sagas=sagas,
        query=query,
        more=more,
        now=utcnow(),
        stuck_after_s=console.settings.stuck_after_s,
        describe=console.describe,
    )


async def sagas_page(request: Request) -> Response:
    console = console_of(request)
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
    console = console_of(request)
    try:
        query, sagas, more = await _list(request)
    except InvalidQueryError as exc:
        return JSONResponse({"error": str(exc)}, 400)
    now, stuck_after_s = utcnow(), console.settings.stuck_after_s
    return JSONResponse(
        {
            "page": query.page,
            "more": more,
            "sagas": [summary(s, now, stuck_after_s) for s in sagas],
        }
    )


async def sagas_stream(request: Request) -> Response:
    console = console_of(request)
    try:
        views.list_query(request.query_params, utcnow(), console.settings.stuck_after_s)
    except InvalidQueryError as exc:
        return PlainTextResponse(str(exc), 400)

    async def rows() -> str:
        return _rows(console, *await _list(request))

    return live(request, rows, console.settings.web_refresh_s)


# --- one saga ----------------------------------------------------------------------------------


async def read_saga(request: Request) -> SagaState:
    console = console_of(request)
    try:
        saga_id = UUID(request.path_params["saga_id"])
    except ValueError:
        raise SagaNotFoundError(f"{request.path_params['saga_id']!r} is not a saga id") from None
    state = await console.read(console.store.get, saga_id)
    if state is None:
        raise SagaNotFoundError(
            f"no saga {saga_id} in the store: the orchestrator has not started it "
            "(a request waits in orchestrator.requests until an orchestrator runs)"
        )
    return state


def _saga_body(console: Console, state: SagaState) -> str:
    now = utcnow()
    return console.render(
        "_saga.html",
        saga=state,
        description=console.describe(state),
        waterfall=views.waterfall(state.history, now),
        history_start=state.history[0].at if state.history else state.created_at,
        stuck_for=state.stuck_for(now, console.settings.stuck_after_s),
    )


async def saga_page(request: Request) -> Response:
    console = console_of(request)
    try:
        state = await read_saga(request)
    except SagaNotFoundError as exc:
        return console.page(request, "missing.html", 404, error=str(exc))
    return console.page(request, "saga.html", saga=state, body=_saga_body(console, state))


async def saga_json(request: Request) -> Response:
    try:
        state = await read_saga(request)
    except SagaNotFoundError as exc:
        return JSONResponse({"error": str(exc)}, 404)
    return Response(state.model_dump_json(), media_type="application/json")


async def saga_stream(request: Request) -> Response:
    console = console_of(request)
    try:
        await read_saga(request)
    except SagaNotFoundError as exc:
        return PlainTextResponse(str(exc), 404)

    async def body() -> str:
        return _saga_body(console, await read_saga(request))

    return live(request, body, console.settings.web_refresh_s)


# --- the overview ------------------------------------------------------------------------------


async def _overview(console: Console) -> dict[str, Any]:
    now = utcnow()
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
    console = console_of(request)
    body = _overview_body(console, await _overview(console))
    return console.page(request, "overview.html", body=body)


async def overview_json(request: Request) -> Response:
    console = console_of(request)
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
    console = console_of(request)

    async def body() -> str:
        return _overview_body(console, await _overview(console))

    # The overview asks the management API too: not every second.
    return live(request, body, max(5.0, console.settings.web_refresh_s))


async def dead_letters_page(request: Request) -> Response:
    """The first messages of a dead-letter queue, for a signed-in operator.

    Only operators: the messages hold customers' data, and a look is not free: each one
    is returned to the queue, which a quorum queue may count towards its delivery limit.
    """
    console = console_of(request)
    queue = request.path_params["queue"]
    if not queue.endswith(topology.dead_letter_queue("")) or console.management is None:
        return console.page(request, "missing.html", 404, error=f"no dead-letter queue {queue!r}")
    if console.operators.signed_in(request.session) is None:
        return forbidden(console, request, "sign in as an operator to look into a queue")
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

"""`saga web` as a real process beside a real stack: live updates, dead letters, steering.

The browser test drives the same console through Chromium; this one speaks HTTP to it, to
check what a browser cannot show plainly: the event stream itself, the dead-letter queue
left as it was after a look, and a refusal that comes back from the real orchestrator.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from messages.contract import topology
from scripts.harness.browser import start_console
from tests.integration.stack import Stack, amqp_channel, send

pytestmark = pytest.mark.broker

OPERATOR = {"alice": "correct-horse"}


@pytest.fixture
def console(stack: Stack) -> Iterator[httpx2.Client]:
    stack.orchestrator()
    stack.worker("all", "--stock", "item-1=50")
    web = start_console(stack, operators=OPERATOR, SAGA_WEB_REFRESH_S="0.2")
    with httpx2.Client(base_url=web.url, timeout=10) as client:
        yield client


def order(stack: Stack, amount: str = "5.00") -> dict[str, Any]:
    _, result = stack.place_order(
        "--customer", "c-1", "--sku", "item-1", "--qty", "1", "--amount", amount
    )
    return result


def event_with(client: httpx2.Client, path: str, text: str, timeout: float = 10.0) -> str:
    """The first server-sent event of ``path`` that contains ``text``."""
    deadline = time.monotonic() + timeout
    with client.stream("GET", path) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        while text not in (event := _next_event(lines)):
            assert time.monotonic() < deadline, f"no event with {text!r} in {timeout:g}s"
    return event


def sign_in(console: httpx2.Client) -> None:
    login = console.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', login)
    assert token
    form = {"csrf": token[1], "name": "alice", "password": OPERATOR["alice"]}
    signed_in = console.post("/login", data=form, follow_redirects=True)
    assert 'id="operator">alice<' in signed_in.text


def test_the_list_stream_sends_a_new_saga_as_it_arrives(
    stack: Stack, console: httpx2.Client
) -> None:
    first = order(stack)
    late: list[dict[str, Any]] = []

    with console.stream("GET", "/sagas/stream") as stream:
        lines = stream.iter_lines()
        assert next(lines) == "retry: 2000"
        first_event = _next_event(lines)
        assert first["saga_id"] in first_event
        late.append(order(stack))  # placed while the stream is open
        deadline = time.monotonic() + 10
        while late[0]["saga_id"] not in (event := _next_event(lines)):
            assert time.monotonic() < deadline, "the new saga never came down the stream"
    assert event.index(late[0]["saga_id"]) < event.index(first["saga_id"])  # newest first


def _next_event(lines: Iterator[str]) -> str:
    data = []
    for line in lines:
        if line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif line == "" and data:
            return "\n".join(data)
    raise AssertionError("the stream ended")


def test_a_saga_stream_follows_it_to_its_end(stack: Stack, console: httpx2.Client) -> None:
    declined = order(stack, amount="99999.00")
    assert declined["status"] == "COMPENSATED"
    event = event_with(console, f"/sagas/{declined['saga_id']}/stream", "ReleaseStock")
    assert 'data-command="ReleaseStock" data-outcome="compensated"' in event
    assert "payment_declined" in event


def test_dead_letters_are_counted_and_shown_and_stay_in_their_queue(
    stack: Stack, console: httpx2.Client
) -> None:
    queue = topology.dead_letter_queue(topology.command_queue("inventory"))
    with amqp_channel(stack.amqp_url) as channel:
        send(
            channel,
            topology.COMMANDS_EXCHANGE,
            "inventory",
            b"{not json",
            content_type="application/json",
            type="ReserveStock",
        )
    deadline = time.monotonic() + 10
    while console.get("/api/overview").json()["dead_letters"].get(queue) != 1:
        assert time.monotonic() < deadline, "the bad command never reached its DLQ"
        time.sleep(0.2)

    overview = console.get("/api/overview").json()
    assert overview["dead_letters_error"] is None
    assert set(overview["dead_letters"]) >= {
        queue,
        topology.dead_letter_queue(topology.REQUESTS_QUEUE),
        topology.dead_letter_queue(topology.REPLIES_QUEUE),
    }
    assert console.get(f"/dead-letters/{queue}").status_code == 403  # operators only
    sign_in(console)
    page = console.get(f"/dead-letters/{queue}")
    assert page.status_code == 200
    assert "<strong>invalid_json</strong>" in page.text
    assert "{not json" in page.text
    # A look puts the message back: it is still there for whoever deals with it.
    assert console.get("/api/overview").json()["dead_letters"][queue] == 1
    assert console.get("/dead-letters/orchestrator.requests").status_code == 404


def test_a_refusal_comes_back_from_the_orchestrator(stack: Stack, console: httpx2.Client) -> None:
    done = order(stack)
    assert done["status"] == "COMPLETED"
    sign_in(console)
    page = console.get(f"/sagas/{done['saga_id']}").text
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    answer = console.post(
        f"/sagas/{done['saga_id']}/abort",
        data={"csrf": token[1], "reason": "too late"},
        follow_redirects=True,
    )
    assert "AbortSaga refused: saga is already COMPLETED" in answer.text
    assert stack.saga(done["saga_id"])["status"] == "COMPLETED"


def test_sigterm_ends_open_streams_and_the_console_at_once(
    stack: Stack, console: httpx2.Client
) -> None:
    web = stack.services["web"]
    with console.stream("GET", "/overview/stream") as stream:
        lines = stream.iter_lines()
        _next_event(lines)  # the stream is open and has sent the overview once
        started = time.monotonic()
        web.terminate()
        assert web.popen is not None
        # uvicorn shuts down, then dies of the signal it caught, as a supervisor expects
        assert web.popen.wait(10) == -signal.SIGTERM
        # It would wait its graceful time-out for open streams, and log an ERROR
        assert time.monotonic() - started < 1.5
    log = web.output(since_start=True)
    assert "Finished server process" in log
    assert "ERROR" not in log

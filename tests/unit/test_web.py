"""The console's HTTP layer through Starlette's test client, over a real SQLite store.

What the broker would do with an action is left to the integration and browser tests: here
`steer` records what the console sends, so each refusal can show that nothing was sent.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import httpx2
import psycopg
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from messages.contract.models import (
    AbortSaga,
    ActionRefused,
    ActionTaken,
    Envelope,
    OperatorAction,
    RetrySaga,
)
from messages.errors import StoreTransientError
from orchestrator.engine import Decision, start
from orchestrator.settings import WebSettings
from orchestrator.store import open_store
from orchestrator.store.postgres import PostgresStore
from orchestrator.web.app import create_app
from orchestrator.web.console import MAX_STREAMS
from orchestrator.web.views import PAGE_SIZE
from tests.conftest import POSTGRES_URL
from tests.unit.test_store import SAGA, answer, place_order, started

PASSWORD = "correct-horse"


class Steering:
    """Stands in for the broker: records the actions sent, answers what it is told to."""

    def __init__(self) -> None:
        self.sent: list[OperatorAction] = []
        self.answer: Envelope | None = None

    def __call__(self, action: OperatorAction) -> Envelope | None:
        self.sent.append(action)
        return self.answer


class Sagas:
    """A store with a few sagas in it (``store_url``: a SQLite file or PostgreSQL): the ids
    of each kind."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.now = datetime.now(UTC)  # per test: a suite takes minutes
        self.writer = open_store(WebSettings(store_url=store_url))
        # waiting for ReserveStock for 5 s
        self.running = self.add(started(self.now - timedelta(seconds=5)))
        # a declined payment two minutes ago: stock reserved in 10 ms, the charge refused
        # 20 ms later, the stock released 30 ms after that
        at = self.now - timedelta(minutes=2)
        declined = answer(started(at), ok=True, at=at + timedelta(milliseconds=10))
        declined = answer(declined, ok=False, at=at + timedelta(milliseconds=30))
        self.declined = self.add(answer(declined, ok=True, at=at + timedelta(milliseconds=60)))
        # another customer's order, completed three hours ago, each reply after 40 ms
        other = place_order().model_copy(update={"customer_id": "cust-7", "sku": "SKU-9"})
        at = self.now - timedelta(hours=3)
        done = start(SAGA, other, "amq.gen-reply", at)
        for n in (1, 2, 3):
            done = answer(done, ok=True, at=at + timedelta(milliseconds=40 * n))
        self.other_customer = self.add(done)

    def add(self, decision: Decision) -> UUID:
        return self.writer.commit(decision.state, []).saga_id


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sagas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sagas]:
    """Every console test on both stores the console reads."""
    if request.param == "postgres":
        made = Sagas(request.getfixturevalue("postgres_url"))
    else:
        made = Sagas(str(tmp_path / "orchestrator.db"))
    yield made
    made.writer.close()


def console(
    sagas: Sagas, steering: Steering, operators: dict[str, str] | None = None
) -> Iterator[TestClient]:
    settings = WebSettings(
        store_url=sagas.store_url,
        web_operators={k: SecretStr(v) for k, v in (operators or {}).items()},
        stuck_after_s=60,
    )
    store = open_store(settings, readonly=True, live=True)
    try:
        with TestClient(create_app(settings, store, steering)) as client:
            yield client
    finally:
        store.close()


@pytest.fixture
def steering() -> Steering:
    return Steering()


@pytest.fixture
def client(sagas: Sagas, steering: Steering) -> Iterator[TestClient]:
    yield from console(sagas, steering, {"alice": PASSWORD})


@pytest.fixture
def read_only(sagas: Sagas, steering: Steering) -> Iterator[TestClient]:
    yield from console(sagas, steering)


def ids(client: TestClient, query: str = "") -> list[str]:
    response = client.get(f"/api/sagas{query}")
    assert response.status_code == 200, response.text
    return [row["saga_id"] for row in response.json()["sagas"]]


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match[1]


def sign_in(client: TestClient, password: str = PASSWORD) -> int:
    token = csrf_of(client.get("/login").text)
    form = {"csrf": token, "name": "alice", "password": password, "next": "/sagas"}
    return client.post("/login", data=form, follow_redirects=False).status_code


# --- reading -----------------------------------------------------------------------------------


def test_the_list_shows_sagas_newest_first(client: TestClient, sagas: Sagas) -> None:
    expected = [str(sagas.running), str(sagas.declined), str(sagas.other_customer)]
    assert ids(client) == expected
    page = client.get("/sagas")
    assert page.status_code == 200
    rows = re.findall(r'data-saga-id="([^"]+)"', page.text)
    assert rows == expected
    assert 'data-live="/sagas/stream"' in page.text  # the list follows the store


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("?state=RUNNING", "running"),
        ("?state=completed", "other_customer"),
        ("?state=compensated", "declined"),
        ("?reason=NO", "declined"),  # any case, part of the reason
        ("?customer=cust-7", "other_customer"),
        ("?sku=SKU-9", "other_customer"),
        ("?customer=cust-42&sku=SKU-1&state=COMPENSATED", "declined"),
        ("?age=30m&state=COMPENSATED", "declined"),
    ],
)
def test_each_filter_narrows_the_list(
    client: TestClient, sagas: Sagas, query: str, kind: str
) -> None:
    assert ids(client, query) == [str(getattr(sagas, kind))]
    page = client.get(f"/sagas{query}")
    assert re.findall(r'data-saga-id="([^"]+)"', page.text) == [str(getattr(sagas, kind))]


def test_age_keeps_only_sagas_started_within_it(client: TestClient, sagas: Sagas) -> None:
    assert ids(client, "?age=1h") == [str(sagas.running), str(sagas.declined)]
    assert ids(client, "?customer=nobody") == []
    assert "no sagas match these filters" in client.get("/sagas?customer=nobody").text


def test_stuck_lists_sagas_waiting_longer_than_the_setting(
    client: TestClient, sagas: Sagas
) -> None:
    assert ids(client, "?stuck=1") == []  # the running saga has waited 5 s of 60
    old = sagas.add(started(sagas.now - timedelta(minutes=5)))
    assert ids(client, "?stuck=1") == [str(old)]
    assert re.search(r'class="stuck">\d+m<', client.get("/sagas?stuck=1").text)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("?state=LOST", "state 'LOST': one of RUNNING"),
        ("?state=QUARANTINED", "quarantined sagas cannot be read"),
        ("?age=yesterday", "age: expected e.g. 30s, 10m, 2h or 1d, got 'yesterday'"),
        ("?customer=%3Cscript%3E", "customer '<script>'"),
        ("?page=0", "page '0'"),
        ("?stuck=maybe", "stuck 'maybe'"),
    ],
)
def test_a_bad_filter_is_a_clear_400(client: TestClient, query: str, says: str) -> None:
    answer = client.get(f"/api/sagas{query}")
    assert answer.status_code == 400
    assert says in answer.json()["error"]
    page = client.get(f"/sagas{query}")
    assert page.status_code == 400
    assert "bad filter" in page.text
    assert "<script>" not in page.text  # what was given is shown escaped


def test_pages_of_sagas_newest_first(client: TestClient, sagas: Sagas) -> None:
    for n in range(PAGE_SIZE + 2):
        sagas.add(started(sagas.now - timedelta(days=1, seconds=n)))
    first = client.get("/api/sagas").json()
    second = client.get("/api/sagas?page=2").json()
    assert (len(first["sagas"]), first["more"]) == (PAGE_SIZE, True)
    assert (len(second["sagas"]), second["more"]) == (5, False)
    everything = [r["saga_id"] for r in first["sagas"] + second["sagas"]]
    assert len(set(everything)) == PAGE_SIZE + 5
    started_at = [r["created_at"] for r in first["sagas"] + second["sagas"]]
    assert started_at == sorted(started_at, reverse=True)
    html = client.get("/sagas?state=RUNNING").text
    assert 'href="/sagas?state=RUNNING&amp;page=2"' in html  # the filters stay on the link


def test_a_saga_shows_its_order_and_a_waterfall_of_its_steps(
    client: TestClient, sagas: Sagas
) -> None:
    page = client.get(f"/sagas/{sagas.declined}")
    assert page.status_code == 200
    assert "2 x SKU-1 for cust-42, 25.50 EUR" in page.text
    assert re.search(r'id="saga-state" data-finished="true">COMPENSATED<', page.text)
    bars = re.findall(r'data-command="(\w+)" data-outcome="(\w+)"', page.text)
    assert bars == [
        ("ReserveStock", "succeeded"),
        ("ChargePayment", "failed"),
        ("ReleaseStock", "compensated"),
    ]
    assert f'data-live="/sagas/{sagas.declined}/stream"' in page.text
    state = client.get(f"/api/sagas/{sagas.declined}").json()
    assert state["status"] == "COMPENSATED"
    assert [e["event"] for e in state["history"]][-1] == "compensated"


def test_a_running_saga_has_a_bar_still_waiting(client: TestClient, sagas: Sagas) -> None:
    page = client.get(f"/sagas/{sagas.running}").text
    assert re.findall(r'data-command="(\w+)" data-outcome="(\w+)"', page) == [
        ("ReserveStock", "waiting")
    ]


def test_an_unknown_saga_is_a_404_that_says_why(client: TestClient) -> None:
    missing = "6f1d3c4e-0000-4000-8000-000000000000"
    page = client.get(f"/sagas/{missing}")
    assert page.status_code == 404
    assert "the orchestrator has not started it" in page.text
    assert client.get(f"/api/sagas/{missing}").status_code == 404
    assert client.get("/sagas/not-an-id").status_code == 404


def test_the_overview_counts_states_throughput_and_step_latencies(
    client: TestClient, sagas: Sagas
) -> None:
    overview = client.get("/api/overview").json()
    assert overview["by_state"]["RUNNING"] == 1
    assert overview["by_state"]["COMPENSATED"] == 1
    assert overview["by_state"]["COMPLETED"] == 1
    # the declined saga ended two minutes ago; the other one three hours ago, off the chart
    assert sum(overview["throughput"]["by_outcome"]["COMPENSATED"]) == 1
    assert sum(overview["throughput"]["by_outcome"]["COMPLETED"]) == 0
    assert len(overview["throughput"]["minutes"]) == 30
    latencies = {row["command"]: row for row in overview["latencies"]}
    assert set(latencies) == {"ReserveStock", "ChargePayment", "CompleteOrder", "ReleaseStock"}
    assert latencies["ReserveStock"]["replies"] == 2  # the running saga's has not come
    assert (latencies["ReserveStock"]["p50_ms"], latencies["ReserveStock"]["max_ms"]) == (
        40.0,
        40.0,
    )
    assert latencies["ChargePayment"]["replies"] == 2  # 20 ms (declined) and 40 ms
    assert latencies["ReleaseStock"]["max_ms"] == 30.0
    assert overview["dead_letters_error"] == "no management API configured (SAGA_MANAGEMENT_URL)"
    page = client.get("/overview")
    assert page.status_code == 200
    assert "Sagas ended per minute" in page.text


def test_healthz_and_security_headers(client: TestClient) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok")
    assert response.headers["x-frame-options"] == "DENY"
    assert "script-src" not in response.headers["content-security-policy"]  # self only
    assert response.headers["content-security-policy"].startswith("default-src 'self'")


def test_static_files_are_served_and_nothing_comes_from_elsewhere(client: TestClient) -> None:
    html = client.get("/sagas").text
    assert client.get("/static/console.js").status_code == 200
    assert client.get("/static/console.css").status_code == 200
    assert not re.search(r'(src|href)="(https?:)?//', html)


# --- acting ------------------------------------------------------------------------------------


def abort(
    client: TestClient,
    saga_id: UUID,
    csrf: str | None,
    reason: str = "customer called",
    action: str = "abort",
) -> httpx2.Response:
    form = {"reason": reason} | ({"csrf": csrf} if csrf is not None else {})
    return client.post(f"/sagas/{saga_id}/{action}", data=form, follow_redirects=False)


def test_a_read_only_console_says_so_and_refuses_actions(
    read_only: TestClient, sagas: Sagas, steering: Steering
) -> None:
    page = read_only.get(f"/sagas/{sagas.running}").text
    assert "read-only: no operators configured" in page
    assert 'id="abort-form"' not in page
    assert "no operators are configured" in read_only.get("/login").text
    refused = abort(read_only, sagas.running, "any-token")
    assert refused.status_code == 403
    assert "read-only console" in refused.text
    assert steering.sent == []


def test_actions_need_a_signed_in_operator(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    page = client.get(f"/sagas/{sagas.running}").text
    assert 'id="abort-form"' not in page
    assert "Sign in</a> as an operator" in page
    refused = abort(client, sagas.running, csrf_of(client.get("/login").text))
    assert refused.status_code == 403
    assert "sign in as an operator" in refused.text
    assert steering.sent == []


def test_a_wrong_password_is_refused(client: TestClient) -> None:
    assert sign_in(client, "wrong-password") == 401
    assert 'id="operator"' not in client.get("/sagas").text
    assert sign_in(client) == 303
    assert 'id="operator">alice<' in client.get("/sagas").text


def test_sign_in_needs_the_forms_csrf_token(client: TestClient) -> None:
    client.get("/login")
    form = {"name": "alice", "password": PASSWORD}
    assert client.post("/login", data=form, follow_redirects=False).status_code == 403
    assert 'id="operator"' not in client.get("/sagas").text


def test_an_action_without_the_sessions_csrf_token_is_refused(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    assert sign_in(client) == 303
    assert abort(client, sagas.running, None).status_code == 403
    assert abort(client, sagas.running, "forged-token").status_code == 403
    assert steering.sent == []


def test_an_operator_aborts_with_a_reason_recorded_as_theirs(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    steering.answer = ActionTaken(
        saga_id=sagas.running, action="AbortSaga", detail="compensating: ReleaseStock sent"
    )
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.running}").text
    assert 'id="abort-form"' in page
    sent = abort(client, sagas.running, csrf_of(page))
    assert sent.status_code == 303
    assert sent.headers["location"] == f"/sagas/{sagas.running}"
    (action,) = steering.sent
    assert isinstance(action, AbortSaga)
    assert (action.saga_id, action.reason) == (sagas.running, "customer called")
    assert action.requested_by == "alice (web console)"
    said = "AbortSaga taken: compensating: ReleaseStock sent"
    assert said in client.get(f"/sagas/{sagas.running}").text
    assert said not in client.get(f"/sagas/{sagas.running}").text  # said once


def test_an_operator_retries_a_waiting_saga(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    steering.answer = ActionTaken(
        saga_id=sagas.running, action="RetrySaga", detail="ReserveStock sent again, attempt 2"
    )
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.running}").text
    assert 'id="retry-form"' in page
    abort(client, sagas.running, csrf_of(page), "inventory is back", action="retry")
    (action,) = steering.sent
    assert isinstance(action, RetrySaga)
    assert (action.reason, action.requested_by) == ("inventory is back", "alice (web console)")
    said = "RetrySaga taken: ReserveStock sent again, attempt 2"
    assert said in client.get(f"/sagas/{sagas.running}").text


def test_no_answer_from_the_orchestrator_is_said_plainly(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    assert sign_in(client) == 303
    abort(client, sagas.running, csrf_of(client.get(f"/sagas/{sagas.running}").text))
    assert len(steering.sent) == 1
    page = client.get(f"/sagas/{sagas.running}").text
    assert "AbortSaga sent, but the orchestrator has not answered" in page


def test_a_finished_saga_offers_no_actions(client: TestClient, sagas: Sagas) -> None:
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.declined}").text
    assert 'id="abort-form"' not in page
    assert 'id="retry-form"' not in page
    assert "has ended COMPENSATED: there is nothing left to abort or retry" in page


def test_an_unknown_action_is_a_404(client: TestClient, sagas: Sagas, steering: Steering) -> None:
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.running}").text
    assert abort(client, sagas.running, csrf_of(page), action="delete").status_code == 404
    assert steering.sent == []


def test_a_refusal_from_the_orchestrator_is_shown(
    client: TestClient, sagas: Sagas, steering: Steering
) -> None:
    steering.answer = ActionRefused(
        saga_id=sagas.declined, action="AbortSaga", detail="saga is already COMPENSATED"
    )
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.declined}").text
    abort(client, sagas.declined, csrf_of(page))
    assert (
        "AbortSaga refused: saga is already COMPENSATED"
        in client.get(f"/sagas/{sagas.declined}").text
    )


def test_an_action_needs_a_reason(client: TestClient, sagas: Sagas, steering: Steering) -> None:
    assert sign_in(client) == 303
    page = client.get(f"/sagas/{sagas.running}").text
    abort(client, sagas.running, csrf_of(page), reason="  ")
    assert "say why" in client.get(f"/sagas/{sagas.running}").text
    assert steering.sent == []


def test_signing_out_ends_the_session(client: TestClient, sagas: Sagas, steering: Steering) -> None:
    assert sign_in(client) == 303
    page = client.get("/sagas").text
    client.post("/logout", data={"csrf": csrf_of(page)})
    page = client.get(f"/sagas/{sagas.running}").text
    assert 'id="operator"' not in page
    assert abort(client, sagas.running, csrf_of(client.get("/login").text)).status_code == 403
    assert steering.sent == []


def test_sign_in_never_sends_the_operator_off_the_console(client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    form = {"csrf": token, "name": "alice", "password": PASSWORD, "next": "//evil.example/x"}
    response = client.post("/login", data=form, follow_redirects=False)
    assert response.headers["location"] == "/sagas"


@pytest.mark.postgres
def test_a_database_outage_is_a_503_and_the_console_recovers_by_itself(
    postgres_database: str, steering: Steering
) -> None:
    PostgresStore(postgres_database).close()  # the orchestrator made the schema
    settings = WebSettings(store_url=postgres_database)
    store = open_store(settings, readonly=True)
    database = urlsplit(postgres_database).path.lstrip("/")
    try:
        with (
            TestClient(create_app(settings, store, steering)) as client,
            psycopg.connect(POSTGRES_URL, autocommit=True) as admin,
        ):
            assert client.get("/sagas").status_code == 200
            # The database refuses every connection, and drops the ones it had (a restart)
            admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            page = client.get("/sagas")
            assert page.status_code == 503
            assert "cannot read the store right now" in page.text
            assert client.get("/api/overview").status_code == 503
            assert client.get("/healthz").status_code == 503
            admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
            deadline = time.monotonic() + 10
            while client.get("/sagas").status_code != 200:
                assert time.monotonic() < deadline, "the console never read the store again"
                time.sleep(0.2)
    finally:
        store.close()


def test_after_a_wrong_password_sign_in_still_returns_to_the_saga(
    client: TestClient, sagas: Sagas
) -> None:
    page = client.get(f"/login?next=/sagas/{sagas.running}").text
    form = {"csrf": csrf_of(page), "name": "alice", "password": "wrong-password"}
    again = client.post("/login", data=form | {"next": f"/sagas/{sagas.running}"})
    assert again.status_code == 401
    form = {"csrf": csrf_of(again.text), "name": "alice", "password": PASSWORD}
    form["next"] = re.search(r'name="next" value="([^"]*)"', again.text)[1]  # type: ignore[index]
    signed_in = client.post("/login", data=form, follow_redirects=False)
    assert signed_in.headers["location"] == f"/sagas/{sagas.running}"


def test_an_installed_console_has_its_templates_and_static_files() -> None:
    """pyproject ships every file the console serves (the Docker image installs it)."""
    root = Path(__file__).resolve().parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "orchestrator.web" in setuptools["packages"]
    patterns = setuptools["package-data"]["orchestrator.web"]
    web = root / "orchestrator" / "web"
    served = [p.relative_to(web) for d in ("templates", "static") for p in (web / d).iterdir()]
    assert served
    assert [str(p) for p in served if not any(p.match(g) for g in patterns)] == []


@pytest.mark.parametrize(
    ("query", "says"),
    [("?page=%C2%B2", "page '²'"), ("?age=99999999999d", "longer than 100 years")],
)
def test_odd_numbers_are_a_400_not_a_crash(client: TestClient, query: str, says: str) -> None:
    answer = client.get(f"/api/sagas{query}")
    assert answer.status_code == 400
    assert says in answer.json()["error"]


def test_sign_in_never_follows_a_backslash_off_the_console(client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    form = {"csrf": token, "name": "alice", "password": PASSWORD, "next": "/\\evil.example"}
    response = client.post("/login", data=form, follow_redirects=False)
    assert response.headers["location"] == "/sagas"


def test_a_new_password_signs_the_operators_sessions_out(sagas: Sagas, steering: Steering) -> None:
    for before in console(sagas, steering, {"alice": PASSWORD}):
        assert sign_in(before) == 303
        cookies = dict(before.cookies)
    for after in console(sagas, steering, {"alice": "another-password"}):
        after.cookies.update(cookies)
        # the same cookie, a console that knows alice by another password
        assert 'id="operator"' not in after.get("/sagas").text


def test_a_session_key_anyone_could_guess_is_refused() -> None:
    with pytest.raises(ValueError, match="32 characters or more"):
        WebSettings(web_secret=SecretStr("web-dev-secret"))
    assert WebSettings(web_secret=SecretStr("")).web_secret is None  # empty: one per start


def test_only_a_signed_in_operator_looks_into_a_dead_letter_queue(
    client: TestClient, read_only: TestClient
) -> None:
    for reader in (client, read_only):
        page = reader.get("/dead-letters/inventory.commands.dlq")
        assert page.status_code in (403, 404)
    # the sign-in link on a refused page goes to a page that can be shown after signing in
    refused = client.post("/sagas/x/abort", data={"reason": "x"})
    assert 'href="/login?next=/sagas"' in refused.text


def test_a_store_error_in_a_live_page_is_shown_escaped(client: TestClient) -> None:
    live = client.app.state.console  # type: ignore[attr-defined]

    def broken(*args: object) -> None:
        live.stopping.set()  # one event, then the stream ends
        raise StoreTransientError("<b>database</b> gone")

    live.store.sagas = broken
    body = client.get("/sagas/stream").text
    assert "cannot read the store: &lt;b&gt;database&lt;/b&gt; gone" in body


def test_live_pages_are_capped(client: TestClient) -> None:
    live = client.app.state.console  # type: ignore[attr-defined]
    live.streams = MAX_STREAMS
    refused = client.get("/sagas/stream")
    assert refused.status_code == 503
    assert "live pages are open already" in refused.text

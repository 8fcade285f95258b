"""The console in a real browser: chromium drives `saga web` over a stack of real processes.

One stack and one console (with an operator) for the module, one chromium; a fresh browser
context (cookies, session) per test. A live part of a page must change without a reload:
a test marks the page's `window` before it waits and checks the mark after, since any
navigation would have dropped it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from scripts.harness.browser import Console, launch, start_console
from tests.integration.broker import Broker
from tests.integration.stack import Stack

pytestmark = [pytest.mark.broker, pytest.mark.browser]

OPERATOR, PASSWORD = "alice", "correct horse battery"
ORDER = ("--sku", "item-1", "--qty", "1")
DECLINED = "5000.00"  # over payment's default credit limit (SAGA_DEFAULT_CREDIT_LIMIT, 1000)
REASON = "customer called to cancel"
SETTINGS = {
    # A saga waiting on a frozen participant stays RUNNING (at its step's third attempt
    # 10 + 20 + 40 s) far longer than the test takes to abort it; aborting before the
    # pivot needs no stuck saga, so nothing is stuck.
    "SAGA_STEP_TIMEOUT_S": "10",
    "SAGA_STUCK_AFTER_S": "600",
    "SAGA_WEB_REFRESH_S": "0.3",
}
LIVE_MS = 10_000  # for what reaches the page through the broker, the store and a stream
ABORT_MS = 15_000  # the console waits up to 5 s for the orchestrator to answer


@dataclass(frozen=True)
class Shop:
    """The stack and its console, with operator OPERATOR."""

    stack: Stack
    console: Console


@pytest.fixture(scope="module")
def shop(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    vhost = f"saga-test-{uuid.uuid4().hex[:12]}"
    broker.create_vhost(vhost)
    stack = Stack(broker.url_for(vhost), tmp_path_factory.mktemp("console"), dict(SETTINGS))
    try:
        stack.orchestrator()
        stack.worker("inventory", "--stock", "item-1=100")
        stack.worker("payment")
        stack.worker("order")
        yield Shop(stack, start_console(stack, operators={OPERATOR: PASSWORD}))
    finally:
        stack.stop_all()
        broker.delete_vhost(vhost)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(LIVE_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def mark(page: Page) -> None:
    page.evaluate("window.sagaTestMark = 'not reloaded'")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.sagaTestMark") == "not reloaded", "the page was reloaded"


def sign_in(page: Page, name: str, password: str) -> None:
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("form.login button[type=submit]")


def test_a_new_saga_appears_in_the_open_list(shop: Shop, page: Page) -> None:
    # Given the list open
    page.goto(shop.console.at("/sagas"))
    expect(page.locator("#sagas")).to_be_visible()
    mark(page)

    # When an order is placed
    code, result = shop.stack.place_order("--customer", "c-list", *ORDER, "--amount", "25.00")
    assert code == 0, result

    # Then its row appears, COMPLETED, in the page as it is
    row = page.locator(f"#sagas tr[data-saga-id='{result['saga_id']}']")
    expect(row).to_contain_text("COMPLETED", timeout=LIVE_MS)
    expect(row).to_contain_text("1 x item-1 for c-list, 25.00 EUR")
    assert_not_reloaded(page)


def test_a_declined_payment_shows_the_stock_released_on_its_timeline(
    shop: Shop, page: Page
) -> None:
    # Given an order payment declines
    code, result = shop.stack.place_order("--customer", "c-rich", *ORDER, "--amount", DECLINED)
    assert code == 1 and result["reason"] == "payment_declined", result
    saga_id = result["saga_id"]

    # When it is opened from the list
    page.goto(shop.console.at("/sagas"))
    page.click(f"#sagas tr[data-saga-id='{saga_id}'] a")
    expect(page).to_have_url(shop.console.at(f"/sagas/{saga_id}"))

    # Then it is COMPENSATED: stock reserved, the charge failed, the stock released
    expect(page.locator("#saga-state")).to_have_text("COMPENSATED")
    expect(page.locator("#saga-reason")).to_contain_text("payment_declined")
    rows = page.locator("#waterfall .wf-row[data-command]")
    expect(rows).to_have_count(3)
    shown = rows.evaluate_all("rows => rows.map(r => [r.dataset.command, r.dataset.outcome])")
    assert shown == [
        ["ReserveStock", "succeeded"],
        ["ChargePayment", "failed"],
        ["ReleaseStock", "compensated"],
    ]
    release = page.locator("#waterfall .wf-row.compensation[data-command=ReleaseStock]")
    expect(release.locator(".wf-bar.compensated")).to_be_visible()


def test_an_operator_aborts_a_waiting_saga_and_sees_it_compensate(shop: Shop, page: Page) -> None:
    stack, console = shop.stack, shop.console
    with stack.frozen("payment"):
        # Given a saga waiting at ChargePayment for a frozen payment service
        order = stack.place_order_async(
            "--customer", "c-wait", *ORDER, "--amount", "25.00", timeout=60
        )
        page.goto(console.at("/sagas"))
        row = page.locator("#sagas tr[data-saga-id]", has_text="c-wait")
        expect(row).to_contain_text("RUNNING", timeout=LIVE_MS)
        row.locator("a").click()
        expect(page.locator("#saga-state")).to_have_text("RUNNING")
        saga_page = page.url
        expect(page.locator("#abort-form")).to_have_count(0)

        # When an operator signs in, with a wrong password first
        page.click("#sign-in")
        sign_in(page, OPERATOR, "not the password")
        expect(page.locator(".flash.error")).to_have_text("wrong name or password")
        sign_in(page, OPERATOR, PASSWORD)
        expect(page.locator("#operator")).to_have_text(OPERATOR)

        # And, back on the saga's page, aborts it, saying why
        expect(page).to_have_url(saga_page)
        page.fill("#abort-form input[name=reason]", REASON)
        page.click("#abort-form button[type=submit]")
        taken = "AbortSaga taken: compensating: RefundPayment sent"
        expect(page.locator(".flash.ok")).to_have_text(taken, timeout=ABORT_MS)

        # Then it compensates at once: RefundPayment first, which waits for payment
        expect(page.locator("#saga-state")).to_have_text("COMPENSATING")
        mark(page)

    # When payment goes on: then the page shows, by itself, the saga COMPENSATED, the stock
    # released, and who aborted it and why
    expect(page.locator("#saga-state")).to_have_text("COMPENSATED", timeout=LIVE_MS)
    release = "#waterfall .wf-row[data-command=ReleaseStock][data-outcome=compensated]"
    expect(page.locator(release)).to_be_visible()
    abort = page.locator("table.history tr.ev-abort_requested")
    expect(abort).to_contain_text(f"by {OPERATOR} (web console): {REASON}")
    expect(page.locator("#abort-form")).to_be_hidden()  # an ended saga offers no actions
    expect(page.locator("#retry-form")).to_be_hidden()
    assert_not_reloaded(page)
    out, err = order.communicate(timeout=30)
    assert json.loads(out)["status"] == "COMPENSATED", (out, err)


def test_a_console_without_operators_is_read_only(shop: Shop, page: Page) -> None:
    # Given a second console on the same stack, with no operators
    code, result = shop.stack.place_order("--customer", "c-read", *ORDER, "--amount", "25.00")
    assert code == 0, result
    console = start_console(shop.stack, "web-read-only")
    saga_id = result["saga_id"]

    # When a saga is opened
    page.goto(console.at(f"/sagas/{saga_id}"))

    # Then it is there, with the read-only badge, and no way to sign in or abort
    expect(page.locator("#saga-state")).to_have_text("COMPLETED")
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#abort-form")).to_have_count(0)
    expect(page.locator("#sign-in")).to_have_count(0)
    refused = page.request.post(console.at(f"/sagas/{saga_id}/abort"), form={"reason": "x"})
    assert refused.status == 403
    assert "read-only console: no operators are configured" in refused.text()

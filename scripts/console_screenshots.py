#!/usr/bin/env python3
"""Screenshots of the console for the README: the sagas list, a declined payment's timeline,
and the overview.

Starts a stack of its own (on a fresh vhost, deleted afterwards, and a temporary data
directory), places a mix of orders (completed, declined by payment, out of stock, refused by
the order service, one aborted by an operator from the console, one left waiting on a frozen
order service), starts `saga web` and photographs it with Debian's chromium.

    python scripts/console_screenshots.py
    python scripts/console_screenshots.py --url amqp://guest:guest@rabbit:5672/ --out /tmp/shots
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# `python scripts/console_screenshots.py` puts scripts/ on the path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pika
from playwright.sync_api import Browser, Error, Page, ViewportSize, sync_playwright

from messages.contract import topology
from messages.errors import ConfigurationError
from messages.plumbing.settings import BrokerSettings, load
from scripts.harness.browser import BrowserError, Console, launch, start_console
from scripts.harness.processes import ROOT, ProcessError
from scripts.harness.stack import Stack
from scripts.harness.vhost import management_for, private_vhost

OUT = ROOT / "orchestrator" / "web" / "screenshots"
OPERATOR, PASSWORD = "alice", "for the screenshots"
STOCK = "book-1=40,mug-2=40,lamp-3=2"
# customer, SKU, quantity, amount, and how it ends (its reason, or COMPLETED); oldest first.
ORDERS = (
    ("c-1041", "book-1", 2, "38.00", "COMPLETED"),
    ("c-1042", "mug-2", 1, "12.50", "COMPLETED"),
    ("c-1043", "book-1", 1, "1450.00", "payment_declined"),  # over the default credit limit
    ("c-1044", "mug-2", 4, "50.00", "COMPLETED"),
    ("c-1045", "lamp-3", 5, "120.00", "out_of_stock"),  # 2 in stock
    ("c-1046", "book-1", 1, "19.00", "customer_blocked"),  # refused by the order service
    ("c-1047", "lamp-3", 1, "24.00", "COMPLETED"),
    ("c-1048", "mug-2", 2, "2300.00", "payment_declined"),
    ("c-1049", "book-1", 3, "57.00", "COMPLETED"),
)
BLOCKED = "c-1046"
DECLINED = "c-1043"  # whose timeline saga.png shows
ABORTED, WAITING = "c-1050", "c-1051"
SETTINGS = {
    "SAGA_STUCK_AFTER_S": "3",  # the saga left waiting shows as stuck within the run
    "SAGA_WEB_REFRESH_S": "0.5",
}
VIEWPORT = ViewportSize(width=1280, height=800)
ABORT_MS = 15_000  # the console waits up to 5 s for the orchestrator to answer


class ShotError(Exception):
    """Raised when the stack does not do what the pictures are meant to show."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="RabbitMQ URL (default: SAGA_AMQP_URL, else local guest)")
    parser.add_argument("--management-url", help="management API (default http://HOST:15672)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the PNGs go ({OUT})")
    return parser.parse_args(argv)


def place(customer: str, sku: str, qty: int, amount: str) -> list[str]:
    """place_order.py's options for one order."""
    return ["--customer", customer, "--sku", sku, "--qty", str(qty), "--amount", amount]


def place_mix(stack: Stack) -> str:
    """Place ORDERS one by one; the saga id of DECLINED."""
    ids = {}
    for customer, sku, qty, amount, ends in ORDERS:
        _, result = stack.place_order(*place(customer, sku, qty, amount))
        if (result.get("reason") or result.get("status")) != ends:
            raise ShotError(f"{customer}'s order should end {ends}: {result}")
        ids[customer] = str(result["saga_id"])
    return ids[DECLINED]


def abort_one(stack: Stack, browser: Browser, console: Console) -> None:
    """An operator aborts a saga waiting for a frozen payment service, from the console."""
    page = browser.new_page(viewport=VIEWPORT)
    with stack.frozen("payment"):
        order = stack.place_order_async(*place(ABORTED, "mug-2", 1, "12.50"), timeout=60)
        page.goto(console.at("/sagas"))
        page.locator("#sagas tr", has_text=ABORTED).locator("a").click()
        page.click("#sign-in")
        page.fill("input[name=name]", OPERATOR)
        page.fill("input[name=password]", PASSWORD)
        page.click("form.login button[type=submit]")  # back to the saga's page
        page.fill("#abort-form input[name=reason]", "customer called to cancel")
        page.click("#abort-form button[type=submit]")
        # RefundPayment waits for payment: the console answers after its 5 s.
        page.locator(".flash").wait_for(timeout=ABORT_MS)
    out, _ = order.communicate(timeout=60)
    if json.loads(out or "{}").get("status") != "COMPENSATED":
        raise ShotError(f"the aborted saga should end COMPENSATED: {out}")
    page.close()


def photograph(page: Page, url: str, path: Path) -> None:
    """``url`` in full, once its live part has had its first update (the badge says live)."""
    page.goto(url)
    page.locator("[data-live][data-updated]").wait_for()
    page.screenshot(path=str(path), full_page=True)


def dead_letter_one(stack: Stack) -> None:
    """A charge no payment service can read: it dead-letters it, the overview counts it."""
    connection = pika.BlockingConnection(pika.URLParameters(stack.amqp_url))
    try:
        connection.channel().basic_publish(
            topology.COMMANDS_EXCHANGE,
            "payment",
            b'{"type": "ChargePayment", "amount": "lots"}',
            pika.BasicProperties(content_type="application/json", type="ChargePayment"),
        )
    finally:
        connection.close()


def shoot(stack: Stack, out: Path, management_url: str | None) -> None:
    stack.orchestrator()
    stack.worker("inventory", "--stock", STOCK)
    stack.worker("payment")
    stack.worker("order", "--block", BLOCKED)
    declined = place_mix(stack)
    env = {"SAGA_MANAGEMENT_URL": management_url} if management_url else {}
    console = start_console(stack, operators={OPERATOR: PASSWORD}, **env)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            abort_one(stack, browser, console)
            page = browser.new_page(viewport=VIEWPORT)  # signed out: as a reader sees it
            with stack.frozen("order"):
                waiting = stack.place_order_async(*place(WAITING, "book-1", 1, "19.00"))
                try:
                    page.goto(console.at("/sagas"))
                    page.locator("#sagas tr", has_text=WAITING).locator(".stuck").wait_for()
                    photograph(page, console.at("/sagas"), out / "list.png")
                    photograph(page, console.at(f"/sagas/{declined}"), out / "saga.png")
                    dead_letter_one(stack)
                    page.goto(console.at("/overview"))
                    page.locator(".dlq tr.alarm").wait_for()  # counted on the overview
                    photograph(page, console.at("/overview"), out / "overview.png")
                finally:
                    waiting.kill()  # the saga completes without it once order is thawed
        finally:
            browser.close()


def main(argv: Sequence[str] | None = None) -> int:
    """0 with the three PNGs written, 2 when something stood in the way."""
    args = parse_args(argv)
    try:
        url = args.url or load(BrokerSettings).amqp_url
        api = management_for(url, args.management_url)
        with (
            private_vhost(api, url, "saga-screenshots") as vhost_url,
            tempfile.TemporaryDirectory(prefix="saga-screenshots-") as data,
        ):
            # Its own session (a Ctrl-C reaches only us, and we stop them), SIGTERMed
            # should we die.
            stack = Stack(
                vhost_url, Path(data), dict(SETTINGS), own_session=True, die_with_parent=True
            )
            try:
                shoot(stack, args.out, args.management_url)
            finally:
                stack.stop_all()
    except (ConfigurationError, BrowserError, ProcessError, ShotError, Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in ("list", "saga", "overview"):
        print(args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

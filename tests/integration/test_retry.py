"""`saga retry`: an operator has the command a saga waits on sent again now, not at its deadline.

A participant that comes back finds the commands still in its queue and answers them by
itself; the resend matters when the command is gone (purged, dead-lettered, lost with a
broker node), and the next resend has been pushed a minute away by backoff. An accepted
action, a retry or an abort, is answered with what it did (ActionTaken).
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from messages.contract import topology
from messages.contract.models import AbortSaga, ActionTaken
from orchestrator.steer import send_action
from tests.integration.stack import Stack, amqp_channel
from tests.integration.test_long_outages import wait_until
from tests.integration.test_operations import saga_cli
from tests.integration.test_saga_flows import ORDER, sent

pytestmark = pytest.mark.broker

DEADLINE_S = 60.0  # the wait of ChargePayment's first attempt: far beyond this test


def test_retry_sends_a_lost_command_again_at_once_and_a_finished_saga_is_refused(
    stack: Stack,
) -> None:
    # Given a saga waiting a minute for ChargePayment, the payment service down...
    stack.worker("inventory", "--stock", "item-1=10")
    stack.worker("order")
    stack.orchestrator(SAGA_STEP_TIMEOUT_S=str(DEADLINE_S))
    order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=60)
    stack.wait_for_log("orchestrator", "ChargePayment attempt 1")
    saga_id = stack.sagas()[0]["saga_id"]
    # ...and the command lost from its queue meanwhile
    with amqp_channel(stack.amqp_url) as channel:
        queue = topology.command_queue("payment")
        wait_until(
            "ChargePayment in its queue",
            lambda: channel.queue_declare(queue, passive=True).method.message_count == 1,
        )
        channel.queue_purge(queue)

    # When the payment service is back, the saga still waits: nothing is left to answer
    stack.worker("payment")
    time.sleep(1)
    waiting = stack.saga(saga_id)
    assert (waiting["status"], waiting["attempt"]) == ("RUNNING", 1)

    # When an operator retries it
    began = time.monotonic()
    retried = saga_cli(stack, "retry", saga_id, "--reason", "payment is back")

    # Then the orchestrator says what it did, and the saga completes at once, not in a minute
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{saga_id}: ChargePayment sent again, attempt 2"
    out, err = order.communicate(timeout=30)
    assert order.returncode == 0, (out, err)
    assert time.monotonic() - began < DEADLINE_S / 4
    result = json.loads(out)
    assert result["status"] == "COMPLETED"
    # and its history says who asked and why, then the resend as the next attempt
    history = result["history"]
    (requested,) = [e for e in history if e["event"] == "retry_requested"]
    assert requested["step"] == "saga"
    assert requested["detail"].startswith("by ") and "@" in requested["detail"]
    assert requested["detail"].endswith(": payment is back")
    after = history[history.index(requested) + 1]
    assert (after["step"], after["event"], after["attempt"]) == ("charge_payment", "sent", 2)
    assert sent(result).count("ChargePayment") == 2
    assert len(stack.query("payment", "SELECT saga_id FROM charges")) == 1

    # When an operator retries the finished saga, or one that does not exist
    again = saga_cli(stack, "retry", saga_id, "--reason", "twice", "--json")
    unknown = saga_cli(stack, "retry", str(uuid.uuid4()), "--reason", "which one?")

    # Then both are refused, saying why, with exit code 2
    assert again.returncode == 2, again.stdout
    assert "retry refused: saga is already COMPLETED: nothing to retry" in again.stderr
    assert unknown.returncode == 2 and "retry refused: no saga" in unknown.stderr


def test_an_abort_sent_from_a_thread_is_answered_with_what_was_done(stack: Stack) -> None:
    # Given a saga waiting for the payment service, which is down
    stack.worker("inventory", "--stock", "item-1=10")
    stack.orchestrator(SAGA_STEP_TIMEOUT_S=str(DEADLINE_S))
    order = stack.place_order_async(*ORDER, "--amount", "25.00", timeout=30)
    stack.wait_for_log("orchestrator", "ChargePayment attempt 1")
    saga_id = uuid.UUID(stack.sagas()[0]["saga_id"])

    # When the web console aborts it, from a thread of its own
    abort = AbortSaga(saga_id=saga_id, reason="customer called", requested_by="alice (web console)")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send_action, stack.amqp_url, None, abort, 10.0).result()

    # Then the answer says the compensation has begun, and the history has who and why
    assert isinstance(answer, ActionTaken), answer
    assert (answer.action, answer.detail) == ("AbortSaga", "compensating: RefundPayment sent")
    history = stack.saga(str(saga_id))["history"]
    assert "by alice (web console): customer called" in [
        e["detail"] for e in history if e["event"] == "abort_requested"
    ]
    order.kill()
    order.communicate()

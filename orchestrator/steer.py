"""Steering a saga from outside: send an operator action, wait for what comes back.

The `saga` CLI and the web console both go through here. Each call opens a blocking
connection of its own (messages.plumbing.client), so it may run in any thread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from messages.contract.models import ActionRefused, ActionTaken, Envelope, OperatorAction
from messages.plumbing.client import Client


def answer_to(action: OperatorAction) -> Callable[[Envelope], bool]:
    """Whether a message is the orchestrator's answer to ``action``: taken or refused."""

    def accept(message: Envelope) -> bool:
        return (
            isinstance(message, ActionTaken | ActionRefused)
            and message.saga_id == action.saga_id
            and message.action == action.type
        )

    return accept


def send_action(
    amqp_url: str,
    ca_file: Path | None,
    action: OperatorAction,
    timeout: float,
    accept: Callable[[Envelope], bool] | None = None,
    *,
    watch_events: bool = False,
) -> Envelope | None:
    """Send ``action`` to the orchestrator; the first message ``accept`` takes, else None.

    By default that is the answer to the action (ActionTaken or ActionRefused). With
    ``watch_events`` every saga's SagaFinished comes too, for a caller that waits for the
    end of the saga. None when nothing was taken within ``timeout`` seconds; SagaError when
    the broker cannot be reached or does not take the action.
    """
    with Client(amqp_url, watch_events=watch_events, ca_file=ca_file) as client:
        client.request(action)
        return client.wait_for(accept or answer_to(action), timeout)

#!/usr/bin/env python3
"""Place one order and wait for its saga to finish.

Prints the saga id, its final state and a per-step timeline. Exit code: 0 when the order
completed, 1 when it was rejected and compensated, 2 on a time-out or an error.

    python scripts/place_order.py --customer c-1 --sku item-1 --qty 1 --amount 25.00
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from uuid import uuid4

import pika
import pika.exceptions
from pydantic import ValidationError

from messages import topology
from messages.amqp import redact
from messages.codec import decode, encode
from messages.errors import ConfigurationError, DecodeError
from messages.models import PlaceOrder, SagaFinished, SagaStatus, parse_money
from messages.settings import BrokerSettings, load
from messages.timeline import format_timeline

FLAGS = {"customer_id": "--customer", "sku": "--sku", "quantity": "--qty", "amount": "--amount"}
EXIT_CODES = {SagaStatus.COMPLETED: 0, SagaStatus.COMPENSATED: 1, SagaStatus.FAILED: 2}


class Failure(Exception):
    """Raised with a message for the user; the script exits with code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customer", required=True, help="customer id, e.g. c-1")
    parser.add_argument("--sku", required=True, help="stock keeping unit, e.g. item-1")
    parser.add_argument("--qty", type=int, required=True, help="units to order")
    parser.add_argument("--amount", required=True, help="price, e.g. 25.00 or '25.00 USD'")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the saga to finish (default 30)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--url", default=None, help="RabbitMQ URL (default: SAGA_AMQP_URL, else local guest)"
    )
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> PlaceOrder:
    try:
        return PlaceOrder(
            saga_id=uuid4(),
            customer_id=args.customer,
            sku=args.sku,
            quantity=args.qty,
            amount=parse_money(args.amount),
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()
        )
        raise Failure(f"invalid order: {problems}") from exc
    except ValueError as exc:
        raise Failure(f"invalid order: {exc}") from exc


def place(url: str, request: PlaceOrder, timeout: float) -> SagaFinished | None:
    """Publish the request with confirms and wait for its result; None on time-out."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        raise Failure(f"cannot reach RabbitMQ at {redact(url)}: {exc!r}") from exc
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        wire = encode(request)
        properties = pika.BasicProperties(
            content_type=wire.content_type,
            type=wire.type,
            message_id=wire.message_id,
            correlation_id=wire.correlation_id,
            delivery_mode=wire.delivery_mode,
            timestamp=int(wire.timestamp),
            reply_to=reply_queue,
        )
        try:
            channel.basic_publish(
                topology.REQUESTS_EXCHANGE,
                topology.REQUEST_ROUTING_KEY,
                wire.body,
                properties,
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker) as exc:
            raise Failure(
                f"the broker did not take the request ({exc!r}): is the "
                "orchestrator running? It declares the saga queues at start."
            ) from exc
        return _wait(channel, reply_queue, request, timeout)
    finally:
        if connection.is_open:
            connection.close()


def _wait(channel: Any, queue: str, request: PlaceOrder, timeout: float) -> SagaFinished | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for method, properties, body in channel.consume(queue, inactivity_timeout=left):
            if method is None:  # inactivity_timeout reached
                return None
            channel.basic_ack(method.delivery_tag)
            try:
                message = decode(
                    body, content_type=properties.content_type, type_hint=properties.type
                )
            except DecodeError:
                continue
            if isinstance(message, SagaFinished) and message.saga_id == request.saga_id:
                return message
            break
    return None


def report(request: PlaceOrder, result: SagaFinished | None, as_json: bool, timeout: float) -> int:
    if result is None:
        if as_json:
            print(
                json.dumps(
                    {
                        "saga_id": str(request.saga_id),
                        "status": "TIMED_OUT",
                        "reason": f"no result within {timeout:g}s",
                        "history": [],
                    }
                )
            )
        else:
            print(
                f"saga {request.saga_id}: no result within {timeout:g}s "
                f"(see: python -m orchestrator show {request.saga_id})"
            )
        return 2
    if as_json:
        print(result.model_dump_json(include={"saga_id", "status", "reason", "history"}, indent=2))
    else:
        reason = f" ({result.reason})" if result.reason else ""
        print(f"saga {result.saga_id}: {result.status}{reason}")
        print(format_timeline(result.history))
    return EXIT_CODES[result.status]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        request = build_request(args)
        url = args.url or load(BrokerSettings).amqp_url
        result = place(url, request, args.timeout)
    except (Failure, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report(request, result, args.json, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

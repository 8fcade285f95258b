"""A blocking pika client for command-line tools: publish with confirms, wait for answers.

place_order.py and the `saga` CLI talk to the orchestrator through this, the way any
client would: requests on saga.requests, answers on an exclusive reply queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
from yarl import URL

from messages.contract import topology
from messages.contract.codec import decode, encode
from messages.contract.models import Envelope
from messages.errors import ConfigurationError, DecodeError, SagaError
from messages.plumbing import tracing
from messages.plumbing.settings import redact, split_amqp_urls, tls_context

_NOT_RUNNING = "is the orchestrator running? It declares the saga queues at start."


def _parameters(url: str, ca_file: Path | None) -> pika.URLParameters:
    """pika's parameters for one node URL, verifying the broker for amqps://."""
    parameters = pika.URLParameters(url)
    context = tls_context(url, ca_file)
    if context is not None:
        parameters.ssl_options = pika.SSLOptions(context, URL(url).host)
    return parameters


class Client:
    """One connection and channel, with publisher confirms and an exclusive reply queue."""

    def __init__(
        self, url: str, *, watch_events: bool = False, ca_file: Path | None = None
    ) -> None:
        """Connect; with ``watch_events`` the reply queue also gets every SagaFinished.

        ``url`` may list several nodes' URLs, separated by commas: the first that answers
        is used.
        """
        try:
            urls = split_amqp_urls(url)
        except ValueError as exc:
            raise ConfigurationError(f"bad RabbitMQ URL {redact(url)!r}: {exc}") from None
        parameters = [_parameters(node, ca_file) for node in urls]
        try:
            self._connection = pika.BlockingConnection(parameters)
        except (pika.exceptions.AMQPError, OSError, ValueError, IndexError) as exc:
            raise SagaError(f"cannot reach RabbitMQ at {redact(url)}: {exc!r}") from exc
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        declared = self._channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_queue: str = declared.method.queue
        if watch_events:
            try:
                self._channel.queue_bind(self.reply_queue, topology.EVENTS_EXCHANGE, "saga.#")
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise SagaError(f"{_NOT_RUNNING} ({exc})") from exc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def request(self, message: Envelope) -> None:
        """Publish to the orchestrator's requests queue; the answer comes to reply_queue."""
        wire = encode(message)
        properties = pika.BasicProperties(
            content_type=wire.content_type,
            type=wire.type,
            message_id=wire.message_id,
            correlation_id=wire.correlation_id,
            delivery_mode=wire.delivery_mode,
            timestamp=int(wire.timestamp),
            reply_to=self.reply_queue,
            headers={tracing.HEADER: tracing.new_traceparent()},
        )
        try:
            self._channel.basic_publish(
                topology.REQUESTS_EXCHANGE,
                topology.REQUEST_ROUTING_KEY,
                wire.body,
                properties,
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker) as exc:
            raise SagaError(
                f"the broker did not take the request ({exc!r}): {_NOT_RUNNING}"
            ) from exc
        except pika.exceptions.AMQPError as exc:
            raise SagaError(
                f"lost the connection to RabbitMQ while placing saga {message.saga_id} "
                f"({exc!r}); requests sent before it are queued and will still be processed, "
                "this one perhaps: check with saga show"
            ) from exc

    def answers(self, timeout: float) -> Iterator[Envelope]:
        """Messages arriving on the reply queue until ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                method, properties, body = next(
                    self._channel.consume(self.reply_queue, inactivity_timeout=left)
                )
                if method is None:
                    break
                self._channel.basic_ack(method.delivery_tag)
            except pika.exceptions.AMQPError as exc:
                # The reply queue dies with the connection, so answers cannot be resumed;
                # what was already published is durable and goes on without us.
                raise SagaError(
                    f"lost the connection to RabbitMQ while waiting ({exc!r}); anything "
                    "already sent is queued and will still be processed: check with saga show"
                ) from exc
            try:
                yield decode(body, content_type=properties.content_type, type_hint=properties.type)
            except DecodeError:
                continue

    def wait_for(self, accept: Callable[[Envelope], bool], timeout: float) -> Envelope | None:
        """The first answer ``accept`` takes, or None after ``timeout`` seconds."""
        for message in self.answers(timeout):
            if accept(message):
                return message
        return None

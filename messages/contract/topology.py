"""Names of every exchange and queue, in one place. Plain strings: usable from pika and aio-pika.

saga.requests  (direct) --place_order--> orchestrator.requests
saga.commands  (direct) --inventory----> inventory.commands    (and payment, order)
saga.replies   (direct) --reply--------> orchestrator.replies
saga.events    (topic)  saga.<status>    for observers; results also go to reply_to
saga.dead-letter (direct) --<queue>----> <queue>.dlq           one per consumed queue
"""

from typing import Final

REQUESTS_EXCHANGE: Final = "saga.requests"
COMMANDS_EXCHANGE: Final = "saga.commands"
REPLIES_EXCHANGE: Final = "saga.replies"
EVENTS_EXCHANGE: Final = "saga.events"
DEAD_LETTER_EXCHANGE: Final = "saga.dead-letter"

REQUESTS_QUEUE: Final = "orchestrator.requests"
REPLIES_QUEUE: Final = "orchestrator.replies"
REQUEST_ROUTING_KEY: Final = "place_order"
REPLY_ROUTING_KEY: Final = "reply"

PARTICIPANTS: Final = ("inventory", "payment", "order")

# Headers we add to a message we dead-letter ourselves (RabbitMQ adds x-death on its own).
REASON_HEADER: Final = "x-saga-dead-letter-reason"
DETAIL_HEADER: Final = "x-saga-dead-letter-detail"
QUEUE_HEADER: Final = "x-saga-original-queue"
# On a message dead-lettered after its handler kept raising: how many deliveries it got.
DELIVERIES_HEADER: Final = "x-saga-deliveries"


def command_queue(participant: str) -> str:
    """The queue a participant consumes its commands from."""
    return f"{participant}.commands"


def dead_letter_queue(queue: str) -> str:
    """Where messages from ``queue`` go when they cannot be processed."""
    return f"{queue}.dlq"


def event_routing_key(status: str) -> str:
    """Routing key of a SagaFinished event on saga.events, e.g. saga.completed."""
    return f"saga.{status.lower()}"


def consumed_queues() -> list[tuple[str, str, str]]:
    """(queue, exchange, routing key) for every queue a service of ours consumes."""
    queues = [
        (REQUESTS_QUEUE, REQUESTS_EXCHANGE, REQUEST_ROUTING_KEY),
        (REPLIES_QUEUE, REPLIES_EXCHANGE, REPLY_ROUTING_KEY),
    ]
    queues += [(command_queue(p), COMMANDS_EXCHANGE, p) for p in PARTICIPANTS]
    return queues

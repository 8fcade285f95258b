"""SAGA_AMQP_URL as a list of node URLs, and SAGA_QUEUE_TYPE: parsing, redaction, arguments."""

from __future__ import annotations

import asyncio
import os

import pytest

from messages.errors import ConfigurationError, NoNodeAnsweredError
from messages.plumbing import amqp
from messages.plumbing.client import Client
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import BrokerSettings, load, redact, split_amqp_urls
from scripts.harness.processes import free_port

A = "amqp://saga:pw-a@rabbit-1:5672/orders"
B = "amqp://saga:pw-b@rabbit-2:5673/orders"
C = "amqps://saga:pw-c@rabbit-3.example.com:5671/orders"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("SAGA_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_one_url_is_a_list_of_one() -> None:
    assert split_amqp_urls(A) == [A]


def test_several_urls_split_on_commas_spaces_allowed() -> None:
    assert split_amqp_urls(f"{A}, {B} ,{C}") == [A, B, C]


def test_settings_keep_the_text_and_give_the_nodes_in_order(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_AMQP_URL", f"{A},{B}")
    settings = load(BrokerSettings)
    assert settings.amqp_url == f"{A},{B}"
    assert settings.amqp_urls == [A, B]
    assert amqp.amqp_user(settings) == "saga"


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        (f"{A},http://saga:pw@rabbit-2:5672/orders", "entry 2"),
        (f"{A},,{B}", "entry 2 is empty"),
        (f"{A},{B},amqp://saga:pw@rabbit-3:notaport/orders", "entry 3"),
        (f"{A},amqp://other:pw@rabbit-2:5672/orders", "entry 2"),
        (f"{A},amqp://saga:pw@rabbit-2:5672/elsewhere", "entry 2"),
    ],
    ids=["scheme", "empty", "port", "another user", "another vhost"],
)
def test_a_bad_entry_is_named_and_its_password_hidden(
    env: pytest.MonkeyPatch, value: str, entry: str
) -> None:
    env.setenv("SAGA_AMQP_URL", value)

    with pytest.raises(ConfigurationError) as error:
        load(BrokerSettings)

    message = str(error.value)
    assert "SAGA_AMQP_URL" in message and entry in message
    assert "pw-a" not in message and ":pw@" not in message


def test_redaction_covers_every_url_of_a_list() -> None:
    shown = redact(f"{A},{B},{C}")
    assert "pw-" not in shown
    assert shown.count("***") == 3
    assert "rabbit-1:5672" in shown and "rabbit-3.example.com:5671" in shown


def test_the_client_names_the_bad_entry_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as error:
        Client(f"{A},ftp://saga:secret-b@rabbit-2/orders")
    assert "entry 2" in str(error.value)
    assert "secret-b" not in str(error.value) and "pw-a" not in str(error.value)


def test_the_management_api_of_a_list_is_the_first_nodes() -> None:
    api = ManagementApi.for_amqp_url(f"{A},{B}")
    assert api.base_url == "http://rabbit-1:15672"
    assert api.user == "saga"


def test_the_queue_type_defaults_to_classic_and_reads_any_case(env: pytest.MonkeyPatch) -> None:
    assert load(BrokerSettings).queue_type == "classic"
    env.setenv("SAGA_QUEUE_TYPE", "Quorum")
    assert load(BrokerSettings).queue_type == "quorum"
    env.setenv("SAGA_QUEUE_TYPE", "stream")
    with pytest.raises(ConfigurationError, match="SAGA_QUEUE_TYPE"):
        load(BrokerSettings)


def test_classic_queues_keep_todays_arguments() -> None:
    settings = BrokerSettings(queue_type="classic")
    assert amqp.queue_arguments(settings, "q") == {
        "x-dead-letter-exchange": "saga.dead-letter",
        "x-dead-letter-routing-key": "q",
    }
    assert amqp.dead_letter_queue_arguments(settings) is None


def test_quorum_queues_dead_letter_after_max_deliveries_at_least_once() -> None:
    arguments = amqp.queue_arguments(BrokerSettings(queue_type="quorum", max_deliveries=5), "q")
    assert arguments["x-queue-type"] == "quorum"
    # The broker dead-letters a message returned more times than the limit: 4 returns, 5
    # deliveries.
    assert arguments["x-delivery-limit"] == 4
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"  # at-least-once needs it
    assert arguments["x-dead-letter-routing-key"] == "q"
    dlq = amqp.dead_letter_queue_arguments(BrokerSettings(queue_type="quorum"))
    assert dlq == {"x-queue-type": "quorum"}


def test_a_round_tries_every_node_from_the_next_in_turn_and_names_each() -> None:
    # Two ports nothing listens on: refused at once, no broker needed.
    urls = [f"amqp://guest:secret@127.0.0.1:{free_port()}/" for _ in range(2)]
    settings = BrokerSettings(amqp_url=",".join(urls), connect_timeout_s=5)
    nodes = amqp.Nodes(settings.amqp_urls)

    with pytest.raises(NoNodeAnsweredError) as error:
        asyncio.run(nodes.open(settings, "test"))

    message = str(error.value)
    assert all(redact(url) in message for url in urls)
    assert "secret" not in message
    assert message.index(redact(urls[0])) < message.index(redact(urls[1]))

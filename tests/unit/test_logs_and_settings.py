"""What an operator sees before any saga runs: the log lines, the settings, the client.

Logs: every line names the saga in hand, as text or as one JSON object per line.
Settings: a bad SAGA_* value stops the process with a ConfigurationError naming it.
Client: a bad or unreachable RabbitMQ URL is a clear error that never shows the password.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pika
import pytest
from _pytest.logging import LogCaptureHandler

from messages.errors import ConfigurationError, SagaError
from messages.plumbing import logs
from messages.plumbing.client import Client
from messages.plumbing.settings import BrokerSettings, load

SAGA_ID = UUID("0b7d3c1e-5f43-4c3a-9a53-1d2f0c9e8a77")
MESSAGE_ID = UUID("7f1e0b1c-2d3a-4b5c-8d6e-9f0a1b2c3d4e")
SAGA_FIELDS = ("saga_id", "step", "message_id")
QUIETED = ("aiormq", "aio_pika", "pika", "aiormq.connection")  # configure() sets their levels


# --- logs ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure(): it replaces the root logger's handlers and sets logger levels.

    pytest adds capture handlers of its own for each test phase and removes them after it, so
    those from setup are not put back and those of teardown are kept.
    """
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, LogCaptureHandler)]
    level = root.level
    levels = {name: logging.getLogger(name).level for name in QUIETED}
    yield
    phase = [h for h in root.handlers if isinstance(h, LogCaptureHandler)]
    root.handlers[:] = [*handlers, *phase]
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_json_logs_carry_the_saga_step_and_message_inside_a_saga_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", "json")
    log = logging.getLogger("workers.payment")

    with logs.saga_context(SAGA_ID, step="ChargePayment", message_id=MESSAGE_ID):
        log.info("Charged %s to %s", "25.50 EUR", "cust-42")
    log.info("Consuming from %s", "payment.commands")

    first, second = (json.loads(line) for line in stderr_lines(capsys))
    assert first["message"] == "Charged 25.50 EUR to cust-42"
    assert (first["level"], first["logger"]) == ("INFO", "workers.payment")
    assert (first["saga_id"], first["step"], first["message_id"]) == (
        str(SAGA_ID),
        "ChargePayment",
        str(MESSAGE_ID),
    )
    assert first["time"]
    # outside any saga the saga fields are absent, not empty or placeholder values
    assert second["message"] == "Consuming from payment.commands"
    assert not set(SAGA_FIELDS) & set(second)


def test_a_saga_context_without_step_or_message_id_names_only_the_saga(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", "json")
    log = logging.getLogger("orchestrator")

    with logs.saga_context(SAGA_ID, step="ReserveStock", message_id=MESSAGE_ID):
        with logs.saga_context(SAGA_ID):
            log.info("inner")
        log.info("outer again")

    inner, outer = (json.loads(line) for line in stderr_lines(capsys))
    assert inner["saga_id"] == str(SAGA_ID)
    assert "step" not in inner and "message_id" not in inner
    # leaving the inner block gives back the outer one's fields
    assert (outer["step"], outer["message_id"]) == ("ReserveStock", str(MESSAGE_ID))


def test_json_logs_put_one_object_on_each_line_even_for_multiline_messages(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", "json")

    with logs.saga_context(SAGA_ID, step="CompleteOrder"):
        logging.getLogger("workers.order").warning("first line\nsecond line")

    (line,) = stderr_lines(capsys)
    entry = json.loads(line)
    assert entry["message"] == "first line\nsecond line"
    assert entry["level"] == "WARNING"


def test_json_logs_put_the_traceback_under_exception(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    log = logging.getLogger("workers.runtime")

    with logs.saga_context(SAGA_ID, step="RefundPayment", message_id=MESSAGE_ID):
        try:
            raise RuntimeError("database is locked")
        except RuntimeError:
            log.exception("Handler failed")

    (line,) = stderr_lines(capsys)
    entry = json.loads(line)
    assert entry["message"] == "Handler failed"
    assert entry["level"] == "ERROR"
    assert entry["saga_id"] == str(SAGA_ID)
    assert "Traceback" in entry["exception"]
    assert "RuntimeError: database is locked" in entry["exception"]


def test_a_plain_log_line_has_no_exception_key(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")

    logging.getLogger("x").error("no traceback here")

    (line,) = stderr_lines(capsys)
    assert "exception" not in json.loads(line)


def test_text_logs_name_the_saga_in_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "text")
    log = logging.getLogger("orchestrator.runtime")

    with logs.saga_context(SAGA_ID, step="ChargePayment"):
        log.info("Sent ChargePayment")
    log.info("Orchestrator started")

    inside, outside = stderr_lines(capsys)
    assert f"[saga {SAGA_ID}]" in inside
    assert inside.endswith("Sent ChargePayment")
    assert "INFO" in inside and "orchestrator.runtime" in inside
    assert "[saga -]" in outside
    with pytest.raises(json.JSONDecodeError):
        json.loads(inside)


def test_configure_drops_records_below_the_level_whatever_its_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("warning", "json")
    log = logging.getLogger("workers.inventory")

    log.info("not shown")
    log.warning("shown")

    lines = stderr_lines(capsys)
    assert [json.loads(line)["message"] for line in lines] == ["shown"]


def test_configure_replaces_earlier_handlers_so_lines_are_not_doubled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", "text")
    logs.configure("INFO", "json")

    logging.getLogger("x").info("once")

    (line,) = stderr_lines(capsys)
    assert json.loads(line)["message"] == "once"


# --- settings --------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment: no SAGA_* variable from the machine running the tests."""
    for name in list(os.environ):
        if name.upper().startswith("SAGA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_the_defaults_load_without_any_variable(env: pytest.MonkeyPatch) -> None:
    settings = load(BrokerSettings)

    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"


@pytest.mark.parametrize(
    "url",
    ["garbage", "http://x:5672/", "amqp://host:notaport/", "", "amqp://guest:guest@:5672/"],
    ids=repr,
)
def test_a_bad_amqp_url_is_a_configuration_error_naming_the_variable(
    env: pytest.MonkeyPatch, url: str
) -> None:
    env.setenv("SAGA_AMQP_URL", url)

    with pytest.raises(ConfigurationError) as error:
        load(BrokerSettings)

    assert "SAGA_AMQP_URL" in str(error.value)


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@rabbitmq:5672/", "amqps://saga:s3cret@broker.example.com:5671/orders"],
)
def test_an_amqp_or_amqps_url_is_accepted(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("SAGA_AMQP_URL", url)

    assert load(BrokerSettings).amqp_url == url


def test_a_lowercase_log_level_is_accepted(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_LOG_LEVEL", "debug")

    assert load(BrokerSettings).log_level == "DEBUG"


def test_an_unknown_log_level_is_refused_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_LOG_LEVEL", "verbose")

    with pytest.raises(ConfigurationError, match="SAGA_LOG_LEVEL"):
        load(BrokerSettings)


def test_an_unknown_log_format_is_refused_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_LOG_FORMAT", "xml")

    with pytest.raises(ConfigurationError) as error:
        load(BrokerSettings)

    message = str(error.value)
    assert "SAGA_LOG_FORMAT" in message
    assert "xml" in message


def test_json_log_format_is_accepted(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_LOG_FORMAT", "json")

    assert load(BrokerSettings).log_format == "json"


def test_a_prefetch_of_zero_is_refused_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_PREFETCH", "0")

    with pytest.raises(ConfigurationError, match="SAGA_PREFETCH"):
        load(BrokerSettings)


def test_every_bad_variable_is_named_at_once(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_PREFETCH", "0")
    env.setenv("SAGA_LOG_FORMAT", "xml")

    with pytest.raises(ConfigurationError) as error:
        load(BrokerSettings)

    assert "SAGA_PREFETCH" in str(error.value)
    assert "SAGA_LOG_FORMAT" in str(error.value)


# --- the command-line client -----------------------------------------------------------------


def test_a_client_with_a_bad_url_fails_before_touching_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client tried to connect")

    monkeypatch.setattr(pika, "BlockingConnection", no_network)

    with pytest.raises(ConfigurationError) as error:
        Client("garbage")

    assert "garbage" in str(error.value)


def test_a_client_that_cannot_reach_rabbitmq_says_so_without_the_password() -> None:
    # Nothing listens on port 1, so the connection is refused at once.
    with pytest.raises(SagaError) as error:
        Client("amqp://saga:s3cret-pw@127.0.0.1:1/")

    message = str(error.value)
    assert not isinstance(error.value, ConfigurationError)
    assert "cannot reach RabbitMQ" in message
    assert "127.0.0.1:1" in message
    assert "s3cret-pw" not in message

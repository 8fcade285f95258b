"""Without a broker the integration tests fail at once, in one line that says what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.stack import ROOT

CLOSED = "amqp://guest:guest@127.0.0.1:1/"


def pytest_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A pytest run of its own, in a subprocess, with SAGA_TEST_* taken from ``env`` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def amqp_only() -> Iterator[str]:
    """An AMQP URL where something listens, but no management API does."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/"


def test_no_broker_is_one_line_and_a_failure() -> None:
    run = pytest_run("tests/integration/test_saga_flows.py", SAGA_TEST_AMQP_URL=CLOSED)

    assert run.returncode == 3, run.stdout
    output = run.stdout + run.stderr
    assert len(output.splitlines()) < 15, output
    assert output.count("127.0.0.1:1") == 1, output
    assert "no RabbitMQ answers AMQP at 127.0.0.1:1" in output
    assert "SAGA_TEST_AMQP_URL" in output
    assert "Traceback" not in output and "ERROR" not in output


def test_amqp_without_the_management_api_says_to_enable_the_plugin(amqp_only: str) -> None:
    run = pytest_run(
        "tests/integration/test_saga_flows.py",
        SAGA_TEST_AMQP_URL=amqp_only,
        SAGA_TEST_MANAGEMENT_URL="http://127.0.0.1:1",
    )

    assert run.returncode == 3, run.stdout
    output = run.stdout + run.stderr
    assert len(output.splitlines()) < 15, output
    assert "rabbitmq-plugins enable rabbitmq_management" in output
    assert "Traceback" not in output and "ERROR" not in output


def test_unit_tests_need_no_broker() -> None:
    run = pytest_run("tests/unit/test_messages.py", "-q", SAGA_TEST_AMQP_URL=CLOSED)

    assert run.returncode == 0, run.stdout

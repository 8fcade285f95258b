"""Fixtures shared by every test: a real broker, a vhost per test, a stack of processes."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

from tests.integration.broker import Broker, from_environment, start_container
from tests.integration.stack import Stack

# The broker of this run (and the container behind it, if testcontainers started one).
_BROKER = pytest.StashKey[tuple[Broker, Any]]()
# Exit status when the broker (or PostgreSQL, or chromium) the selected tests need is not
# there: a failure, never a skip.
NO_BROKER = 3


def _broker_of(config: pytest.Config) -> Broker:
    """The run's broker, checked once; without one, end the run with one line saying why."""
    if _BROKER not in config.stash:
        try:
            broker = from_environment()
            if broker is not None:
                broker.check()
                config.stash[_BROKER] = (broker, None)
            else:
                config.stash[_BROKER] = start_container()
        except RuntimeError as exc:
            pytest.exit(f"no broker for the integration tests: {exc}", returncode=NO_BROKER)
    return config.stash[_BROKER][0]


# PostgreSQL runs on every development and CI machine here (trust auth, user postgres).
POSTGRES_URL = os.environ.get(
    "SAGA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _check_postgres() -> None:
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=5).close()
    except psycopg.Error as exc:
        pytest.exit(
            f"no PostgreSQL for the store tests at {POSTGRES_URL} ({exc}): start it, or set "
            "SAGA_TEST_POSTGRES_URL to one where this user may create schemas",
            returncode=NO_BROKER,
        )


def _check_chromium() -> None:
    from scripts.harness.browser import chromium_problem  # Playwright, only when needed

    problem = chromium_problem()
    if problem:
        pytest.exit(f"no browser for the console tests: {problem}", returncode=NO_BROKER)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Check the broker, PostgreSQL and chromium before the first test, if a selected test
    needs them."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("broker") for item in session.items):
        _broker_of(session.config)
    if any(item.get_closest_marker("postgres") for item in session.items):
        _check_postgres()
    if any(item.get_closest_marker("browser") for item in session.items):
        _check_chromium()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A URL of a fresh database of its own in the test PostgreSQL, dropped after the test.

    For a whole stack: the orchestrator's tables and a schema per participant in it.
    """
    name = f"saga_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
            db.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of a fresh schema of its own in the test PostgreSQL, dropped after the test."""
    schema = f"saga_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")


def pytest_unconfigure(config: pytest.Config) -> None:
    container = config.stash.get(_BROKER, (None, None))[1]
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def broker(pytestconfig: pytest.Config) -> Broker:
    """SAGA_TEST_AMQP_URL when set, else a testcontainers RabbitMQ; never a silent skip."""
    return _broker_of(pytestconfig)


@pytest.fixture(scope="session")
def user_prefix() -> str:
    """This run's prefix for RabbitMQ user names, so that runs never touch others' users."""
    return f"t{secrets.token_hex(4)}-"


@pytest.fixture
def amqp_url(broker: Broker) -> Iterator[str]:
    """The URL of a fresh vhost, deleted after the test."""
    vhost = f"saga-test-{uuid.uuid4().hex[:12]}"
    broker.create_vhost(vhost)
    try:
        yield broker.url_for(vhost)
    finally:
        broker.delete_vhost(vhost)


@pytest.fixture
def stack(amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    """Real service processes on the test's vhost; all stopped after the test."""
    stack = Stack(amqp_url, tmp_path)
    try:
        yield stack
    finally:
        stack.stop_all()

"""`saga provision`'s settings: user names from a prefix, and errors that never show a secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import Field

from messages.errors import ConfigurationError
from messages.plumbing.settings import BrokerSettings, load
from orchestrator.provision import ROLES, ProvisionSettings, permissions, user_names
from tests.integration.stack import ROOT

ADMIN_URL = "amqp://admin:hunter2-admin@127.0.0.1:1/orders"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in os.environ:
        if name.startswith("SAGA_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_user_names_are_the_roles_by_default() -> None:
    assert user_names("") == {role: role for role in ROLES}
    assert set(ROLES) == set(permissions())


def test_a_prefix_goes_before_every_user_name() -> None:
    assert user_names("t1a2b3c4-") == {role: f"t1a2b3c4-{role}" for role in ROLES}


@pytest.mark.parametrize("prefix", ["a b", "a:b", "a@b", "a/b", "ä"])
def test_a_prefix_unfit_for_a_url_is_refused(env: pytest.MonkeyPatch, prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        user_names(prefix)
    env.setenv("SAGA_USER_PREFIX", prefix)
    for role in ROLES:
        env.setenv(f"SAGA_{role.upper()}_PASSWORD", "x")
    with pytest.raises(ConfigurationError, match="SAGA_USER_PREFIX"):
        load(ProvisionSettings)


def test_the_prefix_is_a_setting(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_USER_PREFIX", "staging-")
    for role in ROLES:
        env.setenv(f"SAGA_{role.upper()}_PASSWORD", "x")
    assert load(ProvisionSettings).user_prefix == "staging-"


def test_provision_without_passwords_says_what_is_missing_and_shows_no_secret() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "provision"],
        cwd=ROOT,
        env={**environment, "SAGA_AMQP_URL": ADMIN_URL, "SAGA_CLIENT_PASSWORD": "hunter2-client"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 2
    output = run.stdout + run.stderr
    assert "hunter2" not in output
    missing = [f"SAGA_{role.upper()}_PASSWORD" for role in ROLES if role != "client"]
    for variable in missing:
        assert output.count(variable) == 1, output
        assert f"{variable} is not set" in output
    assert "SAGA_CLIENT_PASSWORD" not in output
    assert "{" not in output  # no dict of every input
    assert len(output.strip().splitlines()) == 1 + len(missing), output


class _Secrets(BrokerSettings):
    api_password: int = Field(default=0)
    service_token: int = Field(default=0)


def test_a_bad_value_is_shown_but_never_a_secret(env: pytest.MonkeyPatch) -> None:
    env.setenv("SAGA_AMQP_URL", "http://admin:hunter2@rabbitmq:5672/")
    env.setenv("SAGA_API_PASSWORD", "hunter3")
    env.setenv("SAGA_SERVICE_TOKEN", "hunter4")
    env.setenv("SAGA_PREFETCH", "lots")

    with pytest.raises(ConfigurationError) as error:
        load(_Secrets)

    message = str(error.value)
    assert "hunter" not in message
    assert "http://admin:***@rabbitmq:5672/" in message
    assert "SAGA_PREFETCH='lots'" in message
    assert "SAGA_API_PASSWORD='***'" in message
    assert "SAGA_SERVICE_TOKEN='***'" in message
    assert error.value.__suppress_context__  # pydantic's error repeats every input

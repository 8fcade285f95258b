"""The orchestrator process's settings (SAGA_* environment variables)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from messages.contract.topology import PARTICIPANTS
from messages.plumbing.settings import ServiceSettings


class OrchestratorSettings(ServiceSettings):
    """Everything `python -m orchestrator` reads from the environment."""

    step_timeout_s: float = Field(
        default=5.0, gt=0, description="Deadline of a step's first attempt"
    )
    step_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Sends of a command before the pivot before the saga compensates it; "
        "the pivot, later steps and compensations are resent until answered",
    )
    retry_backoff: float = Field(
        default=2.0, ge=1.0, description="Each further attempt waits this many times longer"
    )
    max_retry_wait_s: float = Field(
        default=60.0, gt=0, description="Cap on the wait of any one attempt"
    )
    tick_s: float = Field(default=0.2, gt=0, description="How often deadlines are checked")
    stuck_after_s: float = Field(
        default=300.0,
        gt=0,
        description="A saga waiting this long for one reply is stuck: listed, counted, abortable",
    )
    store_url: str = Field(
        default="",
        description="Where saga state lives: empty for orchestrator.db in SAGA_DATA_DIR (SQLite, "
        "one orchestrator), a path to another SQLite file, or postgresql://... (several "
        "orchestrators may share it)",
    )
    participant_users: str = Field(
        default="",
        description="participant=RabbitMQ user,...: accept a participant's replies only from "
        "its user (e.g. inventory=inventory,payment=payment,order=order); empty: not checked",
    )

    @field_validator("participant_users")
    @classmethod
    def _users(cls, value: str) -> str:
        parse_users(value)
        return value

    @property
    def reply_users(self) -> dict[str, str]:
        """Participant -> the only RabbitMQ user whose replies count for it."""
        return parse_users(self.participant_users)

    @property
    def db_path(self) -> Path:
        """The SQLite file, when the store is one."""
        if self.store_url and not self.postgres:
            return Path(self.store_url)
        return self.data_dir / "orchestrator.db"

    @property
    def postgres(self) -> bool:
        """Whether the store is a PostgreSQL database."""
        return self.store_url.startswith(("postgresql://", "postgres://"))


def parse_users(text: str) -> dict[str, str]:
    """'inventory=inv,payment=pay' as a dict; raise ValueError naming what is wrong."""
    users: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, user = (x.strip() for x in item.partition("="))
        if not sep or not name or not user:
            raise ValueError(f"expected participant=user, got {item!r}")
        if name not in PARTICIPANTS:
            raise ValueError(f"{name!r} is not a participant ({', '.join(PARTICIPANTS)})")
        users[name] = user
    return users


class WebSettings(OrchestratorSettings):
    """What `saga web` reads beside the orchestrator's settings (the store, the broker)."""

    web_host: str = Field(
        default="127.0.0.1",
        description="Address the console listens on; 0.0.0.0 to reach it from other machines",
    )
    web_port: int = Field(default=8080, ge=1, le=65535, description="Port of the console")
    web_operators: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Who may abort and retry, as JSON: {"alice": "password", ...}; '
        "empty: the console is read-only",
    )
    web_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs session cookies (32 characters or more: whoever knows it "
        "can make a session of any operator); unset: a new one at every start, which signs "
        "every operator out",
    )
    management_url: str | None = Field(
        default=None,
        description="RabbitMQ management API for the dead-letter queues; may carry its own "
        "user (http://admin:password@rabbitmq:15672); default http://<broker host>:15672 "
        "with SAGA_AMQP_URL's user",
    )
    web_refresh_s: float = Field(
        default=1.0, gt=0, description="How often live pages look for changes in the store"
    )

    @field_validator("web_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # empty (compose's default): a new key at every start
        if len(value.get_secret_value()) < 32:
            raise ValueError("32 characters or more: it signs operators' sessions")
        return value

    @field_validator("web_operators")
    @classmethod
    def _operators(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, password in value.items():
            if not OPERATOR.fullmatch(name):
                raise ValueError(f"operator name {name!r}: letters, digits, '.', '_', '-'")
            if len(password.get_secret_value()) < 8:
                raise ValueError(f"operator {name!r}: the password needs 8 characters or more")
        return value


OPERATOR = re.compile(r"[A-Za-z0-9._-]{1,64}")

"""Settings every process shares. Each process has one settings class built on this one."""

from __future__ import annotations

import re
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from yarl import URL

from messages.errors import ConfigurationError

S = TypeVar("S", bound=BaseSettings)


def tls_context(url: str, ca_file: Path | None) -> ssl.SSLContext | None:
    """For an amqps:// URL, a context that verifies the broker (with ``ca_file`` if given)."""
    if URL(url).scheme != "amqps":
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"SAGA_CA_FILE={ca_file}: cannot load it: {exc}") from exc


def check_amqp_url(url: str) -> str:
    """Return ``url`` if it names a RabbitMQ host (amqp:// or amqps://), else raise ValueError."""
    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    del port  # read only to reject a bad one; none given means the scheme's default
    if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise ValueError("expected amqp://user:password@host:port/vhost (or amqps://)")
    return url


def split_amqp_urls(value: str) -> list[str]:
    """The node URLs of a SAGA_AMQP_URL: one URL, or several separated by commas.

    Each must name a RabbitMQ host (see ``check_amqp_url``), and all must log in as the same
    user to the same vhost: a cluster shares its users and vhosts, and a service's identity
    (the ``user_id`` its replies carry) must not change with the node it reaches. Hosts,
    ports, schemes and passwords may differ. A ValueError names the bad entry.
    """
    urls = [part.strip() for part in value.split(",")]
    several = len(urls) > 1
    for number, url in enumerate(urls, 1):
        where = f"entry {number} ({redact(url)!r})" if several else ""
        if not url and several:
            raise ValueError(f"entry {number} is empty: separate node URLs with single commas")
        try:
            check_amqp_url(url)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if several else str(exc)) from None
        if number > 1 and _identity(url) != _identity(urls[0]):
            user, vhost = _identity(urls[0])
            raise ValueError(
                f"{where}: every node URL must log in as the same user to the same vhost "
                f"(entry 1: user {user!r}, vhost {vhost!r})"
            )
    return urls


def _identity(url: str) -> tuple[str, str]:
    """(user, vhost) of a node URL, with RabbitMQ's defaults for what it leaves out."""
    parsed = URL(url)
    return parsed.user or "guest", parsed.path[1:] or "/"


def first_amqp_url(value: str) -> str:
    """The first node URL of a SAGA_AMQP_URL (for what needs one: the management API, say)."""
    return value.split(",", 1)[0].strip()


def redact(url: str) -> str:
    """The URL with its password hidden, fit for a log line or an error message.

    A comma-separated list of node URLs comes back with every password hidden.
    """
    if "," in url:
        return ",".join(redact(part.strip()) for part in url.split(","))
    try:
        parsed = URL(url)
        return str(parsed.with_password("***")) if parsed.password else url
    except ValueError:
        return "(an unreadable URL)"


# Settings whose values are never shown, in part or whole.
_SECRET = re.compile(r"password|secret|token|operators", re.IGNORECASE)


def _shown(field: str, value: object) -> str:
    """``value`` as an error message may show it: secrets masked, URLs without passwords."""
    if _SECRET.search(field) or isinstance(value, SecretStr):
        return "'***'"
    if isinstance(value, str) and "://" in value:
        return repr(redact(value))
    return repr(value)


def _problem(cls: type[BaseSettings], error: ErrorDetails) -> str:
    """One line about one bad or missing setting, naming its variable."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    field = str(error["loc"][0]) if error["loc"] else ""
    variable = (prefix + field).upper() if field else cls.__name__
    if error["type"] == "missing":
        info = cls.model_fields.get(field)
        what = f" ({info.description})" if info and info.description else ""
        return f"{variable} is not set{what}"
    reason = error["msg"].removeprefix("Value error, ")
    return f"{variable}={_shown(field, error['input'])}: {reason}"


def load(cls: type[S]) -> S:
    """Read settings from the environment; a bad value is a ConfigurationError naming it.

    The message has one line per problem and never shows a secret.
    """
    try:
        return cls()
    except SettingsError as exc:  # a value that should be JSON (a dict, a list) is not
        raise ConfigurationError(f"invalid setting: {exc} (expected JSON)") from None
    except ValidationError as exc:
        problems = [_problem(cls, e) for e in exc.errors()]
        if len(problems) == 1:
            raise ConfigurationError(f"invalid setting: {problems[0]}") from None
        lines = "".join(f"\n  {p}" for p in problems)
        raise ConfigurationError(f"invalid settings:{lines}") from None


class BrokerSettings(BaseSettings):
    """How to reach RabbitMQ and how much to take from it. Read from SAGA_* variables."""

    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore")

    amqp_url: str = Field(
        default="amqp://guest:guest@localhost:5672/",
        description="RabbitMQ URL (vhost included), or several nodes' URLs separated by commas",
    )
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="Type of every queue the services declare: classic, or quorum (replicated; "
        "the broker counts deliveries and dead-letters)",
    )
    prefetch: int = Field(default=64, ge=1, le=65535, description="Unacked deliveries per consumer")
    max_message_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Larger bodies are dead-lettered unread"
    )
    declare_topology: bool = Field(
        default=True,
        description="Declare exchanges and queues at start; false: only check they exist",
    )
    ca_file: Path | None = Field(
        default=None, description="CA certificate(s) to verify the broker with, for amqps://"
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="Deliveries of a message whose handling fails before it is dead-lettered",
    )
    connect_retry_s: float = Field(
        default=2.0, gt=0, description="Wait between attempts to reach the broker"
    )
    connect_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest wait for connecting, declaring and starting consumers",
    )
    broker_give_up_s: float = Field(
        default=300.0,
        gt=0,
        description="Exit (code 69) when the broker stays out of reach this long, for the "
        "supervisor to restart the service",
    )
    publish_timeout_s: float = Field(
        default=15.0, gt=0, description="Longest wait for the broker's confirm of a publish"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        split_amqp_urls(value)
        return value

    @property
    def amqp_urls(self) -> list[str]:
        """The node URLs of amqp_url, in the order given: services try them in turn."""
        return split_amqp_urls(self.amqp_url)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("queue_type", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Serve Prometheus metrics on this port; 0: off"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text for people, json (one object per line) for machines"
    )


class ServiceSettings(BrokerSettings):
    """A broker-connected service that keeps its state in SQLite files under data_dir."""

    data_dir: Path = Field(default=Path("data"), description="Where the SQLite files live")
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Finished sagas and processed-command records are deleted this long after "
        "they end; requests and commands older than this are refused",
    )

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

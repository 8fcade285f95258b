"""The one participant runtime: consume, decode, dedupe, handle, commit, reply, ack.

A participant is business logic only: a schema and one plain function per command type.
The handler runs inside a transaction that also records the command id with its reply, so
a redelivered command gets the original reply back and has no second effect.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from messages.contract import topology
from messages.contract.codec import decode
from messages.contract.models import (
    MESSAGE_TYPES,
    Command,
    CommandFailed,
    CommandSucceeded,
    Envelope,
    Reply,
    message_types,
)
from messages.errors import Rejected
from messages.plumbing import amqp, tracing
from messages.plumbing import health as liveness
from messages.plumbing.batching import GroupCommit
from messages.plumbing.service import run_all
from messages.plumbing.settings import BrokerSettings, ServiceSettings
from workers.db import Database, open_database, transaction
from workers.faults import Faults

log = logging.getLogger(__name__)

COMMANDS = Counter(
    "saga_commands",
    "Commands handled, by participant, command and reply (CommandSucceeded, CommandFailed, "
    "or repeat: answered from the dedupe record)",
    ["participant", "command", "outcome"],
)
COMMAND_SECONDS = Histogram(
    "saga_command_duration_seconds",
    "From receiving a command to its reply being confirmed by the broker",
    ["participant", "command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


@dataclass(frozen=True)
class Succeeded:
    """The handler applied the command."""

    detail: str = ""


@dataclass(frozen=True)
class Failed:
    """The handler refused the command and changed nothing; ``reason`` is machine-readable."""

    reason: str
    detail: str = ""


Outcome = Succeeded | Failed
Handler = Callable[[Any, Database], Outcome]

_RUNTIME_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed_commands (
    command_id   TEXT PRIMARY KEY,
    saga_id      TEXT NOT NULL,
    command_type TEXT NOT NULL,
    reply        BLOB NOT NULL,
    processed_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS processed_commands_at ON processed_commands (processed_at);
"""
PRUNE_EVERY_S = 3600.0  # how often processed-command records past the retention are deleted
PRUNE_BATCH = 1000  # records deleted per transaction, so commands never wait long behind it
# Kept a day past the retention: commands older than the retention are refused, and an
# orchestrator whose clock runs a little ahead must not slip between the two.
PRUNE_MARGIN = timedelta(days=1)


@dataclass(frozen=True)
class Participant:
    """A participant's business logic: its tables, and a handler per command type."""

    name: str
    schema: str
    handlers: Mapping[type[Command], Handler]


def open_db(path: Path, schema: str, url: str = "", name: str = "") -> Database:
    """The participant's own database, with its tables and the dedupe record.

    The SQLite file at ``path``; or, with a PostgreSQL ``url``, the schema ``name`` in it.
    """
    return open_database(url, path, name, _RUNTIME_SCHEMA + schema)


@dataclass(frozen=True)
class Handled:
    """The reply to a command, and whether it was a repeat answered from the dedupe record."""

    reply: Reply
    repeat: bool = False


def apply_batch(
    participant: Participant,
    db: Database,
    retention: timedelta,
    commands: list[tuple[Command, contextvars.Context]],
) -> list[Handled | Exception]:
    """Handle commands in one transaction (one fsync), each exactly once.

    Each command runs in its own savepoint, so one that raises is undone alone and gets its
    exception back while the others commit; and in the context it was received in (saga id
    and trace for the logs), though this runs in the writer thread.
    """
    results: list[Handled | Exception] = []
    with transaction(db):
        for command, context in commands:
            db.execute("SAVEPOINT command")
            try:
                results.append(context.run(_apply, participant, db, retention, command))
            except Exception as exc:
                db.execute("ROLLBACK TO command")
                results.append(exc)
            db.execute("RELEASE command")
    return results


def _apply(
    participant: Participant, db: Database, retention: timedelta, command: Command
) -> Handled:
    """Handle ``command`` exactly once; a repeat returns the first reply unchanged.

    A command older than the retention that is not in the dedupe record is refused: its
    record may have been pruned, and handling it again could charge a customer twice.
    """
    handler = participant.handlers.get(type(command))
    if handler is None:
        raise Rejected("unexpected_type", f"{participant.name} does not handle {command.type}")
    row = db.execute(
        "SELECT reply FROM processed_commands WHERE command_id = ?", (str(command.message_id),)
    ).fetchone()
    if row is not None:
        log.info(
            "%s %s already processed: answering with the original reply",
            command.type,
            command.message_id,
        )
        stored = decode(row[0])
        assert isinstance(stored, Reply)
        return Handled(stored, repeat=True)
    if command.created_at < datetime.now(UTC) - retention:
        raise Rejected(
            "too_old",
            f"sent at {command.created_at.isoformat()}, longer ago than the retention "
            f"(SAGA_RETENTION_DAYS={retention.total_seconds() / 86400:g})",
        )
    outcome = handler(command, db)
    reply = _reply(participant.name, command, outcome)
    db.execute(
        "INSERT INTO processed_commands VALUES (?, ?, ?, ?, ?)",
        (
            str(command.message_id),
            str(command.saga_id),
            command.type,
            reply.model_dump_json().encode(),
            datetime.now(UTC).isoformat(),
        ),
    )
    if isinstance(outcome, Failed):
        log.info("%s refused: %s %s", command.type, outcome.reason, outcome.detail)
    return Handled(reply)


def prune(db: Database, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` processed-command records older than ``before``."""
    with transaction(db):
        return db.execute(
            "DELETE FROM processed_commands WHERE command_id IN (SELECT command_id FROM"
            " processed_commands WHERE processed_at < ? LIMIT ?)",
            (before.isoformat(), limit),
        ).rowcount


async def _pruner(
    participant: str, group: GroupCommit[Any, Any], db: Database, retention: timedelta
) -> None:
    """Delete processed-command records once they are older than the retention, every hour."""
    while True:
        before = datetime.now(UTC) - retention - PRUNE_MARGIN
        pruned = 0
        try:
            while True:
                # In the writer thread, between commits: it alone uses the database.
                batch = await group.run(functools.partial(prune, db, before, PRUNE_BATCH))
                pruned += batch
                if batch < PRUNE_BATCH:
                    break
        except Exception:
            log.exception("%s: pruning processed commands failed; trying again later", participant)
        if pruned:
            log.info(
                "%s: pruned %d processed-command record(s) from before %s",
                participant,
                pruned,
                before.isoformat(timespec="seconds"),
            )
        await asyncio.sleep(PRUNE_EVERY_S)


def _reply(participant: str, command: Command, outcome: Outcome) -> Reply:
    common: dict[str, Any] = {
        "saga_id": command.saga_id,
        "command_id": command.message_id,
        "command_type": command.type,
        "participant": participant,
        "detail": outcome.detail,
    }
    if isinstance(outcome, Failed):
        return CommandFailed(reason=outcome.reason, **common)
    return CommandSucceeded(**common)


async def serve(
    participants: list[Participant],
    dbs: Mapping[str, Database],
    settings: ServiceSettings,
    health_name: str,
    faults: Faults | None = None,
) -> None:
    """Consume each participant's command queue on its own channel; reply with confirms.

    Runs until cancelled, starting over on a new connection whenever it loses one; raises
    BrokerUnavailableError when the broker stays away longer than SAGA_BROKER_GIVE_UP_S.
    """
    if faults is not None:
        log.warning("fault injection is ON: %s", faults)
    # Replies carry our login as user_id (RabbitMQ checks it), so the orchestrator can tell
    # which service sent them.
    login = amqp.amqp_user(settings)
    # The decoder knows the commands these participants handle (a saga declared outside
    # messages/contract brings commands of its own).
    types = {**MESSAGE_TYPES, **message_types(*(c for p in participants for c in p.handlers))}

    async def setup(session: amqp.Session) -> None:
        publish_channel = await session.channel(confirms=True)
        await amqp.declare_topology(publish_channel, settings)
        publisher = await amqp.Publisher.on(publish_channel)
        for participant in participants:
            group = groups[participant.name]
            handler = _on_command(participant, group, publisher, faults, login, settings)
            queue = topology.command_queue(participant.name)
            await session.consume(queue, publisher, handler, settings, types=types)
            url = amqp.redact(settings.amqp_url)
            log.info("%s ready: consuming %s on %s", participant.name, queue, url)

    # Each participant's commits run in a writer thread of its own, which alone uses its db.
    groups = {
        p.name: GroupCommit[tuple[Command, contextvars.Context], Handled](
            functools.partial(apply_batch, p, dbs[p.name], settings.retention),
            name=f"{p.name}-writer",
        )
        for p in participants
    }
    queues = [topology.command_queue(p.name) for p in participants]
    health = liveness.Health(liveness.path(settings.data_dir, health_name), queues)
    connected = amqp.run_connected(settings, f"workers:{health_name}", setup, health)
    try:
        pruners = {
            f"{p.name}-pruner": _pruner(p.name, groups[p.name], dbs[p.name], settings.retention)
            for p in participants
        }
        await run_all({"health": health.run(), "connection": connected, **pruners})
    finally:
        for group in groups.values():
            group.close()  # the commit in progress finishes before the databases close


def _on_command(
    participant: Participant,
    group: GroupCommit[tuple[Command, contextvars.Context], Handled],
    publisher: amqp.Publisher,
    faults: Faults | None,
    login: str,
    settings: BrokerSettings,
) -> amqp.Handler:
    async def on_command(message: Envelope, delivery: amqp.Delivery) -> None:
        if not isinstance(message, Command):
            raise Rejected("unexpected_type", f"{message.type} is not a command")
        began = time.perf_counter()
        handled = await group.submit((message, contextvars.copy_context()))
        headers = tracing.outgoing()

        async def reply() -> None:
            await publisher.publish(
                topology.REPLIES_EXCHANGE,
                handled.reply,
                topology.REPLY_ROUTING_KEY,
                headers=headers,
                user_id=login,
                timeout=settings.publish_timeout_s,
            )

        # Not acked until the reply is confirmed: a crash here means a redelivery, which
        # the dedupe record answers with this same reply.
        if faults is None:
            await reply()
        else:  # a chaos run: the reply may be dropped, delayed, doubled, or never sent
            await faults.send(participant.name, reply)
        outcome = "repeat" if handled.repeat else handled.reply.type
        COMMANDS.labels(participant.name, message.type, outcome).inc()
        COMMAND_SECONDS.labels(participant.name, message.type).observe(time.perf_counter() - began)

    return on_command

"""SagaStore in one SQLite file: the embedded default, one orchestrator per file."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from messages.contract.models import SagaStatus
from messages.errors import AlreadyRunningError, ConcurrentUpdateError, UnreadableSagaError
from messages.plumbing.sqlite import open_sqlite
from orchestrator.engine import SagaState
from orchestrator.store.base import (
    OUTBOX_COLUMNS,
    OutboxMessage,
    SagaStats,
    SqlStore,
    load,
    outbox_row,
    outbox_values,
    ts,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas (
    saga_id    TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    reason     TEXT,
    deadline   REAL,
    version    INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_deadline ON sagas (deadline) WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_status ON sagas (status, created_at);
-- For pruning: finished sagas by when they ended (a saga enters it once, when it ends).
CREATE INDEX IF NOT EXISTS sagas_ended ON sagas (updated_at)
    WHERE status IN ('COMPLETED', 'COMPENSATED', 'FAILED');
CREATE TABLE IF NOT EXISTS outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id        TEXT NOT NULL,
    exchange       TEXT NOT NULL,
    routing_key    TEXT NOT NULL,
    mandatory      INTEGER NOT NULL,
    traceparent    TEXT,
    type           TEXT NOT NULL,
    message_id     TEXT NOT NULL,
    content_type   TEXT NOT NULL,
    timestamp      REAL NOT NULL,
    body           BLOB NOT NULL,
    owner          TEXT
);
"""


class SqliteStore(SqlStore):
    """SagaStore in one SQLite file.

    Two connections: writes go through one, under a lock, from whichever thread commits
    (the runtime's writer thread, mostly); reads go through the other, so the event loop
    reads the latest committed state (WAL) without waiting for a commit's fsync.
    """

    shared = False  # the lock file makes this process the store's only writer
    MARK = "?"
    INPUT_FIELD = "json_extract(state, '$.input.' || ?)"
    MINUTE = "CAST(updated_at / 60 AS INTEGER)"

    def __init__(self, path: Path, *, readonly: bool = False, live: bool = False) -> None:
        self.readonly = readonly
        self._lock = None if readonly else _lock_exclusively(path)
        self.owner = uuid.uuid4().hex  # rows of an earlier run have another owner
        self._db = open_sqlite(path, readonly=readonly, any_thread=True, snapshot_ok=not live)
        self._read = self._db if readonly else open_sqlite(path)
        self._writing = threading.Lock()
        if not readonly:
            with self._writing, self._db:
                self._db.executescript(_SCHEMA)
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(sagas)")}
                if "waiting_since" not in columns:  # stores made before "stuck" existed
                    self._db.execute("ALTER TABLE sagas ADD COLUMN waiting_since REAL")
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
                if "owner" not in columns:  # stores made before outbox leases
                    self._db.execute("ALTER TABLE outbox ADD COLUMN owner TEXT")

    def get(self, saga_id: UUID) -> SagaState | None:
        row = self._read.execute(
            "SELECT state, status FROM sagas WHERE saga_id = ?", (str(saga_id),)
        ).fetchone()
        return self.loaded(saga_id, row)

    def commit_many(
        self,
        changes: Sequence[tuple[SagaState, Sequence[OutboxMessage]]],
        published: Sequence[int] = (),
    ) -> list[list[OutboxMessage]]:
        with self._writing, self._db:
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in published])
            return [self._write(state, outbox) for state, outbox in changes]

    def _write(self, state: SagaState, outbox: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        stored = state.model_copy(update={"version": state.version + 1})
        values = (
            stored.status.value,
            stored.reason,
            ts(stored.deadline),
            ts(stored.waiting_since),
            stored.version,
            ts(stored.updated_at),
            stored.model_dump_json(),
            str(stored.saga_id),
        )
        if state.version == 0:
            if self._db.execute(
                "SELECT 1 FROM sagas WHERE saga_id = ?", (str(state.saga_id),)
            ).fetchone():
                raise ConcurrentUpdateError(f"saga {state.saga_id} already exists")
            self._db.execute(
                "INSERT INTO sagas (status, reason, deadline, waiting_since, version, updated_at,"
                " state, saga_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, ts(stored.created_at)),
            )
        else:
            updated = self._db.execute(
                "UPDATE sagas SET status = ?, reason = ?, deadline = ?, waiting_since = ?,"
                " version = ?, updated_at = ?, state = ? WHERE saga_id = ? AND version = ?",
                (*values, state.version),
            ).rowcount
            if updated != 1:
                raise ConcurrentUpdateError(f"saga {state.saga_id} changed since it was read")
        stored_rows = []
        for m in outbox:
            row_id = self._db.execute(
                "INSERT INTO outbox (saga_id, exchange, routing_key, mandatory, traceparent, type,"
                " message_id, content_type, timestamp, body, owner)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                outbox_values(state.saga_id, m, self.owner),
            ).lastrowid
            stored_rows.append(dataclasses.replace(m, id=row_id))
        return stored_rows

    def due(self, now: datetime, limit: int) -> list[SagaState]:
        rows = self._read.execute(
            "SELECT saga_id, state FROM sagas WHERE deadline <= ? ORDER BY deadline LIMIT ?",
            (now.timestamp(), limit),
        ).fetchall()
        due = []
        for saga_id, blob in rows:
            try:
                due.append(load(saga_id, blob))
            except UnreadableSagaError as exc:
                self.quarantine(UUID(saga_id), str(exc))
        return due

    def quarantine(self, saga_id: UUID, why: str) -> None:
        log.error("saga %s quarantined: %s", saga_id, why, extra={"saga_id": str(saga_id)})
        with self._writing, self._db:
            self._db.execute(
                # A new version, so a decision about to commit on the old state fails.
                "UPDATE sagas SET status = ?, reason = ?, deadline = NULL, waiting_since = NULL,"
                " version = version + 1 WHERE saga_id = ?",
                (SagaStatus.QUARANTINED.value, why[:500], str(saga_id)),
            )

    def quarantined(self, limit: int) -> list[tuple[str, str, datetime]]:
        rows = self._read.execute(
            "SELECT saga_id, reason, updated_at FROM sagas WHERE status = ?"
            " ORDER BY updated_at DESC LIMIT ?",
            (SagaStatus.QUARANTINED.value, limit),
        )
        return [(i, why, datetime.fromtimestamp(at, UTC)) for i, why, at in rows]

    def stuck(self, now: datetime, after_s: float) -> int:
        cutoff = now.timestamp() - after_s
        row = self._read.execute("SELECT count(*) FROM sagas WHERE waiting_since <= ?", (cutoff,))
        return int(row.fetchone()[0])

    def outbox(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        rows = self._read.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [outbox_row(row) for row in rows]

    def prune(self, ended_before: datetime, limit: int) -> int:
        with self._writing, self._db:
            return self._db.execute(
                # By when they ended, not a walk over every finished saga: the statuses as
                # the index writes them, and INDEXED BY, since SQLite would pick sagas_status.
                "DELETE FROM sagas WHERE saga_id IN (SELECT saga_id FROM sagas INDEXED BY"
                " sagas_ended WHERE status IN ('COMPLETED', 'COMPENSATED', 'FAILED')"
                " AND updated_at < ? LIMIT ?)",
                (ended_before.timestamp(), limit),
            ).rowcount

    def heartbeat(self) -> None:
        pass  # no other writer to tell: the lock file keeps them out

    def claim_orphans(self, limit: int) -> list[OutboxMessage]:
        with self._writing, self._db:
            rows = self._db.execute(
                f"UPDATE outbox SET owner = ? WHERE id IN (SELECT id FROM outbox"
                f" WHERE owner IS NULL OR owner != ? ORDER BY id LIMIT ?)"
                f" RETURNING {OUTBOX_COLUMNS}",
                (self.owner, self.owner, limit),
            ).fetchall()
        return sorted((outbox_row(row) for row in rows), key=lambda row: row.id or 0)

    def outbox_done(self, ids: Iterable[int]) -> None:
        with self._writing, self._db:
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def outbox_depth(self) -> int:
        return int(self._read.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def outbox_holds(self, message_id: str) -> bool:
        # No index: asked only when a deadline passes, and the outbox is short.
        row = self._read.execute("SELECT 1 FROM outbox WHERE message_id = ? LIMIT 1", (message_id,))
        return row.fetchone() is not None

    def _select(self, sql: str, args: Sequence[object]) -> list[Sequence[object]]:
        return list(self._read.execute(sql, args))

    def counts(self) -> dict[str, int]:
        return dict(self._read.execute("SELECT status, count(*) FROM sagas GROUP BY status"))

    def stats(self) -> SagaStats:
        by_status = self.counts()
        finished = tuple(s.value for s in SagaStatus if s.finished)
        marks = ",".join("?" * len(finished))
        by_outcome = {
            f"{status} {reason or ''}".strip(): count
            for status, reason, count in self._read.execute(
                f"SELECT status, reason, count(*) FROM sagas WHERE status IN ({marks})"
                " GROUP BY status, reason ORDER BY count(*) DESC",
                finished,
            )
        }
        durations = sorted(
            row[0]
            for row in self._read.execute(
                f"SELECT updated_at - created_at FROM sagas WHERE status IN ({marks})", finished
            )
        )
        oldest = self._read.execute(
            "SELECT state FROM sagas WHERE status IN (?, ?) ORDER BY created_at LIMIT 1",
            (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value),
        ).fetchone()
        return SagaStats(
            by_status=by_status,
            by_outcome=by_outcome,
            durations_s=durations,
            oldest_running=None if oldest is None else load("oldest running", oldest[0]),
        )

    def close(self) -> None:
        if self._read is not self._db:
            self._read.close()
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)


def _lock_exclusively(path: Path) -> int:
    """Hold a lock beside the store for the life of the process: one writer per store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunningError(
            f"another orchestrator (pid {holder}) is using the store {path}: "
            "one orchestrator per store; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd

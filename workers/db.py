"""A participant's own database: a SQLite file (the default) or a PostgreSQL schema.

Handlers write the SQL both engines share, with ``?`` placeholders, and get either a
``sqlite3.Connection`` or a ``PostgresDb`` that speaks the same few methods. On PostgreSQL
each participant has a schema of its own, named after it, so several replicas of one
participant share its state and compete for its queue; what keeps them correct is in the
SQL itself (conditional updates, primary keys), not in a lock only one process holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg

from messages.errors import ConfigurationError, StoreTransientError
from messages.plumbing.sqlite import open_sqlite


class Rows(Protocol):
    """What a statement returns: the part of a DB-API cursor handlers use."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """What handlers may do with their participant's database."""

    def execute(self, sql: str, args: Sequence[Any] = ..., /) -> Rows: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class PostgresDb:
    """A PostgreSQL connection that takes ``?`` placeholders, in its participant's schema."""

    def __init__(self, url: str, schema: str, *, create: bool = True) -> None:
        self.url = url
        self.schema = schema
        try:
            self._db = self._connect()
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot reach the participant database: {exc}") from exc
        found = self._db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if found.fetchone() is None:
            if not create:
                self._db.close()
                raise ConfigurationError(
                    f"no schema {schema!r} in the participant database: the participant "
                    "creates it when it first runs"
                )
            # Two replicas starting at once: the second waits for the first's schema.
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
                self._db.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        self._db.execute(f'SET search_path TO "{schema}"')

    def _connect(self) -> psycopg.Connection[Any]:
        db = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        with contextlib.suppress(psycopg.Error):  # no schema yet: __init__ makes it
            db.execute(f'SET search_path TO "{self.schema}"')
        return db

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Rows:
        try:
            return self._db.execute(_placeholders(sql), args)
        except (psycopg.errors.TransactionRollback, psycopg.errors.DeadlockDetected) as exc:
            # A deadlock or serialization failure between replicas: the command's savepoint
            # is rolled back, and the message comes back uncounted.
            raise StoreTransientError(f"the participant database gave up: {exc}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        with self._db.cursor() as cursor:
            cursor.executemany(_placeholders(sql), rows)

    def script(self, sql: str) -> None:
        """Run DDL written for both engines (BLOB is BYTEA here), one replica at a time."""
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
            self._db.execute(sql.replace(" BLOB ", " BYTEA "))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; a database that does not answer is StoreTransientError.

        A connection that broke (the server restarted, say) is replaced at the next one.
        """
        try:
            if self._db.broken or self._db.closed:
                self._db = self._connect()
            with self._db.transaction():
                yield
        except psycopg.OperationalError as exc:
            raise StoreTransientError(f"the participant database did not answer: {exc}") from exc

    def close(self) -> None:
        self._db.close()


def _placeholders(sql: str) -> str:
    # Our statements hold no literal ? or %: the translation is a plain replace.
    return sql.replace("?", "%s")


def is_postgres(url: str) -> bool:
    """Whether a database URL names PostgreSQL."""
    return url.startswith(("postgresql://", "postgres://"))


def open_database(url: str, path: Path, participant: str, schema: str) -> Database:
    """The participant's database, its tables created on first use.

    With ``url`` a PostgreSQL one, the schema named after the participant in it; else the
    SQLite file at ``path``, in autocommit mode: transactions are explicit
    (``transaction``), so the dedupe record and the state change always commit together.
    """
    if is_postgres(url):
        db = PostgresDb(url, participant)
        db.script(schema)
        return db
    path.parent.mkdir(parents=True, exist_ok=True)
    # Used by the participant's writer thread, after its creator (the main thread) seeds it.
    sqlite = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    sqlite.execute("PRAGMA journal_mode=WAL")
    sqlite.execute("PRAGMA synchronous=FULL")
    sqlite.execute("PRAGMA busy_timeout=5000")
    sqlite.executescript(schema)
    return sqlite


def open_reader(url: str, path: Path, participant: str) -> Database:
    """The participant's database to read only (for its command line); creates nothing."""
    if is_postgres(url):
        return PostgresDb(url, participant, create=False)
    return open_sqlite(path, readonly=True)


@contextmanager
def transaction(db: Database) -> Iterator[Database]:
    """One transaction: on SQLite BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
    if isinstance(db, PostgresDb):
        with db.transaction():
            yield db
        return
    assert isinstance(db, sqlite3.Connection)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full, I/O error) leaves the transaction open; close it, or
        # every later BEGIN fails and the participant is stuck until restarted.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise

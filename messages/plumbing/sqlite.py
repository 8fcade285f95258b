"""Opening the services' SQLite files: WAL and full fsync to write; reading writes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from messages.errors import SagaError


def open_sqlite(
    path: Path, *, readonly: bool = False, any_thread: bool = False, snapshot_ok: bool = True
) -> sqlite3.Connection:
    """A connection in WAL mode with full fsync: a committed saga survives a power cut.

    ``readonly`` also works where nothing can be written, not even SQLite's ``-shm`` file:
    a read-only copy of the data, or a read-only mount; then the file is read as a snapshot
    that cannot change, unless ``snapshot_ok`` is false (a reader that runs on and must see
    later writes): then that is an error. ``any_thread``: the connection may be used from
    another thread than its creator's (one at a time: the caller locks).
    """
    if readonly:
        return _open_readonly(path, any_thread, snapshot_ok)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=not any_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _open_readonly(path: Path, any_thread: bool, snapshot_ok: bool) -> sqlite3.Connection:
    if not path.exists():
        raise SagaError(f"no store at {path}: has the service run with this SAGA_DATA_DIR?")
    uri = path.resolve().as_uri()
    conn = _probe(f"{uri}?mode=ro", any_thread)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN:
            raise
    # A WAL reader needs the -shm file, and creates it when it is missing. When it can be
    # neither found nor created (a read-only copy or mount), no writer can be at work here
    # either, since every writer keeps -shm open: the file cannot change under us, which is
    # exactly what immutable=1 lets SQLite assume.
    if not snapshot_ok:
        raise SagaError(
            f"cannot follow {path}: SQLite cannot create its -shm file beside it (a read-only "
            "directory or mount?), so later writes would never show. Make the directory "
            "writable for this process: it opens the store read-only all the same"
        )
    conn = _probe(f"{uri}?mode=ro&immutable=1", any_thread)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return conn


def _probe(uri: str, any_thread: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, check_same_thread=not any_thread)
    conn.execute("PRAGMA busy_timeout=5000")  # before the first read: it may wait for a writer
    return conn

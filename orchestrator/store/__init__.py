"""Durable saga state and the outbox: the SagaStore protocol, and a store for each engine.

SQLite (one file, one orchestrator) is the embedded default; PostgreSQL lets several
orchestrators share one store. ``open_store`` picks one from SAGA_STORE_URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.store.base import OutboxMessage, SagaFilter, SagaStats, SagaStore, order_fields
from orchestrator.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from orchestrator.settings import OrchestratorSettings

__all__ = [
    "OutboxMessage",
    "SagaFilter",
    "SagaStats",
    "SagaStore",
    "SqliteStore",
    "open_store",
    "order_fields",
]


def open_store(
    settings: OrchestratorSettings, *, readonly: bool = False, live: bool = False
) -> SagaStore:
    """The store SAGA_STORE_URL names: SQLite by default, or PostgreSQL.

    ``live``: a reader that runs on and must see later writes (the console), never a
    frozen snapshot of a SQLite file it could only open as immutable.
    """
    if settings.postgres:
        # Imported here: a SQLite user never loads the PostgreSQL driver.
        from orchestrator.store.postgres import PostgresStore

        return PostgresStore(settings.store_url, readonly=readonly)
    return SqliteStore(settings.db_path, readonly=readonly, live=live)

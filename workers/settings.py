"""The participant process's settings (SAGA_* environment variables)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pydantic import Field

from messages.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """Everything `python -m workers` reads from the environment."""

    default_credit_limit: Decimal = Field(
        default=Decimal("1000.00"),
        gt=0,
        description="Largest charge payment accepts from a customer with no limit of their own",
    )

    def db_path(self, participant: str) -> Path:
        """Each participant owns its own database file."""
        return self.data_dir / f"{participant}.db"

"""The participant process's settings (SAGA_* environment variables)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pydantic import Field

from messages.plumbing.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """Everything `python -m workers` reads from the environment."""

    default_credit_limit: Decimal = Field(
        default=Decimal("1000.00"),
        gt=0,
        description="Largest charge payment accepts from a customer with no limit of their own",
    )

    participant_db_url: str = Field(
        default="",
        description="Where participants keep their state: empty for one SQLite file each in "
        "SAGA_DATA_DIR, or postgresql://... for a schema each (named after the participant) in "
        "that database, shared by replicas of the participant",
    )

    # Fault injection, for chaos runs only: the chance, per command, of each fault.
    fault_drop_reply: float = Field(default=0.0, ge=0, le=1, description="Never send the reply")
    fault_delay_reply: float = Field(
        default=0.0, ge=0, le=1, description="Send the reply SAGA_FAULT_DELAY_S late"
    )
    fault_delay_s: float = Field(default=10.0, ge=0, description="How late a delayed reply is")
    fault_duplicate_reply: float = Field(
        default=0.0, ge=0, le=1, description="Send the reply twice"
    )
    fault_crash_after_commit: float = Field(
        default=0.0, ge=0, le=1, description="Exit after the commit, before the reply"
    )

    def db_path(self, participant: str) -> Path:
        """Each participant owns its own database file."""
        return self.data_dir / f"{participant}.db"

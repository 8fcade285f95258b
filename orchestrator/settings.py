"""The orchestrator process's settings (SAGA_* environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from messages.settings import ServiceSettings


class OrchestratorSettings(ServiceSettings):
    """Everything `python -m orchestrator` reads from the environment."""

    step_timeout_s: float = Field(
        default=5.0, gt=0, description="Deadline of a step's first attempt"
    )
    step_max_attempts: int = Field(
        default=3, ge=1, description="Sends of a step's command before it counts as failed"
    )
    compensation_max_attempts: int = Field(
        default=10, ge=1, description="Sends of a compensation before the saga is FAILED"
    )
    retry_backoff: float = Field(
        default=2.0, ge=1.0, description="Each further attempt waits this many times longer"
    )
    max_retry_wait_s: float = Field(
        default=60.0, gt=0, description="Cap on the wait of any one attempt"
    )
    tick_s: float = Field(default=0.2, gt=0, description="How often deadlines are checked")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "orchestrator.db"

"""Fault injection is one seam, reached only when a SAGA_FAULT_* setting switches it on."""

from __future__ import annotations

import pytest

from workers.faults import Faults
from workers.settings import WorkerSettings


def test_no_fault_setting_means_no_fault_injection_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DROP_REPLY", "DELAY_REPLY", "DUPLICATE_REPLY", "CRASH_AFTER_COMMIT"):
        monkeypatch.delenv(f"SAGA_FAULT_{name}", raising=False)
    assert Faults.from_settings(WorkerSettings()) is None


def test_one_fault_setting_switches_the_seam_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_FAULT_DUPLICATE_REPLY", "0.5")
    faults = Faults.from_settings(WorkerSettings())
    assert faults is not None and faults.duplicate == 0.5 and faults.drop == 0.0

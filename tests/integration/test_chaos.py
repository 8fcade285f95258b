"""scripts/chaos.py, small: 200 sagas through kills and faults, and nothing leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.broker import Broker

ROOT = Path(__file__).resolve().parents[2]
SAGAS = 200
TIMEOUT_S = 300  # the run takes well under 90 s alone; this only stops a hung one


@pytest.mark.broker
def test_chaos_soak_finds_no_violation(broker: Broker, tmp_path: Path) -> None:
    # Given the soak's own stack, on its own vhost, with one kill of the orchestrator and of
    # one participant, one drop of every connection, and the default participant faults
    report_path = tmp_path / "report.json"
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "chaos.py"),
        "--url",
        broker.amqp_url,
        "--management-url",
        broker.management_url,
        "--sagas",
        str(SAGAS),
        "--concurrency",
        "16",
        "--orchestrator-kills",
        "1",
        "--participant-kills",
        "1",
        "--kill-participants",
        "payment",
        # Every connection of the soak's vhost closed once: services must reconnect and
        # consume again by themselves (a broker restart, without stopping a shared broker).
        "--drop-connections",
        "1",
        "--data-dir",
        str(tmp_path / "data"),
        "--json",
        str(report_path),
    ]

    # When it runs
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)

    # Then every check passes, and the kills and faults really happened
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    assert done.stdout.splitlines()[-1] == "violations: 0", output
    assert "Traceback" not in done.stderr, output
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["placed"] == report["finished"] == SAGAS, output
    assert report["kills"]["orchestrator"] == {"done": 1, "planned": 1}, output
    assert report["kills"]["payment"] == {"done": 1, "planned": 1}, output
    assert report["restarts"]["orchestrator"] >= 1 and report["restarts"]["payment"] >= 1
    assert report["connection_drops"]["done"] == 1, output
    assert sum(report["faults_injected"].values()) > 0, output
    assert all(check["ok"] for check in report["checks"]), output
    assert not report["unexpected_exits"], output

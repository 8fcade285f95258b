"""scripts/chaos.py, small: 200 sagas through kills and faults, and nothing leaks; and at
scale, on PostgreSQL and a private 3-node cluster, 150 sagas through a kill of each kind and a
node stopped, and nothing left behind: no node, no database."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scripts.harness.rabbit_cluster import PrivateCluster
from scripts.harness.rabbit_node import NodeError
from tests.conftest import POSTGRES_URL
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


SCALE_SAGAS = 150
SCALE_TIMEOUT_S = 240  # the run takes about 90 s, half of it starting and stopping the nodes
DATABASE_LINE = re.compile(r"^database (\S+) on ", re.MULTILINE)
CLUSTER_LINE = re.compile(r"^cluster: starting \d+ private RabbitMQ nodes in (\S+)$", re.MULTILINE)


def run_soak(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run the soak; if it hangs (or we are interrupted), SIGTERM it so that it cleans up."""
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # the soak stops its services and cluster, drops its database
        out, err = process.communicate(timeout=120)
        pytest.fail(f"the soak did not finish in {timeout}s:\n{out}\n{err}")
    except BaseException:
        process.terminate()
        process.communicate(timeout=120)
        raise
    return process.returncode, out, err


def leftovers(out: str) -> list[str]:
    """What the soak said it made and is still there; removed here, so that nothing leaks."""
    found = []
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        for name in DATABASE_LINE.findall(out):
            if db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                found.append(f"database {name}")
                db.execute(f"DROP DATABASE {name} WITH (FORCE)")
    for directory in CLUSTER_LINE.findall(out):
        if Path(directory).exists():
            found.append(f"cluster {directory}")
            with contextlib.suppress(NodeError):
                PrivateCluster.load(directory).stop()
    return found


@pytest.mark.broker
@pytest.mark.postgres
def test_chaos_soak_at_scale_finds_no_violation(tmp_path: Path) -> None:
    # Given the soak at scale: two orchestrators and two of each participant on a database of
    # its own, a private 3-node cluster with quorum queues, one kill of an orchestrator and of
    # an inventory, one broker node stopped and started again, and the participant faults
    report_path = tmp_path / "report.json"
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "chaos.py"),
        "--scale",
        "--postgres-url",
        POSTGRES_URL,
        "--sagas",
        str(SCALE_SAGAS),
        "--concurrency",
        "16",
        "--orchestrator-kills",
        "1",
        "--participant-kills",
        "1",
        "--kill-participants",
        "inventory",
        "--node-stops",
        "1",
        "--node-down-s",
        "3",
        "--data-dir",
        str(tmp_path / "data"),
        "--json",
        str(report_path),
    ]

    # When it runs
    out = ""
    try:
        code, out, err = run_soak(argv, SCALE_TIMEOUT_S)
    finally:
        left = leftovers(out)

    # Then every check passes, the kills and the node stop happened, and nothing is left
    output = f"stdout:\n{out}\nstderr:\n{err}"
    assert not left, f"the soak left {left} behind\n{output}"
    assert code == 0, output
    assert out.splitlines()[-1] == "violations: 0", output
    assert "Traceback" not in err, output
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["placed"] == report["finished"] == SCALE_SAGAS, output
    assert report["kills"]["orchestrator"] == {"done": 1, "planned": 1}, output
    assert report["kills"]["inventory"] == {"done": 1, "planned": 1}, output
    stops = report["node_stops"]["done"]
    assert len(stops) == 1 and stops[0]["error"] is None and stops[0]["back_s"], output
    assert set(report["restarts"]) == {
        f"{role}-{n}" for role in ("orchestrator", "inventory", "payment", "order") for n in (1, 2)
    }, output
    assert "quorum" in report["checks"][4]["summary"], output
    assert sum(report["faults_injected"].values()) > 0, output
    assert all(check["ok"] for check in report["checks"]), output
    assert not report["unexpected_exits"], output

"""compose.yaml's "scale" profile: PostgreSQL, a 3-node cluster, two of every Python service.

Checked as test_compose.py checks the single-machine deployment: each command parses with
the real parser, each environment validates in the real settings class, and the real
Compose parser accepts the profile.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from messages.contract.topology import PARTICIPANTS
from tests.unit.test_compose import (
    BROKER_IMAGE,
    COMPOSE,
    COMPOSE_FILE,
    Service,
    argv_of,
    command_errors,
    env_errors,
    environment_of,
    load_settings,
    module_of,
    process_of,
)

SCALE: dict[str, Service] = {
    name: service
    for name, service in (COMPOSE.get("services") or {}).items()
    if "scale" in (service.get("profiles") or [])
}
NODES = sorted(name for name, s in SCALE.items() if "rabbitmq" in str(s.get("image", "")))
PYTHON = sorted(name for name, s in SCALE.items() if "build" in s)
# The long-running services with state (`run`): not provision, nor the console (test_compose_web).
RUNNING = [name for name in PYTHON if argv_of(SCALE[name])[3:4] == ["run"]]


def roles() -> Counter[str]:
    """How many processes run each role: orchestrator, inventory, payment, order."""
    counted: Counter[str] = Counter()
    for name in RUNNING:
        argv = argv_of(SCALE[name])
        counted["orchestrator" if module_of(argv) == "orchestrator" else argv[4]] += 1
    return counted


def test_the_profile_runs_two_of_everything_on_a_cluster_and_postgresql() -> None:
    assert len(NODES) == 3 and all(BROKER_IMAGE.match(SCALE[n]["image"]) for n in NODES)
    assert any(str(s.get("image", "")).startswith("postgres:") for s in SCALE.values())
    assert roles() == Counter({"orchestrator": 2, **dict.fromkeys(PARTICIPANTS, 2)})


def test_compose_accepts_the_profile() -> None:
    compose = str(Path(sys.executable).with_name("docker-compose"))
    done = subprocess.run(
        [compose, "-f", "compose.yaml", "--profile", "scale", "config", "--quiet"],
        cwd=COMPOSE_FILE.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_the_nodes_form_one_cluster_with_one_cookie() -> None:
    # Each node is named by its hostname; the cluster config names exactly those nodes
    cluster = COMPOSE["configs"]["rabbitmq-cluster"]["content"]
    listed = {line.split("=")[1].strip() for line in cluster.splitlines() if ".nodes." in line}
    assert listed == {f"rabbit@{SCALE[n]['hostname']}" for n in NODES}
    assert "classic_config" in cluster
    cookies = {environment_of(SCALE[n])["RABBITMQ_CLUSTER_COOKIE"] for n in NODES}
    assert len(cookies) == 1 and cookies != {""}
    for node in NODES:
        mounts = {c["target"]: c["source"] for c in SCALE[node]["configs"]}
        assert mounts["/etc/rabbitmq/conf.d/20-cluster.conf"] == "rabbitmq-cluster"
        assert "RABBITMQ_CLUSTER_COOKIE" in " ".join(SCALE[node]["entrypoint"])


@pytest.mark.parametrize("name", PYTHON)
def test_each_command_parses_and_its_environment_is_real_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = argv_of(SCALE[name])
    assert command_errors(name, argv) == []
    process = process_of(argv)
    assert process is not None
    env = environment_of(SCALE[name])
    assert env_errors(process, env) == []
    load_settings(process, env, monkeypatch)


@pytest.mark.parametrize("name", RUNNING)
def test_each_service_shares_postgresql_and_knows_every_node(name: str) -> None:
    env = environment_of(SCALE[name])
    # Every node, each as the service's own user, on quorum queues
    urls = [urlsplit(url) for url in env["SAGA_AMQP_URL"].split(",")]
    assert sorted(str(u.hostname) for u in urls) == NODES
    assert len({u.username for u in urls}) == 1
    assert env["SAGA_QUEUE_TYPE"] == "quorum"
    # The shared store (orchestrators) or the participants' database, never SQLite
    store = env.get("SAGA_STORE_URL") or env.get("SAGA_PARTICIPANT_DB_URL") or ""
    assert store.startswith("postgresql://") and "@scale-postgres:" in store
    # and it waits for the database, every node and provision
    depends_on = SCALE[name]["depends_on"]
    assert {n for n, d in depends_on.items() if d["condition"] == "service_healthy"} >= {
        "scale-postgres",
        *NODES,
    }
    assert depends_on["scale-provision"]["condition"] == "service_completed_successfully"
    # and its healthcheck is our liveness check
    assert [str(w) for w in SCALE[name]["healthcheck"]["test"]][4:5] == ["health"]

"""compose.yaml's operators' console (`saga web`), checked against the code.

The console must be reachable from this machine only, listen where the published port
leads, read the very store its orchestrators write, and log in to RabbitMQ as
the provisioned client user, like the `saga` CLI. Its command and environment are checked
with every other service's in test_compose.py and test_compose_scale.py (the real parser,
WebSettings). As there, each check returns its problems, and the tests at the bottom show
that each one can fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from messages.contract.topology import REQUESTS_EXCHANGE
from orchestrator.provision import permissions, user_names
from orchestrator.settings import OrchestratorSettings, WebSettings
from orchestrator.store.sqlite import SqliteStore
from orchestrator.web.app import create_app
from tests.unit.test_compose import (
    COMPOSE,
    SERVICES,
    Service,
    argv_of,
    environment_of,
    load_settings,
)

ALL_SERVICES: dict[str, Service] = COMPOSE.get("services") or {}
VOLUMES: Mapping[str, Any] = COMPOSE.get("volumes") or {}
LOOPBACK = "127.0.0.1"
MANAGEMENT_PORT = 15672
PYTHON_M = ["python", "-m", "orchestrator"]
CONSOLE = "web"
SCALE_CONSOLE = "scale-web"


def consoles(services: Mapping[str, Service]) -> list[str]:
    """The services that run `python -m orchestrator web`."""
    return sorted(n for n, s in services.items() if argv_of(s)[:4] == [*PYTHON_M, "web"])


def orchestrators_beside(name: str) -> list[str]:
    """The orchestrators of the console's deployment: its profiles, `python -m orchestrator run`."""
    profiles = ALL_SERVICES[name].get("profiles") or []
    return sorted(
        other
        for other, service in ALL_SERVICES.items()
        if (service.get("profiles") or []) == profiles and argv_of(service) == [*PYTHON_M, "run"]
    )


# ---------------------------------------------------------------------------------------------
# Reading services


def published_ports(service: Service) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each `ports:` entry, either syntax.

    An empty host address means every interface, as Docker reads it.
    """
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, Mapping):
            ports.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry["target"]),
                )
            )
            continue
        text = str(entry).split("/")[0]  # 8080/tcp
        host_ip = ""
        if text.startswith("["):  # [::1]:8080:8080
            host_ip, _, text = text[1:].partition("]:")
        parts = text.split(":")
        if len(parts) == 3:
            host_ip, parts = parts[0], parts[1:]
        published, target = parts if len(parts) == 2 else ("", parts[0])
        ports.append((host_ip, published, target))
    return ports


def mounts(service: Service) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read-only), from either volume syntax."""
    found = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = "ro" in ",".join(mode).split(",")
        else:
            source, target = str(volume.get("source", "")), str(volume.get("target", ""))
            read_only = bool(volume.get("read_only", False))
        found[str(PurePosixPath(target))] = (source, read_only)
    return found


def healthcheck_url(service: Service) -> str | None:
    """The URL a `python -c "...urlopen('URL')..."` healthcheck fetches, if that is what it is."""
    test = [str(word) for word in (service.get("healthcheck") or {}).get("test") or []]
    if test[:3] != ["CMD", "python", "-c"] or len(test) != 4 or "urlopen(" not in test[3]:
        return None
    match = re.search(r"urlopen\('([^']+)'", test[3])
    return match[1] if match else None


# ---------------------------------------------------------------------------------------------
# The checks; each returns a list of problems, empty when all is well


def port_errors(name: str, service: Service, port: int) -> list[str]:
    """Published, on the loopback address only, and onto the port the process listens on."""
    ports = published_ports(service)
    if not ports:
        return [f"{name}: publishes no port"]
    errors = []
    for host_ip, published, target in ports:
        if host_ip != LOOPBACK:
            where = host_ip or "every interface"
            errors.append(f"{name}: port {published or target} is open on {where}, not {LOOPBACK}")
        if target != str(port):
            errors.append(f"{name}: publishes container port {target}; it listens on {port}")
    if service.get("network_mode") == "host":
        errors.append(f"{name}: network_mode host bypasses the published ports")
    return errors


def listen_errors(name: str, settings: WebSettings) -> list[str]:
    """Inside a container, the console must listen beyond the container's own loopback."""
    if settings.web_host in ("0.0.0.0", "::"):
        return []
    return [f"{name}: listens on {settings.web_host}, which the published port cannot reach"]


def store_errors(
    name: str,
    console: Service,
    settings: WebSettings,
    orchestrator: Service,
    theirs: OrchestratorSettings,
) -> list[str]:
    """The console reads the orchestrator's store: its PostgreSQL database, or its SQLite file
    in the same named volume, mounted writable: SQLite makes its -shm file beside the store
    for a reader when no writer has, and `saga web` refuses a store it could only read as a
    frozen snapshot (it opens the store read-only all the same)."""
    if theirs.postgres or settings.postgres:
        if settings.store_url != theirs.store_url:
            return [f"{name}: reads {settings.store_url!r}, the orchestrator writes elsewhere"]
        return []
    if settings.db_path != theirs.db_path:
        return [f"{name}: reads {settings.db_path}, the orchestrator writes {theirs.db_path}"]
    directory = str(PurePosixPath(settings.db_path).parent)
    mine, ours = mounts(console).get(directory), mounts(orchestrator).get(directory)
    if mine is None or ours is None or mine[0] != ours[0]:
        return [f"{name}: {directory} is not the orchestrator's volume ({mine} vs {ours})"]
    if mine[0] not in VOLUMES:
        return [f"{name}: {mine[0]!r} at {directory} is not a top-level named volume"]
    if mine[1]:
        return [f"{name}: mounts the store read-only: if it starts first, saga web exits"]
    return []


def login_errors(name: str, settings: WebSettings, provision: Mapping[str, str]) -> list[str]:
    """Every node URL logs in as provision's client user, with the password it was given."""
    client = user_names(provision.get("SAGA_USER_PREFIX", ""))["client"]
    errors = []
    for url in map(urlsplit, settings.amqp_urls):
        if url.username != client:
            errors.append(f"{name}: logs in to {url.hostname} as {url.username!r}, not {client!r}")
        elif url.password != provision.get("SAGA_CLIENT_PASSWORD"):
            errors.append(f"{name}: not the password provision gives {client!r}")
    return errors


def management_errors(name: str, settings: WebSettings, broker: Service) -> list[str]:
    """The dead-letter panel reads the broker's management API with its administrator's login."""
    url = urlsplit(settings.management_url or "")
    broker_env = environment_of(broker)
    expected = (broker.get("hostname"), MANAGEMENT_PORT, broker_env["RABBITMQ_DEFAULT_USER"])
    if (url.hostname, url.port, url.username) != expected:
        return [f"{name}: management API {(url.hostname, url.port, url.username)}, not {expected}"]
    if url.password != broker_env["RABBITMQ_DEFAULT_PASS"]:
        return [f"{name}: the management API password is not the broker's"]
    return []


def healthcheck_errors(name: str, service: Service, port: int) -> list[str]:
    """A healthcheck that GETs the console's own /healthz (so that a supervisor sees a
    console that cannot read its store)."""
    if "healthcheck" not in service:
        return [f"{name}: no healthcheck"]
    url = healthcheck_url(service)
    expected = f"http://127.0.0.1:{port}/healthz"
    return [] if url == expected else [f"{name}: healthcheck fetches {url!r}, not {expected}"]


# ---------------------------------------------------------------------------------------------
# The console of `docker compose up`, and of the scale profile


@pytest.fixture(autouse=True)
def _no_saga_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings built here must read only what the test gives them, not this shell's SAGA_*.
    for key in [k for k in os.environ if k.upper().startswith("SAGA_")]:
        monkeypatch.delenv(key)


@pytest.fixture(params=[CONSOLE, SCALE_CONSOLE])
def console(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def web_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> WebSettings:
    settings = load_settings("web", environment_of(ALL_SERVICES[name]), monkeypatch)
    assert isinstance(settings, WebSettings)
    return settings


def broker_of(name: str) -> Service:
    """The broker whose management API the console reads: the node its first URL names."""
    env = environment_of(ALL_SERVICES[name])
    host = urlsplit(env["SAGA_MANAGEMENT_URL"]).hostname
    return next(s for s in ALL_SERVICES.values() if s.get("hostname") == host)


def provision_of(name: str) -> dict[str, str]:
    """The environment of the provision service the console waits for."""
    waits_for = ALL_SERVICES[name]["depends_on"]
    names = [n for n in waits_for if argv_of(ALL_SERVICES[n]) == [*PYTHON_M, "provision"]]
    assert len(names) == 1, f"{name} waits for provision services {names}"
    return environment_of(ALL_SERVICES[names[0]])


def test_each_deployment_has_one_console() -> None:
    assert consoles(SERVICES) == [CONSOLE]
    scale = {n: s for n, s in ALL_SERVICES.items() if "scale" in (s.get("profiles") or [])}
    assert consoles(scale) == [SCALE_CONSOLE]


def test_the_console_is_published_on_this_machine_only(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = web_settings(console, monkeypatch)
    assert port_errors(console, ALL_SERVICES[console], settings.web_port) == []
    assert listen_errors(console, settings) == []


def test_each_console_has_a_host_port_of_its_own() -> None:
    published = [p for n in consoles(ALL_SERVICES) for _, p, _ in published_ports(ALL_SERVICES[n])]
    assert len(published) == len(set(published)), published


def test_the_console_reads_its_orchestrators_store(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = web_settings(console, monkeypatch)
    orchestrators = orchestrators_beside(console)
    assert orchestrators, f"{console}: no orchestrator beside it"
    for name in orchestrators:
        service = ALL_SERVICES[name]
        theirs = load_settings("orchestrator", environment_of(service), monkeypatch)
        assert isinstance(theirs, OrchestratorSettings)
        assert store_errors(console, ALL_SERVICES[console], settings, service, theirs) == []


def test_the_console_waits_for_an_orchestrator_to_make_the_store(console: str) -> None:
    depends_on = ALL_SERVICES[console]["depends_on"]
    healthy = {n for n, d in depends_on.items() if d.get("condition") == "service_healthy"}
    assert healthy & set(orchestrators_beside(console)), depends_on


def test_the_console_logs_in_as_the_client_user(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = web_settings(console, monkeypatch)
    assert login_errors(console, settings, provision_of(console)) == []
    # and that user may do what the console does: publish operator actions, like `saga abort`
    assert re.fullmatch(permissions()["client"][1], REQUESTS_EXCHANGE)
    assert not settings.declare_topology  # it may configure nothing but its reply queues


def test_the_console_reads_dead_letters_with_the_brokers_admin_login(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = web_settings(console, monkeypatch)
    assert management_errors(console, settings, broker_of(console)) == []


def test_the_console_has_operators_and_no_session_key_anyone_could_know(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README names the dev operator; a published default key would let anyone make
    # that operator's session cookie, so there is none: each start makes its own.
    settings = web_settings(console, monkeypatch)
    assert list(settings.web_operators) == ["operator"]
    assert settings.web_operators["operator"].get_secret_value() == "operator-dev-password"
    assert settings.web_secret is None


def test_the_healthcheck_fetches_the_consoles_healthz(
    console: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = web_settings(console, monkeypatch)
    assert healthcheck_errors(console, ALL_SERVICES[console], settings.web_port) == []


class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthz() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(service: Service, port: int) -> int:
    """The healthcheck's exit code, run here against ``port`` instead of the console's."""
    url = urlsplit(healthcheck_url(service))
    here = url._replace(netloc=f"127.0.0.1:{port}").geturl()
    code = str(service["healthcheck"]["test"][3]).replace(url.geturl(), here)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_the_console_serves_the_healthchecks_path(tmp_path: Path) -> None:
    # The real app over a real (read-only) store answers the path the healthcheck fetches...
    SqliteStore(tmp_path / "orchestrator.db").close()
    settings = WebSettings(data_dir=tmp_path)
    store = SqliteStore(settings.db_path, readonly=True)
    app = create_app(settings, store, steer=lambda action: None)
    path = urlsplit(healthcheck_url(ALL_SERVICES[CONSOLE])).path

    try:
        with TestClient(app) as client:
            answer = client.get(path)
            assert (answer.status_code, answer.text) == (200, "ok")
            assert client.get(path + "-not").status_code == 404
    finally:
        store.close()


def test_the_healthcheck_fails_unless_healthz_answers_200(healthz: HTTPServer) -> None:
    # ...and the healthcheck's command exits 0 on a 200 and not otherwise.
    port = healthz.server_address[1]
    assert run_healthcheck(ALL_SERVICES[CONSOLE], port) == 0
    _Healthz.status = 503
    try:
        assert run_healthcheck(ALL_SERVICES[CONSOLE], port) != 0
    finally:
        _Healthz.status = 200


# ---------------------------------------------------------------------------------------------
# The checks catch what they are meant to catch


@pytest.mark.parametrize(
    "ports",
    [
        [],
        ["8080:8080"],
        ["0.0.0.0:8080:8080"],
        ["8080"],
        ["127.0.0.1:8080:9000"],
        [{"target": 8080, "published": "8080"}],
        ["127.0.0.1:8080:8080", "8081:8080"],
    ],
)
def test_port_check_catches_an_open_or_wrong_port(ports: list[Any]) -> None:
    assert port_errors("broken", {"ports": ports}, 8080) != []


def test_port_check_accepts_loopback_in_either_syntax() -> None:
    long = {"host_ip": "127.0.0.1", "target": 8080, "published": "8080"}
    assert port_errors("fine", {"ports": ["127.0.0.1:8080:8080/tcp", long]}, 8080) == []
    assert port_errors("broken", {"ports": [long], "network_mode": "host"}, 8080) != []


def test_listen_check_catches_the_containers_own_loopback() -> None:
    assert listen_errors("broken", WebSettings(web_host="127.0.0.1")) != []
    assert listen_errors("fine", WebSettings(web_host="0.0.0.0")) == []


def test_store_check_catches_another_volume_a_read_only_mount_or_another_database() -> None:
    orchestrator: Service = {"volumes": ["orchestrator-data:/data"]}
    theirs = OrchestratorSettings(data_dir="/data")
    mine = WebSettings(data_dir="/data")

    def errors(volume: str, settings: WebSettings = mine, them: Any = theirs) -> list[str]:
        return store_errors("broken", {"volumes": [volume]}, settings, orchestrator, them)

    assert errors("orchestrator-data:/data") == []
    assert errors("orchestrator-data:/data:ro") != []
    assert errors("inventory-data:/data") != []
    assert errors("orchestrator-data:/state") != []
    assert errors("orchestrator-data:/data", WebSettings(data_dir="/state")) != []
    postgres = OrchestratorSettings(store_url="postgresql://saga@db/saga")
    assert errors("orchestrator-data:/data", mine, postgres) != []
    assert errors("", WebSettings(store_url="postgresql://saga@db/saga"), postgres) == []


def test_login_check_catches_another_user_or_password() -> None:
    provision = {"SAGA_CLIENT_PASSWORD": "pw"}
    fine = WebSettings(amqp_url="amqp://client:pw@rabbitmq:5672/")
    assert login_errors("fine", fine, provision) == []
    assert login_errors("broken", WebSettings(amqp_url="amqp://admin:pw@rabbitmq/"), provision)
    assert login_errors("broken", WebSettings(amqp_url="amqp://client:x@rabbitmq/"), provision)
    prefixed = {**provision, "SAGA_USER_PREFIX": "staging-"}
    assert login_errors("broken", fine, prefixed) != []


def test_management_check_catches_another_host_or_login() -> None:
    broker: Service = {
        "hostname": "rabbitmq",
        "environment": {"RABBITMQ_DEFAULT_USER": "admin", "RABBITMQ_DEFAULT_PASS": "pw"},
    }
    for url, ok in [
        ("http://admin:pw@rabbitmq:15672", True),
        ("http://admin:pw@elsewhere:15672", False),
        ("http://client:pw@rabbitmq:15672", False),
        ("http://admin:no@rabbitmq:15672", False),
        ("", False),
    ]:
        errors = management_errors("x", WebSettings(management_url=url), broker)
        assert (errors == []) is ok, (url, errors)


def test_healthcheck_check_catches_another_url() -> None:
    def service(code: str) -> Service:
        return {"healthcheck": {"test": ["CMD", "python", "-c", code]}}

    fetch = "import urllib.request; urllib.request.urlopen('{}', timeout=5)"
    assert healthcheck_errors("broken", {}, 8080) == ["broken: no healthcheck"]
    assert (
        healthcheck_errors("fine", service(fetch.format("http://127.0.0.1:8080/healthz")), 8080)
        == []
    )
    assert healthcheck_errors("broken", service(fetch.format("http://127.0.0.1:8080/")), 8080)
    assert healthcheck_errors("broken", service(fetch.format("http://127.0.0.1:9/healthz")), 8080)
    assert healthcheck_errors("broken", service("print('ok')"), 8080) != []

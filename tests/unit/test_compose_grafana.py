"""compose.yaml's Grafana and the saga dashboard, checked against the code.

Grafana's data source must be compose's Prometheus, every panel must query it by its fixed
uid, and every metric a panel's PromQL names must be one our processes really expose: read
off prometheus_client's registry after importing every module of ours that defines metrics,
and off the store's collector (the gauges it reads at scrape time), built on a real SQLite
store. As in test_compose.py, each check returns its problems, and the tests at the bottom
show that each one can fail.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

from orchestrator.metrics import StoreCollector
from orchestrator.store.sqlite import SqliteStore
from tests.unit.test_compose import COMPOSE, COMPOSE_FILE, ROOT, SERVICES, Service, environment_of
from tests.unit.test_compose_web import port_errors, published_ports

GRAFANA = "grafana"
PROMETHEUS = "prometheus"
GRAFANA_IMAGE = re.compile(r"^grafana/grafana(-oss)?:\d+\.\d+\.\d+$")
DASHBOARD = ROOT / "orchestrator" / "dashboards" / "saga.json"
PROVISIONING = PurePosixPath("/etc/grafana/provisioning")
CONFIGS: Mapping[str, Any] = COMPOSE.get("configs") or {}
# The packages whose modules may define metrics: what the services run.
PACKAGES = ("messages", "orchestrator", "workers")


# ---------------------------------------------------------------------------------------------
# Reading compose, the provisioning and the dashboard


def config_mounts(service: Service) -> dict[str, str]:
    """Config target -> config name."""
    return {str(c["target"]): str(c["source"]) for c in service.get("configs") or []}


def provisioned(service: Service, kind: str) -> dict[str, Any]:
    """The one provisioning file of ``kind`` (datasources, dashboards) the service mounts."""
    found = [
        source
        for target, source in config_mounts(service).items()
        if PurePosixPath(target).parent == PROVISIONING / kind
    ]
    assert len(found) == 1, f"{kind}: {found}"
    data = yaml.safe_load(CONFIGS[found[0]]["content"])
    assert isinstance(data, dict)
    return data


def config_file(name: str) -> Path:
    """Where a `file:` config's content comes from, relative to compose.yaml as Compose reads it."""
    return (COMPOSE_FILE.parent / CONFIGS[name]["file"]).resolve()


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


# ---------------------------------------------------------------------------------------------
# The metrics our processes expose, and those a PromQL expression names

# The series names of each family type, as the text exposition writes them.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def sample_names(family: Metric) -> set[str]:
    """The series names a family is exposed as: counters get _total, histograms _bucket..."""
    return {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}


def metric_modules() -> list[str]:
    """Every module of ours that imports prometheus_client."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if re.search(r"^\s*(from|import) prometheus_client\b", text, re.M):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def exposed_metrics(collectors: Iterable[Collector] = ()) -> set[str]:
    """Every series name the default registry (after importing those modules) and
    ``collectors`` expose."""
    for module in metric_modules():
        importlib.import_module(module)
    families = [*REGISTRY.collect(), *(f for c in collectors for f in c.collect())]
    return {name for family in families for name in sample_names(family)}


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_STRIPPED = [
    re.compile(r"\{[^}]*\}"),  # label matchers
    re.compile(r"\[[^\]]*\]"),  # ranges and subqueries
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),
    re.compile(r"\boffset\s+-?\w+"),
    re.compile(r"@\s*\S+"),
]
_NAME = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = _STRINGS.sub('""', expr)
    for pattern in _STRIPPED:
        text = pattern.sub(" ", text)
    return {
        match[1]
        for match in _NAME.finditer(text)
        if not match[2] and match[1].lower() not in _KEYWORDS
    }


# ---------------------------------------------------------------------------------------------
# The checks; each returns a list of problems, empty when all is well


def datasource_errors(provisioning: Mapping[str, Any], host: str, port: str) -> list[str]:
    """One Prometheus data source, with a fixed uid, at compose's Prometheus service."""
    sources = [s for s in provisioning.get("datasources") or [] if s.get("type") == "prometheus"]
    if len(sources) != 1:
        return [f"{len(sources)} Prometheus data sources, not one"]
    source, errors = sources[0], []
    if not source.get("uid"):
        errors.append("the Prometheus data source has no fixed uid for the dashboard to name")
    if source.get("url") != f"http://{host}:{port}":
        errors.append(f"the data source URL {source.get('url')!r} is not http://{host}:{port}")
    return errors


def dashboard_errors(dashboard: Mapping[str, Any], uid: str, exposed: set[str]) -> list[str]:
    """Unique panel ids; every query on the data source ``uid``, naming only ``exposed``."""
    errors = []
    if "__inputs" in dashboard:
        errors.append("an export for sharing (__inputs): provisioning does not fill those in")
    ids = [panel.get("id") for panel in panels(dashboard)]
    if None in ids or len(ids) != len(set(ids)):
        errors.append(f"panel ids are missing or repeated: {ids}")
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", panel.get("id"))
        targets = panel.get("targets") or []
        if not targets:
            errors.append(f"{title!r}: no query")
        sources = [panel.get("datasource")] + [
            t["datasource"] for t in targets if "datasource" in t
        ]
        if any(not isinstance(s, Mapping) or s.get("uid") != uid for s in sources):
            errors.append(f"{title!r}: not on data source uid {uid!r}: {sources}")
        for target in targets:
            unknown = metric_names(str(target.get("expr", ""))) - exposed
            if not target.get("expr") or unknown:
                errors.append(
                    f"{title!r}: {target.get('expr')!r} names no metric we expose: {unknown}"
                )
    return errors


# ---------------------------------------------------------------------------------------------
# Grafana in compose


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series our processes expose, the store's gauges read from a real SQLite store."""
    path = tmp_path_factory.mktemp("store") / "orchestrator.db"
    SqliteStore(path).close()  # creates it, as the orchestrator does
    store = StoreCollector(lambda: SqliteStore(path, readonly=True), stuck_after_s=300.0)
    return exposed_metrics([store])


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def uid() -> str:
    (source,) = provisioned(SERVICES[GRAFANA], "datasources")["datasources"]
    return str(source["uid"])


def test_grafana_is_pinned_and_on_this_machine_only() -> None:
    grafana = SERVICES[GRAFANA]
    assert GRAFANA_IMAGE.match(str(grafana.get("image", ""))), grafana.get("image")
    port = int(environment_of(grafana).get("GF_SERVER_HTTP_PORT", "3000"))
    assert port_errors(GRAFANA, grafana, port) == []


def test_anonymous_visitors_may_only_view() -> None:
    env = environment_of(SERVICES[GRAFANA])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # The admin password comes from the environment, with a laptop default like the broker's
    raw = SERVICES[GRAFANA]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-[^}]+\}", raw), raw


def test_the_data_source_is_composes_prometheus() -> None:
    (_, _, port), *_ = published_ports(SERVICES[PROMETHEUS])
    provisioning = provisioned(SERVICES[GRAFANA], "datasources")
    assert datasource_errors(provisioning, PROMETHEUS, port) == []


def test_the_data_source_knows_the_scrape_interval() -> None:
    # Grafana's $__rate_interval spans four scrapes only if it knows how often they are.
    (source,) = provisioned(SERVICES[GRAFANA], "datasources")["datasources"]
    scrape = yaml.safe_load(CONFIGS[PROMETHEUS]["content"])["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape


def test_the_dashboard_is_the_file_in_the_repository_where_the_provider_looks() -> None:
    provider = provisioned(SERVICES[GRAFANA], "dashboards")["providers"]
    assert [p["type"] for p in provider] == ["file"]
    folder = PurePosixPath(provider[0]["options"]["path"])
    mounted = {t: s for t, s in config_mounts(SERVICES[GRAFANA]).items() if "file" in CONFIGS[s]}
    assert [PurePosixPath(t).parent for t in mounted] == [folder]
    ((target, name),) = mounted.items()
    assert config_file(name) == DASHBOARD.resolve() and DASHBOARD.is_file()
    # and it is Grafana's home page
    assert environment_of(SERVICES[GRAFANA])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == target


def test_the_metric_modules_are_found() -> None:
    modules = set(metric_modules())
    expected = {"orchestrator.metrics", "messages.plumbing.metrics", "workers.runtime"}
    assert expected <= modules, modules


def test_every_panel_queries_metrics_that_exist(exposed: set[str]) -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41, dashboard["schemaVersion"]
    assert dashboard_errors(dashboard, uid(), exposed) == []


def test_the_dashboard_shows_what_the_saga_counts(exposed: set[str]) -> None:
    # Every saga metric of ours is on some panel (Python's and the process's own are not).
    used = {
        name
        for panel in panels(load_dashboard())
        for target in panel.get("targets") or []
        for name in metric_names(target["expr"])
    }
    ours = {name.removesuffix("_total") for name in exposed if name.startswith("saga_")}
    ours = {re.sub(r"_(bucket|sum|count|created)$", "", name) for name in ours}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert ours - shown == set()


# ---------------------------------------------------------------------------------------------
# The checks catch what they are meant to catch


def test_exposed_names_follow_prometheus_clients_suffixes(exposed: set[str]) -> None:
    assert {"saga_started_total", "saga_finished_total"} <= exposed
    assert {"saga_step_duration_seconds_bucket", "saga_step_duration_seconds_count"} <= exposed
    assert {"saga_in_flight", "saga_stuck", "saga_outbox_depth", "saga_sagas"} <= exposed
    assert not {"saga_started", "saga_step_duration_seconds", "saga_in_flight_total"} & exposed


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("saga_in_flight", {"saga_in_flight"}),
        ("max by (state) (saga_sagas)", {"saga_sagas"}),
        (
            "histogram_quantile(0.99, sum by (le, step) "
            "(rate(saga_step_duration_seconds_bucket{step=~'reserve|charge'}[$__rate_interval])))",
            {"saga_step_duration_seconds_bucket"},
        ),
        (
            'sum(rate(a_total{x="b_total"}[5m] offset 1h)) by (c) / on(d) b_count',
            {"a_total", "b_count"},
        ),
        ("increase(x[1h]) > 0 and y unless z", {"x", "y", "z"}),
        ("1e3 * avg_over_time(x[5m:1m])", {"x"}),
    ],
)
def test_metric_names_reads_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_check_catches_a_made_up_metric(exposed: set[str]) -> None:
    dashboard = load_dashboard()
    panel = next(p for p in dashboard["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = "sum(rate(saga_made_up_total[5m]))"
    errors = dashboard_errors(dashboard, uid(), exposed)
    assert len(errors) == 1 and "saga_made_up_total" in errors[0], errors


def test_dashboard_check_catches_a_counter_without_total(exposed: set[str]) -> None:
    dashboard = load_dashboard()
    panel = next(p for p in dashboard["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = "sum(rate(saga_started[5m]))"
    assert dashboard_errors(dashboard, uid(), exposed) != []


def test_dashboard_check_catches_another_data_source_or_a_repeated_id(exposed: set[str]) -> None:
    dashboard = load_dashboard()
    assert dashboard_errors(dashboard, "another-uid", exposed) != []
    panel = next(p for p in dashboard["panels"] if p["type"] != "row")
    panel["targets"][0]["datasource"] = {"type": "prometheus", "uid": "another-uid"}
    assert dashboard_errors(dashboard, uid(), exposed) != []
    dashboard = load_dashboard()
    dashboard["panels"][-1]["id"] = dashboard["panels"][0]["id"]
    assert dashboard_errors(dashboard, uid(), exposed) != []
    dashboard = load_dashboard()
    dashboard["panels"][0]["panels"] = [{"id": 999, "type": "stat", "title": "hidden"}]
    assert dashboard_errors(dashboard, uid(), exposed) != []  # no query, no data source


def test_datasource_check_catches_another_host_or_no_uid() -> None:
    fine = {"type": "prometheus", "uid": "u", "url": "http://prometheus:9090"}
    assert datasource_errors({"datasources": [fine]}, "prometheus", "9090") == []
    for broken in (
        {**fine, "url": "http://localhost:9090"},
        {**fine, "url": "http://prometheus:9091"},
        {**fine, "uid": ""},
    ):
        assert datasource_errors({"datasources": [broken]}, "prometheus", "9090") != []
    assert datasource_errors({"datasources": [fine, fine]}, "prometheus", "9090") != []
    assert datasource_errors({"datasources": []}, "prometheus", "9090") != []

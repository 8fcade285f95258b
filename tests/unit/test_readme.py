"""The README's configuration table and commands match the code."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.cli import build_parser as orchestrator_parser
from orchestrator.provision import ProvisionSettings
from orchestrator.settings import OrchestratorSettings, WebSettings
from workers.cli import build_parser as workers_parser
from workers.settings import WorkerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def documented_settings() -> dict[str, str]:
    """SAGA_ variable -> default, from the README's configuration table."""
    rows = re.findall(r"^\| `(SAGA_[A-Z_]+)` \| `([^`]*)` \|", README, flags=re.MULTILINE)
    return dict(rows)


def real_settings() -> dict[str, str]:
    fields = {
        **OrchestratorSettings.model_fields,
        **WorkerSettings.model_fields,
        **ProvisionSettings.model_fields,
        **WebSettings.model_fields,
    }
    return {
        f"SAGA_{name.upper()}": "(required)"
        if field.is_required()
        else str(field.get_default(call_default_factory=True))
        for name, field in fields.items()
    }


def test_every_setting_is_documented_with_its_default() -> None:
    assert documented_settings() == real_settings()


def test_readme_mentions_no_setting_that_does_not_exist() -> None:
    mentioned = set(re.findall(r"SAGA_[A-Z_]+[A-Z]", README))
    not_settings = {
        "SAGA_TEST_AMQP_URL",
        "SAGA_TEST_MANAGEMENT_URL",
        "SAGA_TEST_POSTGRES_URL",
        "SAGA_ID",
    }
    assert mentioned - not_settings <= set(real_settings())


def test_documented_cli_commands_parse() -> None:
    for argv in (
        ["run"],
        ["web"],
        ["list", "--state", "FAILED", "--json"],
        ["show", "0" * 32],
        ["retry", "0" * 32, "--reason", "payment is back", "--timeout", "5", "--json"],
    ):
        orchestrator_parser().parse_args(argv)
    for argv in (
        ["run", "all", "--stock", "item-1=10,item-2=5"],
        ["stock", "--json"],
        ["run", "payment", "--limit", "c-1=50.00"],
        ["run", "order", "--block", "c-9"],
    ):
        workers_parser().parse_args(argv)

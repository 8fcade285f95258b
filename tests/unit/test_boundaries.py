"""The layering the tree promises: arrows point one way, scripts -> services -> messages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported(package: str) -> dict[str, set[str]]:
    """For each module file under ``package``, the modules of ours it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, names in imported(package).items()
        for name in sorted(names)
        if name.startswith(forbidden)
    ]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The contract is what two services agree on: nothing of ours but the error tree.
        ("messages/contract", ("messages.plumbing", "orchestrator", "workers", "scripts")),
        ("messages", ("orchestrator", "workers", "scripts")),
        # A participant is deployed without the orchestrator's code or store.
        ("workers", ("orchestrator", "scripts")),
        ("orchestrator", ("workers", "scripts")),
    ],
)
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(package, forbidden) == []


def test_fault_injection_is_reached_only_through_its_seam() -> None:
    # workers/faults.py is chaos tooling: the runtime knows its type, the CLI builds it from
    # settings (None unless a SAGA_FAULT_* rate is set); no business module touches it.
    users = {m for m, names in imported("workers").items() if "workers.faults" in names}
    assert users == {"workers/cli.py", "workers/runtime.py"}


def test_the_boundary_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The check above would pass vacuously if it found no imports at all.
    assert "messages.errors" in imported("messages/contract")["messages/contract/codec.py"]
    assert any(n.startswith("messages.contract") for n in imported("workers")["workers/cli.py"])

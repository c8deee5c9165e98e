"""Imports point one way (DESIGN.md): core imports only torch; specs never import torch;
the engine knows nothing of the method; the CLI imports jobs only inside commands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "traflow_cli"
CORE = ["flow.py", "traflow.py", "sampling.py", "seeding.py", "nets", "data/toy.py"]
THIRD_PARTY_IN_CORE = {"torch", "numpy", "math", "collections", "dataclasses", "typing",
                       "__future__", "hashlib"}


def _imports(path: Path) -> set[str]:
    """Top-level (module-scope) imports of a file, as dotted names."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(*entries: str) -> list[Path]:
    out = []
    for entry in entries:
        path = PACKAGE / entry
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


@pytest.mark.parametrize("path", _files(*CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_only_torch_and_core(path: Path) -> None:
    for name in _all_imports(path):
        top = name.split(".")[0]
        if top == "traflow_cli":
            assert not name.startswith(("traflow_cli.engine", "traflow_cli.jobs",
                                        "traflow_cli.cli", "traflow_cli.specs",
                                        "traflow_cli.presets")), name
        else:
            assert top in THIRD_PARTY_IN_CORE, f"{path.name} imports {name}"


@pytest.mark.parametrize("name", ["specs.py", "presets.py"])
def test_specs_never_import_torch(name: str) -> None:
    assert not any(n.split(".")[0] == "torch" for n in _all_imports(PACKAGE / name))


@pytest.mark.parametrize("path", _files("engine"), ids=lambda p: p.name)
def test_engine_knows_nothing_of_the_method(path: Path) -> None:
    for name in _all_imports(path):
        assert not name.startswith(("traflow_cli.traflow", "traflow_cli.jobs",
                                    "traflow_cli.specs", "traflow_cli.cli",
                                    "traflow_cli.nets", "traflow_cli.sampling")), name


@pytest.mark.parametrize("path", _files("cli"), ids=lambda p: p.name)
def test_cli_imports_jobs_and_torch_only_inside_commands(path: Path) -> None:
    for name in _imports(path):
        assert name.split(".")[0] != "torch", name
        assert not name.startswith(("traflow_cli.jobs", "traflow_cli.engine")), name

"""Imports point one way (DESIGN.md): core imports only torch, numpy and the standard library;
specs never import torch; the engine knows nothing of the method; nothing inside the package
imports its root (the notebook API); the CLI imports jobs only inside commands; no module imports
itself back through a cycle; and each concept is defined in one module."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "traflow_cli"
CORE = ["flow.py", "grids.py", "objectives", "sampling.py", "seeding.py", "times.py", "nets",
        "data/toy.py"]
CORE_THIRD_PARTY = {"torch", "numpy"}
STDLIB = set(sys.stdlib_module_names)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _import_nodes(path: Path, *, top_level_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement reads: `from a import b` reads a, and a.b if a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not node.module:
        return []
    submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return [node.module, *submodules]


def _imports(path: Path) -> set[str]:
    """Top-level (module-scope) imports of a file, as dotted names."""
    return {n for node in _import_nodes(path, top_level_only=True) for n in _names(node)}


def _all_imports(path: Path) -> set[str]:
    """Every import of a file, function-level ones included."""
    return {n for node in _import_nodes(path, top_level_only=False) for n in _names(node)}


def _files(*entries: str) -> list[Path]:
    out = []
    for entry in entries:
        path = PACKAGE / entry
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


def _ids(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _is_core(name: str) -> bool:
    core = {_module_name(p) for p in _files(*CORE)}
    return name in core or name in ("traflow_cli", "traflow_cli.data")  # packages on the way


@pytest.mark.parametrize("path", _files(*CORE), ids=_ids)
def test_core_imports_only_torch_numpy_stdlib_and_core(path: Path) -> None:
    for name in _all_imports(path):
        top = name.split(".")[0]
        if top == "traflow_cli":
            assert _is_core(name), f"{_ids(path)} imports {name}, which is not core"
        else:
            assert top in CORE_THIRD_PARTY | STDLIB, f"{_ids(path)} imports {name}"


def _module_level_closure(start: str) -> set[str]:
    """Every module that importing `start` runs (parents first), following module-level imports."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        if name in MODULES:
            todo.extend(_imports(MODULES[name]))
    return seen


@pytest.mark.parametrize("name", ["traflow_cli.specs", "traflow_cli.presets", "traflow_cli.times",
                                  "traflow_cli.runfolder", "traflow_cli.errors",
                                  "traflow_cli.data.images.files", "traflow_cli.data.images.errors"])
def test_torch_free_modules_never_import_torch_even_indirectly(name: str) -> None:
    heavy = {n for n in _module_level_closure(name) if n.split(".")[0] in ("torch", "numpy", "PIL")}
    assert not heavy, f"importing {name} imports {sorted(heavy)}"


@pytest.mark.parametrize("path", _files("engine"), ids=_ids)
def test_engine_knows_nothing_of_the_method(path: Path) -> None:
    for name in _all_imports(path):
        assert not name.startswith(("traflow_cli.objectives", "traflow_cli.jobs",
                                    "traflow_cli.specs", "traflow_cli.cli",
                                    "traflow_cli.nets", "traflow_cli.sampling",
                                    "traflow_cli.models")), name


@pytest.mark.parametrize("path", [p for p in MODULES.values() if p != PACKAGE / "__init__.py"],
                         ids=_ids)
def test_nothing_inside_imports_the_package_root(path: Path) -> None:
    # The root is the notebook facade: it may import anything lazily, so nothing may import it
    # (the version lives in traflow_cli.version for the run records).
    for node in _import_nodes(path, top_level_only=False):
        read = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert "traflow_cli" not in read, f"{_ids(path)} imports the package root"


@pytest.mark.parametrize("path", _files("data", "metrics"), ids=_ids)
def test_data_and_metrics_know_nothing_of_the_layers_above(path: Path) -> None:
    for name in _all_imports(path):
        assert not name.startswith(("traflow_cli.jobs", "traflow_cli.cli", "traflow_cli.engine",
                                    "traflow_cli.specs", "traflow_cli.presets",
                                    "traflow_cli.models")), name


CLI_MODULE_LEVEL = ("traflow_cli.cli", "traflow_cli.specs", "traflow_cli.presets",
                    "traflow_cli.errors", "traflow_cli.runfolder")


@pytest.mark.parametrize("path", _files("cli"), ids=_ids)
def test_cli_imports_jobs_and_torch_only_inside_commands(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "traflow_cli":
            assert name.startswith(CLI_MODULE_LEVEL), (
                f"{_ids(path)} imports {name} at module level; import it inside the command")
        else:
            assert top in STDLIB | {"typer", "click", "rich"}, f"{_ids(path)} imports {name}"


def _import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere (function-level included). A package's
    re-exports of its own submodules (a facade) are not edges."""
    graph = {}
    for name, path in MODULES.items():
        is_package = path.name == "__init__.py"
        graph[name] = {dep for dep in _all_imports(path) if dep in MODULES and dep != name
                       and not (is_package and dep.startswith(name + "."))}
    return graph


def test_no_import_cycles() -> None:
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Names defined in several modules on purpose: each job fingerprints its own spec sections; the
# dataset names live in specs.py (torch-free, for validation) and the data factory (checked
# equal by test_dataset_name_lists_agree).
# Interface names each of several modules defines on purpose: every objective has `loss`.
SHARED_NAMES = {"SECTIONS", "IMAGE_DATASETS", "loss"}


def _definitions(path: Path) -> Iterator[str]:
    """Top-level functions, classes and public UPPER_CASE constants a module defines."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.name.startswith("__"):
                yield node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            yield from (t.id for t in targets if isinstance(t, ast.Name)
                        and t.id.isupper() and not t.id.startswith("_"))


def test_each_concept_is_defined_in_one_module() -> None:
    where: dict[str, list[str]] = {}
    for path in MODULES.values():
        for name in _definitions(path):
            where.setdefault(name, []).append(_ids(path))
    twice = {name: files for name, files in where.items()
             if len(files) > 1 and name not in SHARED_NAMES}
    assert not twice, f"defined in more than one module: {twice}"


def _literal(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def test_dataset_name_lists_agree() -> None:
    in_specs = _literal(PACKAGE / "specs.py", "IMAGE_DATASETS")
    in_factory = _literal(PACKAGE / "data" / "images" / "factory.py", "IMAGE_DATASETS")
    assert sorted(in_specs) == sorted(in_factory)


def test_the_package_root_is_the_notebook_api_and_loads_torch_only_when_asked() -> None:
    """`from traflow_cli import load_teacher, ...` gives traflow_cli.models' own objects (no
    module of mere re-exports in between), and `import traflow_cli` alone imports no torch."""
    import subprocess

    code = ("import sys, traflow_cli\n"
            "assert 'torch' not in sys.modules\n"
            "from traflow_cli import Student, Teacher, load_student, load_teacher\n"
            "from traflow_cli import models\n"
            "assert (Student, Teacher, load_student, load_teacher) == (models.Student, "
            "models.Teacher, models.load_student, models.load_teacher)\n"
            "assert sorted(traflow_cli.__all__) == sorted(['Student', 'Teacher', 'load_student', "
            "'load_teacher', '__version__'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem == "api") == []

"""The package's import graph: no cycles, no in-project imports hidden in functions, and the layers
of the design (adapters/ at the bottom, pipeline/ above it, tune/ above that, the CLI on top).

Read from the source with ``ast`` (nothing is imported), over the folders that install as
``raypeft.adapters``, ``raypeft.pipeline``, ``raypeft.tune`` and ``src/raypeft``. Every import
counts wherever it is written: inside a function, under ``if TYPE_CHECKING:`` or through
``importlib.import_module("raypeft....")``. A cycle is a sign that a module holds two ideas: split
it, do not hide the import. Third-party packages that are optional (deepspeed, bitsandbytes,
optuna, matplotlib) may still be imported inside a function; in-project modules may not.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each part of the ``raypeft`` package lives in the repository (setup.py's package_dir).
PACKAGE_DIRS = {"raypeft": REPO / "src" / "raypeft", "raypeft.adapters": REPO / "adapters",
                "raypeft.pipeline": REPO / "pipeline", "raypeft.tune": REPO / "tune"}
CLI = "raypeft.cli"
ADAPTERS_MUST_NOT_IMPORT = ("ray", "deepspeed", "mlflow", "datasets", "raypeft.pipeline", "raypeft.tune")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # every imported dotted name, third-party included
    edges: set[str] = field(default_factory=set)  # in-project modules it imports
    in_function: list[str] = field(default_factory=list)  # "line N: target" of in-project imports in functions


def discover(package_dirs: dict[str, Path]) -> dict[str, Module]:
    """Every module under the package folders, by its installed dotted name."""
    modules: dict[str, Module] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules.setdefault(name, Module(name, path, is_package))
    return modules


def _resolve(name: str, modules: dict[str, Module]) -> str | None:
    """The in-project module ``name`` refers to (``raypeft.pipeline.engine.Worker`` -> its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                if sub is not node:
                    inside.add(id(sub))
    return inside


def build_graph(package_dirs: dict[str, Path]) -> dict[str, Module]:
    modules = discover(package_dirs)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        inside = _function_nodes(tree)
        base = module.name if module.is_package else module.name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                named = targets
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    source = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    source = node.module or ""
                targets = [source]
                named = [f"{source}.{alias.name}" for alias in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
                  "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                targets = named = [node.args[0].value]
            else:
                continue
            module.imports.update(targets)
            found = {r for r in (_resolve(t, modules) for t in [*targets, *named]) if r and r != module.name}
            # A package's __init__ re-exporting its own children is how a package is assembled.
            found = {r for r in found if not (module.is_package and r.startswith(module.name + "."))}
            module.edges.update(found)
            if found and id(node) in inside:
                module.in_function.append(f"line {node.lineno}: {', '.join(sorted(found))}")
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].edges):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def _imports_any(module: Module, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in module.imports if any(i == p or i.startswith(p + ".") for p in prefixes))


@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    return build_graph(PACKAGE_DIRS)


def test_the_walker_sees_the_package(graph: dict[str, Module]) -> None:
    """Guards the tests below against passing on an empty or misread graph."""
    assert {"raypeft.cli", "raypeft.adapters", "raypeft.pipeline.launcher", "raypeft.tune.sweep"} <= set(graph)
    assert "raypeft.pipeline.nonfinite_loss" in graph["raypeft.pipeline.launcher"].edges
    assert "raypeft.pipeline.config.base" in graph["raypeft.pipeline.config.loading"].edges
    assert "ray" in graph["raypeft.pipeline.launcher"].imports


def test_the_walker_finds_cycles_function_imports_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n    return c\nB = 2\n")
    (pkg / "c.py").write_text("import importlib\nmod = importlib.import_module('pkg.a')\n")
    (pkg / "d.py").write_text("import json\n\ndef g():\n    import optuna\n")
    modules = build_graph({"pkg": pkg})
    assert cycles(modules) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert modules["pkg.b"].in_function == ["line 2: pkg, pkg.c"]
    assert modules["pkg.d"].in_function == []  # a third-party import inside a function is not ours to judge
    assert modules["pkg"].edges == set()  # the package assembling its children


def test_no_import_cycles(graph: dict[str, Module]) -> None:
    found = cycles(graph)
    assert not found, "import cycles (split the module along its seam):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_in_project_imports_inside_functions(graph: dict[str, Module]) -> None:
    hidden = [f"{m.name} {where}" for m in graph.values() for where in m.in_function]
    assert not hidden, f"{len(hidden)} in-project imports inside functions (move them to the top):\n" + "\n".join(hidden)


def test_adapters_stand_alone(graph: dict[str, Module]) -> None:
    """adapters/ is a library a user could take alone: no Ray, DeepSpeed, MLflow, datasets, pipeline or tune."""
    bad = {m.name: _imports_any(m, ADAPTERS_MUST_NOT_IMPORT) for m in graph.values()
           if m.name.startswith("raypeft.adapters")}
    assert not {k: v for k, v in bad.items() if v}


def test_pipeline_does_not_import_tune(graph: dict[str, Module]) -> None:
    bad = {m.name: _imports_any(m, ("raypeft.tune",)) for m in graph.values() if m.name.startswith("raypeft.pipeline")}
    assert not {k: v for k, v in bad.items() if v}


def test_only_the_cli_sits_above_pipeline_and_tune(graph: dict[str, Module]) -> None:
    """Outside tune/ (which drives pipeline stages), only ``raypeft.cli`` imports tune; and it
    imports both layers it dispatches to."""
    tune_importers = sorted(m.name for m in graph.values()
                            if not m.name.startswith("raypeft.tune") and _imports_any(m, ("raypeft.tune",)))
    assert tune_importers == [CLI]
    both = sorted(m.name for m in graph.values() if not m.name.startswith("raypeft.tune")
                  and _imports_any(m, ("raypeft.tune",)) and _imports_any(m, ("raypeft.pipeline",)))
    assert both == [CLI]


def test_nothing_imports_the_bare_folder_names(graph: dict[str, Module]) -> None:
    """``adapters``, ``pipeline`` and ``tune`` are other projects' import names: ours are ``raypeft.*``."""
    bare = {m.name: _imports_any(m, ("adapters", "pipeline", "tune")) for m in graph.values()}
    assert not {k: v for k, v in bare.items() if v}

"""The architecture holds: no import cycle anywhere in `service`, and the import-linter contracts.

`just lint` runs `lint-imports` for CI; these tests say the same in the test suite, and the
cycle test is stricter than the contracts: it looks at every module of the package at once,
imports inside functions included (grimp reads every `import` statement, lazy or not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration

import service

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
DOCS = ("README.md", "BENCHMARKS.md", "docs/architecture.md", "docs/gitops.md")


def cycles(graph: grimp.ImportGraph, modules: Iterable[str]) -> list[list[str]]:
    """The strongly connected components of more than one module: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # The graph of this checkout's `service`, not of whatever copy is installed elsewhere.
    assert Path(service.__file__).resolve().parent == ROOT / "service"
    return grimp.build_graph("service", cache_dir=None)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")  # e.g. inside a function
    graph.add_import(importer="pkg.d", imported="pkg.a")
    assert cycles(graph, graph.modules) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_service_has_no_import_cycle_lazy_imports_included(graph: grimp.ImportGraph) -> None:
    modules = {m for m in graph.modules if m == "service" or m.startswith("service.")}
    assert len(modules) > 50  # the whole package was read
    assert cycles(graph, modules) == []


def test_every_package_and_module_at_the_top_has_a_layer() -> None:
    contracts = read_configuration(str(PYPROJECT))["contracts_options"]
    (layers,) = (c for c in contracts if c["type"] == "layers")
    named = {name.strip() for layer in layers["layers"] for name in layer.replace(":", "|").split("|")}
    top = {
        f"service.{p.stem}"
        for p in (ROOT / "service").iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()
    }
    assert top - named == set(), "a package or module outside the layers escapes the contract"


def test_the_import_linter_contracts_hold() -> None:
    here = Path(sys.executable).parent
    binary = shutil.which("lint-imports", path=str(here)) or shutil.which("lint-imports")
    assert binary is not None, "lint-imports is a development dependency (pip install -e '.[dev]')"
    done = subprocess.run(
        [binary, "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_name_only_python_files_that_exist(doc: str) -> None:
    named = set(re.findall(r"[\w./{},-]*\w\.py\b", (ROOT / doc).read_text()))
    stale = []
    for name in sorted(named):
        if "/" not in name:  # a bare module name: somewhere in the package
            found = any((ROOT / "service").rglob(name))
        else:  # a path from the top, or from service/ (`config/loader.py`)
            found = (ROOT / name).exists() or (ROOT / "service" / name).exists()
        if not found:
            stale.append(name)
    assert stale == [], f"{doc} names files that do not exist"

"""The module layout that DESIGN promises, checked on the source: no module imports one that imports it
back (lazy imports inside functions count), the after-search tools never reach the search's modules, and
the core runs without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tune_rice

PACKAGE = Path(tune_rice.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
AFTER_SEARCH = (
    "evaluate",
    "predict",
    "report",
    "report_data",
    "report_figures",
    "report_gallery",
    "report_html",
    "explain",
    "export",
)
SEARCH_SIDE = ("search", "results", "summary", "tune_glue", "trainable", "shards")  # space.py: a YAML file they read
RAY_FREE = (
    "data",
    "prepare",
    "dedup",
    "demo",
    "devices",
    "backbones",
    "timm_zoo",
    "torchutil",
    "model",
    "features",
    "stage",
    "engine",
    "finetune",
    "cv",
    "calibration",
    "final",
    "stats",
    "probe",
    "audit",
    "pixels",
    "storage",
    "study",
    "config",
    "ledger",
    "api",
    "tracking",
    "records",
    *AFTER_SEARCH,
)


def _imports(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its source, at the top or in a function."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tune_rice."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tune_rice.")}
    return found & set(MODULES) - {module}


GRAPH = {m: _imports(m) for m in MODULES}


def _reach(start: str) -> dict[str, list[str]]:
    """Every module ``start`` reaches through imports, with one path to it."""
    paths, todo = {start: [start]}, [start]
    while todo:
        m = todo.pop()
        for n in sorted(GRAPH[m]):
            if n not in paths:
                paths[n] = [*paths[m], n]
                todo.append(n)
    return paths


def test_the_graph_is_read_from_the_source():
    assert {"results", "summary", "storage", "tune_glue"} <= GRAPH["search"]
    assert "search" not in GRAPH["search"] and "final" in GRAPH["results"]


def test_no_module_imports_one_that_imports_it_back():
    cycles = []
    for m in MODULES:
        for n in GRAPH[m]:
            back = _reach(n).get(m)
            if back:
                cycles.append(" -> ".join([m, *back]))
    assert not cycles, f"{len(cycles)} import cycles, e.g. {cycles[:2]}"


def test_the_after_search_tools_read_files_not_the_search_modules():
    for tool in AFTER_SEARCH:
        reached = _reach(tool)
        bad = [" -> ".join(reached[m]) for m in SEARCH_SIDE if m in reached]
        assert not bad, f"{tool} reaches {len(bad)} of the search's modules, e.g. {bad[:2]}"


def test_the_core_imports_without_ray_or_optuna():
    code = (
        "import importlib, sys\n"
        f"for m in {RAY_FREE!r}: importlib.import_module('tune_rice.' + m)\n"
        "print(sorted(x for x in ('ray', 'optuna') if x in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def test_no_function_is_longer_than_80_lines():
    """A long function is a table of contents waiting to be written: every function (and method) in the
    package, from its ``def`` to its last line, is at most MAX_FUNCTION_LINES long."""
    long = []
    for m in MODULES:
        tree = ast.parse((PACKAGE / f"{m}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{m}.{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{m}.py:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"{len(long)} functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"

"""The layout docs/architecture.md promises, read from the folders and the source: the package's stages
import only earlier stages, no module imports one that imports it back (lazy imports inside functions
count), the after-search tools never reach the search, and everything outside ``search/`` runs without
Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tune_rice

PACKAGE = Path(tune_rice.__file__).parent
# The stages of the flow, one folder each, in the order data moves through them.
STAGES = ("data", "features", "heads", "experiment", "tools", "search")


def _name(path: Path) -> str:
    """``tune_rice/heads/engine.py`` -> ``heads.engine``; a top-level module keeps its stem."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {
    _name(p): p
    for p in sorted(PACKAGE.rglob("*.py"))
    if p.stem not in ("__init__", "__main__") and "search_spaces" not in p.parts
}
FOLDERS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
BASE = sorted(m for m in MODULES if "." not in m)  # shared by every stage: errors, devices, torch helpers


def stage(module: str) -> int:
    """The module's place in the flow; -1 for the base modules at the top of the package."""
    return STAGES.index(module.split(".")[0]) if "." in module else -1


def _targets(module: str, node: ast.AST) -> set[str]:
    """The package modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            here = ["tune_rice", *module.split(".")[:-1]]
            base = here[: len(here) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    else:
        return set()
    found = set()
    for full in names:
        if full.startswith("tune_rice."):
            short = full[len("tune_rice.") :]
            while short and short not in MODULES:
                short = short.rpartition(".")[0]
            if short:
                found.add(short)
    return found


def _imports(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its source, at the top or in a function."""
    tree = ast.parse(MODULES[module].read_text())
    return set().union(*(_targets(module, n) for n in ast.walk(tree))) - {module}


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


def test_the_folders_are_the_stages_and_the_graph_is_read_from_the_source():
    assert FOLDERS == sorted(STAGES), f"package folders {FOLDERS} != the stages {sorted(STAGES)}"
    assert BASE == ["cli", "devices", "records", "torchutil"], BASE
    assert {"search.results", "search.summary", "experiment.storage", "search.tune_glue"} <= GRAPH["search.run"]
    assert "data.images" in GRAPH["heads.engine"] and "heads.final" in GRAPH["search.results"]


def test_each_stage_imports_only_earlier_stages_and_the_base():
    bad = [
        f"{m} -> {n}"
        for m in MODULES
        for n in sorted(GRAPH[m])
        if (stage(m) == -1 and n not in BASE) or stage(n) > stage(m)
    ]
    assert not bad, f"{len(bad)} imports against the flow ({' < '.join(STAGES)}), e.g. {bad[:3]}"


def test_no_module_imports_one_that_imports_it_back():
    cycles = []
    for m in MODULES:
        for n in GRAPH[m]:
            back = _reach(n).get(m)
            if back:
                cycles.append(" -> ".join([m, *back]))
    assert not cycles, f"{len(cycles)} import cycles, e.g. {cycles[:2]}"


def test_the_after_search_tools_read_files_not_the_search_modules():
    for tool in (m for m in MODULES if m.startswith("tools.")):
        reached = _reach(tool)
        bad = [" -> ".join(path) for m, path in reached.items() if m.startswith("search.")]
        assert not bad, f"{tool} reaches {len(bad)} of the search's modules, e.g. {bad[:2]}"


def test_everything_outside_search_imports_without_ray_or_optuna():
    ray_free = sorted(m for m in MODULES if not m.startswith("search."))
    code = (
        "import importlib, sys\n"
        f"for m in {ray_free!r}: importlib.import_module('tune_rice.' + m)\n"
        "print(sorted(x for x in ('ray', 'optuna') if x in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    """A long function is a table of contents waiting to be written: every function (and method) in the
    package, from its ``def`` to its last line, is at most MAX_FUNCTION_LINES long."""
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{m}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"{len(long)} functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"

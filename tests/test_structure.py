"""The package's shape: imports flow one way (no cycle in the import graph of jaxdesens/, counting
function-level imports too), reading a model sits below training and federation, nothing imports
launch/, and no file is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxdesens"
MAX_LINES = 500
# Files allowed over MAX_LINES for now, with the reason; an entry that is no longer needed fails.
LONG_FILES: dict[str, str] = {}  # path -> why it may stay over MAX_LINES (none today)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an `import` or `from ... import` anywhere in the file can load."""
    names = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxdesens modules it imports, including the packages whose `__init__` runs
    on the way (except its own ancestors, which are already importing when it runs)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target not in ancestors and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_cycle_finder_sees_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    names = imported_names(PACKAGE / "jobs" / "evaluate" / "run.py", "jaxdesens.jobs.evaluate.run")
    assert "jaxdesens.jobs.search" in names  # imported inside run_evaluate_job


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "jaxdesens.train" in graph["jaxdesens.federation.client"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_reading_a_model_sits_below_training_and_federation():
    graph = import_graph()
    above = {"jaxdesens.train", "jaxdesens.evaluation"}
    for low in ("jaxdesens.state", "jaxdesens.recognizer"):
        reached = reachable(graph, low)
        assert not reached & above and not any(m.startswith(("jaxdesens.jobs", "jaxdesens.federation"))
                                               for m in reached), (low, reached)
    assert not any(m.startswith("jaxdesens.federation") for m in reachable(graph, "jaxdesens.train"))


def test_nothing_in_the_package_imports_launch_benchmarks_or_tests():
    for path in PACKAGE.rglob("*.py"):
        outside = {n for n in imported_names(path, module_name(path))
                   if n.split(".")[0] in ("launch", "benchmarks", "tests", "helpers", "_path")}
        assert not outside, (path, outside)


def test_no_file_in_the_package_is_over_500_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_FILES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
    stale = [name for name in LONG_FILES if lengths.get(name, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines, remove from LONG_FILES: {stale}"

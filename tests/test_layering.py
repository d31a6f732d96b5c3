"""The package's import graph (issue 30): no cycle among module-level imports, and the pure samplers
below block reuse, even through imports inside functions.

A module-level import is one that runs when its module is imported: statements at module level, in
module-level ``if``/``try``/``with`` blocks and class bodies; not in functions, nor under
``if TYPE_CHECKING:``. (Imports inside functions still form cycles between igsm.models and igsm.uvit
and between igsm.config and igsm.paper_tables, which the families and plan parts of issue 30 remove;
then this check can count every import, as import-linter does.)
Importing ``igsm.a.b`` also runs the package ``igsm/a/__init__.py``, so it counts as an import of
``igsm.a`` too, except from inside ``igsm.a`` (a package's own modules run while it is being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, in_functions: bool):
    """The import statements executed when the module is imported (``in_functions``: and those inside
    its functions)."""
    if in_functions:
        yield from (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))
        return
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(child for child in ast.iter_child_nodes(node)
                           if isinstance(child, (ast.stmt, ast.excepthandler)))


def import_graph(root: Path, package: str = "igsm", in_functions: bool = False) -> dict[str, set[str]]:
    """Module → the modules of ``package`` (under ``root``) its module-level imports run (with
    ``in_functions``: its imports inside functions too)."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    packages = {name for name, p in paths.items() if p.name == "__init__.py"}
    graph = {}
    for name, path in paths.items():
        own_package = name if name in packages else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), in_functions):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = own_package.split(".")[:len(own_package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in paths)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages it runs on the way
                prefix = ".".join(parts[:i])
                is_own_ancestor = name == prefix or name.startswith(prefix + ".")
                if prefix in paths and not is_own_ancestor:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a → … → a) through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph) -> list[str]:
    """A shortest path start → … → start inside a strongly connected group (breadth-first)."""
    start = min(group)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & group):
                if succ == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def reachable(graph, start: str) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        for succ in graph.get(pending.pop(), ()):
            if succ not in seen:
                seen.add(succ)
                pending.append(succ)
    return seen


def test_no_import_cycle_among_module_level_imports():
    cycles = find_cycles(import_graph(REPO))
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles)


def test_pure_samplers_import_no_block_reuse():
    """DiP-GO (igsm.reuse) runs the samplers' step objects; the samplers must not need it back, not
    even inside a function (the sample job, igsm.sampling.job, applies plans and may)."""
    graph = import_graph(REPO, in_functions=True)
    assert "igsm.sampling.samplers" in reachable(graph, "igsm.reuse")  # the graph sees the imports at all
    for module in ("igsm.sampling.samplers", "igsm.sampling.denoiser", "igsm.sampling.noise"):
        assert "igsm.reuse" not in reachable(graph, module), module


def test_the_check_finds_planted_cycles(tmp_path):
    """Both kinds the package could grow: two modules importing each other (one only through a
    package's ``__init__`` that re-exports the other), and a function-level import that breaks one."""
    files = {
        "pkg/low.py": "from pkg.sub.pure import f\n",           # runs pkg/sub/__init__.py first
        "pkg/sub/__init__.py": "from pkg.sub.job import g\nfrom pkg.sub.pure import f\n",
        "pkg/sub/pure.py": "import math\ndef f(): pass\n",
        "pkg/sub/job.py": "from pkg.low import *\nfrom . import pure\ndef g(): pass\n",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "from pkg import a\n",
        "pkg/c.py": "def late():\n    from pkg import d\n",  # function level: no cycle
        "pkg/d.py": "import pkg.c\n",
        "pkg/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import f\n",
        "pkg/f.py": "from pkg import e\n",
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert sorted(cycles) == [["pkg.a", "pkg.b", "pkg.a"],
                              ["pkg.low", "pkg.sub", "pkg.sub.job", "pkg.low"]]
    every_import = find_cycles(import_graph(tmp_path, "pkg", in_functions=True))
    assert sorted(every_import) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"],
                                    ["pkg.e", "pkg.f", "pkg.e"], ["pkg.low", "pkg.sub", "pkg.sub.job", "pkg.low"]]

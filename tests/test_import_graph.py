"""The import graph of pretrain/, kernels/ and tools/ has no cycle and points the right way.

Read from the source with `ast` (nothing is imported or executed): every `import` and
`from ... import`, at module level or inside a function, is an edge to the most specific module
of the repo it names. Imports under `if TYPE_CHECKING:` are left out: they never run, and exist
for annotations only. Layering rules on top of "no cycle": kernels never import pretrain (a kernel
is usable without the training library), pretrain never imports tools (tools are thin programs
over the library, never the other way round), the data pipeline knows nothing of the model, and
neither imports the analysis layer (pretrain/scaling, which may import both).

    python -m pytest tests/test_import_graph.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("pretrain", "kernels", "tools")
# (importer, imported): a module at or below the first may not import one at or below the second.
# (pretrain.models may read pretrain.data.images' pixel normalisation: a pretrained encoder folds it in.)
FORBIDDEN = [("kernels", "pretrain"), ("pretrain", "tools"), ("pretrain.models", "pretrain.scaling"),
             ("pretrain.data", "pretrain.models"), ("pretrain.data", "pretrain.scaling")]


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__)."""
    mods = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the repo modules it imports (anywhere in the file)."""
    mods = module_files(root, packages)

    def known(name: str):  # the most specific repo module a dotted name falls in, or None
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(filter(None, (known(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y / from .. import z
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import submodule` names the submodule
                    sub = f"{base}.{a.name}"
                    target = sub if sub in mods else known(base)
                    if target:
                        edges.add(target)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (typing-only imports)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(c)) for c in components]


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A concrete cycle inside one component, for a readable failure message (breadth-first)."""
    start = min(comp)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  for lo, hi in FORBIDDEN if _under(a, lo) and _under(b, hi))


def test_repo_has_no_import_cycle_and_no_upward_edge():
    graph = import_graph(REPO)
    assert len(graph) > 50, f"only {len(graph)} modules found under {PACKAGES}: wrong root?"
    assert graph["pretrain.data.loader"] >= {"pretrain.data.config", "pretrain.data.packing"}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    bad = forbidden_edges(graph)
    assert not bad, f"forbidden imports (rules: {FORBIDDEN}):\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walker_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The checker itself: a cycle closed only by a function-level import, one through a
    relative import, `from pkg import submodule`, and the layering rule, on a made-up tree."""
    _write(tmp_path, {
        "pretrain/__init__.py": "",
        "pretrain/a.py": "import os\nfrom pretrain.b import f\n",
        "pretrain/b.py": "def f():\n    from pretrain import c\n",
        "pretrain/d.py": "import typing\nif typing.TYPE_CHECKING:\n    from pretrain.a import f\nelse:\n    import os\n",
        "pretrain/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pretrain.d\nimport pretrain.a\n",
        "pretrain/c.py": "from .a import x\n",
        "pretrain/sub/__init__.py": "from pretrain.sub.leaf import y\n",
        "pretrain/sub/leaf.py": "import numpy\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "from pretrain.sub import leaf\n",
        "tools/t.py": "from pretrain.a import f\n",
        "pretrain/models/__init__.py": "",
        "pretrain/models/m.py": "def g():\n    import pretrain.scaling.s\n",
        "pretrain/scaling/__init__.py": "",
        "pretrain/scaling/s.py": "from pretrain.models import m\n",
    })
    graph = import_graph(tmp_path)
    assert graph["pretrain.b"] == {"pretrain.c"}
    assert graph["pretrain.d"] == set() and graph["pretrain.e"] == {"pretrain.a"}  # typing-only imports left out
    assert graph["pretrain.c"] == {"pretrain.a"}
    assert graph["kernels.k"] == {"pretrain.sub.leaf"}
    assert graph["pretrain.sub.leaf"] == set()
    cycles = find_cycles(graph)
    assert len(cycles) == 2 and {frozenset(c) for c in cycles} == {
        frozenset({"pretrain.a", "pretrain.b", "pretrain.c"}), frozenset({"pretrain.models.m", "pretrain.scaling.s"})}
    assert all(c[0] == c[-1] and len(c) == len(set(c)) + 1 for c in cycles)
    assert forbidden_edges(graph) == ["kernels.k -> pretrain.sub.leaf",
                                      "pretrain.models.m -> pretrain.scaling.s"]
    (tmp_path / "pretrain/b.py").write_text("def f():\n    pass\n")
    (tmp_path / "pretrain/models/m.py").write_text("")
    assert find_cycles(import_graph(tmp_path)) == []

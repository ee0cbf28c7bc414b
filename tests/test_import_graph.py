"""The package's import graph: no cycles, and the layers point one way. Every import counts, the ones inside
functions too (a lazy import still ties two modules together). Read from the source with `ast`, so the test
needs no heavy package and names the offending modules when it fails."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "webui"
# The app's core: models, adapters, loaders, downloads, training, export. It must not know the front-ends.
CORE = ("webui.engine", "webui.scheduler", "webui.backends", "webui.adapters", "webui.hub", "webui.training",
        "webui.export", "webui.evaluate", "webui.config", "webui.errors", "webui.models", "webui.embedded",
        "webui.paths", "webui.progress", "webui.stop_strings", "webui.presets", "webui.conversations",
        "webui.extensions")
FRONT_ENDS = ("webui.ui", "webui.api", "webui.server", "webui.cli")
WEB_FRAMEWORKS = ("gradio", "fastapi", "starlette", "uvicorn")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module name `path` imports (absolute, with relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package's own __init__ importing its submodules is not an edge)."""
    mods = _modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in mods.items():
        deps = {owner(t) for t in _imports(name, path) if t.startswith("webui")} - {None, name}
        if path.name == "__init__.py":
            deps = {d for d in deps if not d.startswith(name + ".")}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_core_never_imports_a_front_end_or_a_web_framework():
    wrong = []
    for name, path in _modules().items():
        if not _in(name, CORE):
            continue
        imported = _imports(name, path)
        wrong += [f"{name} -> {t}" for t in imported if _in(t, FRONT_ENDS) or _in(t, WEB_FRAMEWORKS)]
    assert wrong == []


def test_nothing_in_the_app_imports_the_test_fixtures():
    wrong = [f"{name} -> {dep}" for name, deps in _graph().items() if not _in(name, ("webui.testing",))
             for dep in deps if _in(dep, ("webui.testing",))]
    assert wrong == []


def test_the_graph_reader_sees_imports_inside_functions():
    """Guards the guard: a lazy import is an edge, and a cycle made of them is found."""
    graph = _graph()
    assert "webui.server" in graph["webui.cli"]  # imported inside main(), not at the top
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

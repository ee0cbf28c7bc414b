"""The package's import graph: no cycles between modules nor between folders, the layers point one way, and
the architecture page (docs/architecture.md) names every module. Every import counts, the ones inside
functions too (a lazy import still ties two modules together). Read from the source with `ast`, so the test
needs no heavy package and names the offending modules when it fails."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "webui"
# The app's core: models, adapters, loaders, downloads, training, export. It must not know the front-ends.
CORE = ("webui.engine", "webui.backends", "webui.adapters", "webui.hub", "webui.training", "webui.export",
        "webui.evaluate", "webui.options", "webui.errors", "webui.paths", "webui.progress", "webui.conversations",
        "webui.preferences", "webui.extensions")
FRONT_ENDS = ("webui.ui", "webui.api", "webui.web", "webui.cli")
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


def _folder(module: str) -> str:
    """The room a module lives in: its folder under webui/ (webui.backends for webui.backends.hf.gptq); a module
    at the top of the package (errors, paths, progress, cli, ...) is a room of its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or _is_package(module) else module


def _is_package(module: str) -> bool:
    return (ROOT.joinpath(*module.split(".")) / "__init__.py").exists()


def _folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph with folders as nodes: an edge A -> B when any module in A imports one in B."""
    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        node = out.setdefault(_folder(name), set())
        node.update(_folder(d) for d in deps)
    for node, deps in out.items():
        deps.discard(node)
    for deps in list(out.values()):
        for d in deps:
            out.setdefault(d, set())
    return out


def test_no_import_cycles_between_folders():
    """A folder may depend on another only one way round (engine -> backends -> options, never back), so each
    room can be read, moved or tested with the ones below it alone."""
    assert _cycles(_folder_graph(_graph())) == []


def test_the_folder_check_sees_a_loop():
    """Guards the guard: two folders that import each other through different modules are a loop."""
    graph = {"webui.options.config": {"webui.backends.registry"}, "webui.backends.registry": set(),
             "webui.backends.hf.gptq": {"webui.options.flags"}, "webui.options.flags": set()}
    assert _cycles(_folder_graph(graph)) == [["webui.backends", "webui.options"]]


def test_no_folder_holds_more_than_twelve_modules():
    """A newcomer reads a folder in one look; a bigger one wants sub-rooms by concept."""
    crowded = {}
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").exists())]:
        modules = [p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        if len(modules) > 12:
            crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert crowded == {}


def test_the_architecture_page_names_every_module():
    """docs/architecture.md maps the house: each module by its path (webui/engine/scheduler.py), each package by its
    folder. A module added without a line there fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for name, path in _modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            rel = rel.removesuffix("__init__.py")
            if rel.count("/") > 1 and rel not in page and rel.rstrip("/") not in page:
                missing.append(rel)
        elif path.name != "__main__.py" and rel not in page:
            missing.append(rel)
    assert missing == []


def test_the_architecture_page_names_no_module_that_is_gone():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"webui/[\w/]+\.py", page))
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


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
    assert "webui.web.server" in graph["webui.cli"]  # imported inside main(), not at the top
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

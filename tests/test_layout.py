"""The tree keeps the shape docs/architecture.md describes: no import circles among the modules of
server/ and models/ (imports inside functions included), models/ reaching server/ only through its
public package, and no source file over ~400 lines outside tests and generated code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"hybridserve.server": ROOT / "server", "hybridserve.models": ROOT / "models"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *parts[:-1])) if parts[-1] == "__init__" else ".".join((prefix, *parts))
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``path`` imports (``from package import module`` counts as the module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    known = modules()
    # A package's __init__ importing its own modules is not a circle of concern.
    graph = {name: {m for m in imports(path, known) if not (path.name == "__init__.py" and m.startswith(name))}
             for name, path in known.items()}
    assert cycles(graph) == []


def test_models_use_only_the_server_public_package():
    known = modules()
    reaching = {name: sorted(m for m in imports(path, known) if m.startswith("hybridserve.server.") )
                for name, path in known.items() if name.startswith("hybridserve.models")}
    assert {name: found for name, found in reaching.items() if found} == {}


def test_source_files_stay_small():
    generated = ROOT / "clients" / "hybridserve_client" / "_grpc"
    sources = [p for folder in ("server", "models", "clients", "benchmarks") for p in (ROOT / folder).rglob("*.py")
               if generated not in p.parents]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}

"""The package's shape, checked from its source (README, "Layout"): no import circle, no module too
long to see at once, the command line only in codestop/cli/, server kinds only in the dialects."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "codestop"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The codestop modules ``path`` imports, anywhere in it (a function-level import is an edge too:
    it only hides a circle until the function runs). ``from codestop.x import y`` counts
    ``codestop.x.y`` when that is a module (a package's own submodules are not the package), else
    ``codestop.x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_600_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it"


def test_only_the_command_line_knows_argparse():
    offenders = [name for name, path in modules().items()
                 if not name.startswith("codestop.cli") and ("argparse" in imported_names(path) or "codestop.cli" in imported_names(path))]
    assert offenders == []


# what telling server kinds apart looks like: a kind flag, a dialect's name compared, a dialect class tested
KIND_BRANCH = re.compile(r"server_kind|dialect\.name\s*[!=]=|isinstance\([^)]*\b(VLLM|SGLang|LlamaCpp)\b")


def test_server_kinds_are_told_apart_only_in_the_dialects():
    """Adding a server kind is one Dialect class in engines/server/dialects.py, nothing else."""
    offenders = [name for name, path in modules().items()
                 if name != "codestop.engines.server.dialects" and KIND_BRANCH.search(path.read_text())]
    assert offenders == []
    assert KIND_BRANCH.search('if self.dialect.name == "vllm":') and KIND_BRANCH.search("isinstance(d, SGLang)")


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] if a.name.startswith("argparse") else a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n if not n.startswith("codestop.cli") else "codestop.cli" for n in names}

"""The project's import graph: one direction, no cycles.

Walks every module of ``pipeline/``, ``transforms/`` and ``networks/`` with ``ast`` (function-local
imports included: they hide cycles rather than remove them) and fails on an import cycle, on
``transforms/`` or ``networks/`` importing ``pipeline/`` (the data and model layers must not know
the stages), and on ``networks/`` importing ``transforms/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "networks")
# a package may never import the packages listed for it
NEVER = {"transforms": ("pipeline",), "networks": ("pipeline", "transforms")}


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(repo: Path) -> dict[str, Path]:
    return {module_name(p, repo): p for pkg in PACKAGES for p in sorted((repo / pkg).rglob("*.py"))}


def imports_of(path: Path, me: str, modules: set[str]) -> set[str]:
    """The project modules ``me`` imports anywhere in its file (``from a import b`` may name a
    submodule ``a.b``; absolute and relative forms alike)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".") if is_pkg else me.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule (and runs pkg/__init__ first, which
            # is the package's own business); ``from mod import name`` imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def graph(repo: Path = REPO) -> dict[str, set[str]]:
    mods = project_modules(repo)
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def broken_layers(g: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} imports {d}"
        for m, deps in sorted(g.items())
        for d in sorted(deps)
        if d.split(".")[0] in NEVER.get(m.split(".")[0], ())
    ]


def test_the_project_has_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles (function-local imports count):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_transforms_and_networks_never_import_the_layers_above_them():
    found = broken_layers(graph())
    assert not found, "layer rule broken:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        # a cycle hidden in a function body is still a cycle
        (
            {
                "pipeline/a.py": "import pipeline.b\n",
                "pipeline/b.py": "def f():\n    from pipeline import a\n",
            },
            "cycle",
        ),
        (
            {"transforms/t.py": "def f():\n    from pipeline.a import x\n", "pipeline/a.py": "x = 1\n"},
            "layer",
        ),
        ({"networks/n.py": "from transforms.t import y\n", "transforms/t.py": "y = 1\n"}, "layer"),
        (
            {
                "pipeline/a.py": "from transforms import t\n",
                "transforms/t.py": "from networks import n\n",
                "networks/n.py": "",
            },
            "",
        ),
    ],
)
def test_the_checker_catches_what_it_should(tmp_path, files, expect):
    """The check itself, on tiny fake projects: it must see function-local imports and layers."""
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.parent / "__init__.py").touch()
        p.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    g = graph(tmp_path)
    assert bool(cycles(g)) == (expect == "cycle")
    assert bool(broken_layers(g)) == (expect == "layer")

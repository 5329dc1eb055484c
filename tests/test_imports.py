"""The project's import graph: one direction, no cycles.

Walks every module of ``pipeline/``, ``transforms/`` and ``networks/`` with ``ast`` (function-local
imports included: they hide cycles rather than remove them) and fails on an import cycle, on
``transforms/`` or ``networks/`` importing ``pipeline/`` (the data and model layers must not know
the stages), on ``networks/`` importing ``transforms/``, on the shared infrastructure
(``pipeline/infra/``) importing a stage, on a stage importing a stage it does not drive, and on
any function-local import of the project's own modules (a stage's heavy imports wait until the CLI
has checked its config by importing the stage's module late, not by hiding imports in functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "networks")
# a package may never import the packages listed for it
NEVER = {"transforms": ("pipeline",), "networks": ("pipeline", "transforms")}
INFRA = "pipeline.infra"
# stage -> the stages it may import: gain drives train, classify and evaluate (and runs its items on
# Ray through pipeline.gain_ray, its own executor); a stage that runs on the embedded default data
# set when given none asks ingest for it
DRIVES = {
    "pipeline.gain": {
        "pipeline.train",
        "pipeline.classify",
        "pipeline.evaluate",
        "pipeline.ingest",
        "pipeline.gain_ray",
    },
    "pipeline.train": {"pipeline.ingest"},
    "pipeline.classify": {"pipeline.ingest"},
    "pipeline.evaluate": {"pipeline.ingest"},
}


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


def _is_stage(m: str) -> bool:
    return m.startswith("pipeline.") and not (m == INFRA or m.startswith(INFRA + "."))


def _stage_of(m: str) -> str:
    """The stage a module belongs to: ``pipeline.X`` for ``pipeline/X.py`` and for every module of
    the package ``pipeline/X/`` (whose modules import each other freely)."""
    return ".".join(m.split(".")[:2])


def broken_layers(g: dict[str, set[str]]) -> list[str]:
    out = []
    for m, deps in sorted(g.items()):
        for d in sorted(deps):
            if d.split(".")[0] in NEVER.get(m.split(".")[0], ()):
                out.append(f"{m} imports {d}")
            elif m.startswith(INFRA) and _is_stage(d):
                out.append(f"{m} (infrastructure) imports the stage {d}")
            elif (
                _is_stage(m)
                and _is_stage(d)
                and m != "pipeline.run"
                and _stage_of(d) not in {_stage_of(m), *DRIVES.get(_stage_of(m), ())}
            ):
                out.append(f"{m} imports the stage {d}, which it does not drive")
    return out


def local_imports(repo: Path = REPO) -> list[str]:
    """``file:line`` of every import of a project module inside a function or method."""
    out = []
    for m, path in project_modules(repo).items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else (node.module or "")]
                else:
                    continue
                if any(n == "." or n.split(".")[0] in PACKAGES for n in names):
                    out.append(f"{path.relative_to(repo)}:{node.lineno} ({m})")
    return sorted(set(out))


def test_the_project_has_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles (function-local imports count):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_no_function_local_import_of_the_projects_own_modules():
    found = local_imports()
    assert not found, "function-local project imports (move them to the top of the module):\n" + "\n".join(
        found
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
                "pipeline/infra/a.py": "import pipeline.infra.b\n",
                "pipeline/infra/b.py": "def f():\n    from pipeline.infra import a\n",
            },
            "cycle",
        ),
        (
            {"transforms/t.py": "def f():\n    from pipeline.a import x\n", "pipeline/a.py": "x = 1\n"},
            "layer",
        ),
        ({"networks/n.py": "from transforms.t import y\n", "transforms/t.py": "y = 1\n"}, "layer"),
        # infrastructure never calls a stage; a stage imports only the stages it drives
        ({"pipeline/infra/x.py": "from pipeline import train\n", "pipeline/train.py": ""}, "layer"),
        ({"pipeline/train.py": "import pipeline.classify\n", "pipeline/classify.py": ""}, "layer"),
        ({"pipeline/gain.py": "import pipeline.classify\n", "pipeline/classify.py": ""}, ""),
        # a stage package's modules import each other; a stage driving it imports any of them
        ({"pipeline/ingest/a.py": "from pipeline.ingest import b\n", "pipeline/ingest/b.py": ""}, ""),
        ({"pipeline/train.py": "from pipeline.ingest.a import x\n", "pipeline/ingest/a.py": "x = 1\n"}, ""),
        ({"pipeline/ingest/a.py": "import pipeline.train\n", "pipeline/train.py": ""}, "layer"),
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
    # the first fake project hides its import in a function body
    assert bool(local_imports(tmp_path)) == ("def f():\n    from" in "".join(files.values()))
    assert bool(cycles(g)) == (expect == "cycle")
    assert bool(broken_layers(g)) == (expect == "layer")

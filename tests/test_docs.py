"""The manual holds together: README.md stays a front page, every command block of README.md and
docs/*.md is run by a test or says it is not, links resolve, and the MkDocs site builds strictly.

A ```bash / ```python block is accounted for by an HTML comment on the line before it:
``<!-- snippet:NAME -->`` (tests/test_readme.py runs it), ``<!-- walkthrough -->``
(tests/readme_walkthrough.py runs it in a fresh clone), ``<!-- make -->`` (``make TARGET`` lines,
each target checked against the Makefile here) or ``<!-- illustration -->`` (shown, run by no test).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cxr_factory import REPO

DOCS = REPO / "docs"
README_MAX_LINES = 150
RUNNABLE = {"bash", "sh", "shell", "console", "python", "py", "python3", "pycon"}
MARKER = re.compile(r"^\s*<!--\s*(snippet:[\w-]+|walkthrough|make|illustration)\s*-->\s*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
# pages the study writes (pipeline.run report) or feeds into them (its notes): their command lines
# record how a study was run, and report writes no markers
STUDY_PAGES = ("gain.md", "gain_notes.md", "ablation*.md")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str | None
    body: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.lang})"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the marker on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARKER.match(lines[k]) if k >= 0 else None
        out.append(Block(page, i + 1, lang, mark.group(1) if mark else None, "\n".join(lines[i + 1 : j])))
        i = j + 1
    return out


def is_study_page(page: Path) -> bool:
    return page.parent == DOCS and any(fnmatch.fnmatch(page.name, pat) for pat in STUDY_PAGES)


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(p)]


def pending_study_pages() -> set[str]:
    """Pages the site gets a stub for until report renders them (docs/hooks/study_pages.py)."""
    spec = importlib.util.spec_from_file_location("study_pages", DOCS / "hooks" / "study_pages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return set(mod.PENDING)


def test_the_parser_sees_markers_and_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n<!-- illustration -->\n```bash\necho a\n```\n\n````python\n```bash\nnot a fence end\n````\n"
        "<!-- snippet:x -->\n\n```python\nprint(1)\n```\n"
    )
    got = [(b.line, b.lang, b.marker) for b in blocks(page)]
    assert got == [(4, "bash", "illustration"), (8, "python", None), (14, "python", "snippet:x")]


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines: it is the front page (under {README_MAX_LINES}); "
        "move the detail into a page of docs/ and link it"
    )
    text = "\n".join(lines)
    for must in ("docs/default_job_samples.png", "docs/gain.md", "docs/ablation.md"):
        assert must in text, f"README.md no longer shows or links {must}"


def test_every_command_block_is_run_by_a_test_or_marked_an_illustration():
    unmarked = [
        b.where()
        for b in all_blocks()
        if b.lang in RUNNABLE and b.marker is None and not is_study_page(b.page)
    ]
    assert not unmarked, (
        "command blocks that no test runs and that are not marked: put <!-- illustration --> (or "
        "<!-- snippet:NAME --> with a test in tests/test_readme.py, or <!-- make -->) on the line "
        "before each: " + ", ".join(unmarked)
    )


def test_each_marker_has_its_runner():
    found = all_blocks()
    runner = (REPO / "tests" / "test_readme.py").read_text(encoding="utf-8")
    snippets = [b for b in found if b.marker and b.marker.startswith("snippet:")]
    assert snippets, "no <!-- snippet:NAME --> block left: tests/test_readme.py runs them"
    for b in snippets:
        name = b.marker.split(":", 1)[1]
        assert b.lang == "python", f"{b.where()}: a snippet is a ```python block"
        assert f'_snippet("{name}")' in runner, (
            f"{b.where()}: tests/test_readme.py does not run snippet {name!r}"
        )
    names = [b.marker for b in snippets]
    assert len(names) == len(set(names)), f"a snippet name is used twice: {sorted(names)}"
    walks = [b for b in found if b.marker == "walkthrough"]
    # tests/readme_walkthrough.py reads the walk-through from docs/walkthrough.md
    assert [b.page for b in walks] == [DOCS / "walkthrough.md"], [b.where() for b in walks]
    assert walks[0].lang == "bash"
    assert "tests/readme_walkthrough.py" in (DOCS / "walkthrough.md").read_text(encoding="utf-8")


def test_make_blocks_name_makefile_targets():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    makes = [b for b in all_blocks() if b.marker == "make"]
    assert any(b.page.name == "README.md" for b in makes), (
        "README.md's two set-up commands are a <!-- make --> block"
    )
    for b in makes:
        for line in b.body.splitlines():
            cmd = line.split("#", 1)[0].split()
            if not cmd:
                continue
            assert cmd[0] == "make" and len(cmd) > 1, (
                f"{b.where()}: a <!-- make --> block holds make lines only: {line!r}"
            )
            assert cmd[1] in targets, f"{b.where()}: `make {cmd[1]}` has no target in the Makefile"
    readme = next(b for b in makes if b.page.name == "README.md").body
    assert re.search(r"^make run\b", readme, re.M) and re.search(r"^make test\b", readme, re.M)


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert cfg["docs_dir"] == "docs"
    nav = [p for p in _nav_pages(cfg["nav"]) if not re.match(r"^[a-z]+://", p)]
    not_in_nav = [ln.strip() for ln in (cfg.get("not_in_nav") or "").splitlines() if ln.strip()]
    have = {p.name for p in DOCS.glob("*.md")}
    missing = sorted(p for p in have if p not in nav and f"/{p}" not in not_in_nav)
    assert not missing, f"docs pages in neither mkdocs.yml's nav nor its not_in_nav: {missing}"
    ghosts = sorted(p for p in nav if not (DOCS / p).is_file() and p not in pending_study_pages())
    assert not ghosts, f"mkdocs.yml's nav names pages that do not exist: {ghosts}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    """README.md lies outside the site (MkDocs never checks it); docs/ is checked here too, without MkDocs."""
    pending = {DOCS / p for p in pending_study_pages()}
    broken = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
        text = re.sub(r"`[^`\n]*`", "", text)  # nor does inline code
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() and path not in pending:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, f"links to nothing: {broken}"


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(
    not (_have("mkdocs") and _have("material")),
    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[dev]' installs them)",
)
def test_site_builds_strictly(tmp_path):
    # not -q: mkdocs 1.6 with --quiet drops warnings before strict mode counts them, and passes
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "walkthrough" / "index.html").is_file()

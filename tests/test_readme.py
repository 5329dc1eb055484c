"""The manual's Python snippets run as written (on the embedded phantoms and a tiny generator).

A snippet is the ```python block right after ``<!-- snippet:NAME -->`` in README.md or a page of
docs/ (today both are in docs/generate.md); each name must be there exactly once."""

from __future__ import annotations

import re

from cxr_factory import REPO


def _snippet(name: str) -> tuple[str, str]:
    """(code, file:name) of snippet NAME, from README.md or docs/*.md."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(rf"<!-- snippet:{name} -->\s*```python\n(.*?)```", page.read_text(), re.S):
            found.append((m.group(1), f"{page.relative_to(REPO)}:{name}"))
    assert len(found) == 1, f"snippet '{name}' is in README.md and docs/*.md {len(found)} times, not once"
    return found[0]


def test_readme_augmentation_snippet_runs(phantom_manifest, phantom_generator, monkeypatch, capsys):
    monkeypatch.setenv("MANIFEST", str(phantom_manifest))
    monkeypatch.setenv("CHECKPOINT", phantom_generator["checkpoint"])
    monkeypatch.setenv("EPOCHS", "1")
    exec(compile(*_snippet("augment"), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"epoch 0: loss \d+\.\d+, synthetic images seen: \d+", out), out
    n = int(out.strip().split()[-1])
    assert n > 0


def test_readme_pyfunc_snippet_runs(phantom_generator, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", phantom_generator["uri"])
    monkeypatch.setenv("MODEL_URI", f"runs:/{phantom_generator['run_id']}/generator")
    exec(compile(*_snippet("pyfunc"), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip().startswith("(8, 1, 32, 32)")

"""The README's augmentation snippet runs as written (on the embedded phantoms and a tiny generator)."""

from __future__ import annotations

import re

from cxr_factory import REPO


def _snippet(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- snippet:{name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no snippet '{name}'"
    return m.group(1)


def test_readme_augmentation_snippet_runs(phantom_manifest, phantom_generator, monkeypatch, capsys):
    monkeypatch.setenv("MANIFEST", str(phantom_manifest))
    monkeypatch.setenv("CHECKPOINT", phantom_generator["checkpoint"])
    monkeypatch.setenv("EPOCHS", "1")
    exec(compile(_snippet("augment"), "README.md:augment", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"epoch 0: loss \d+\.\d+, synthetic images seen: \d+", out), out
    n = int(out.strip().split()[-1])
    assert n > 0


def test_readme_pyfunc_snippet_runs(phantom_generator, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", phantom_generator["uri"])
    monkeypatch.setenv("MODEL_URI", f"runs:/{phantom_generator['run_id']}/generator")
    exec(compile(_snippet("pyfunc"), "README.md:pyfunc", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip().startswith("(8, 1, 32, 32)")

"""``python -m pipeline.run report records=FOLDER [out=PAGE.md]``: a study's results page from its records.

Reads only the records folder of a gain study (no MLflow store, no weights): the table per test
split with the paired intervals, the plots of those intervals, the verdict per fraction, the
generators' quality and the measured cost beside the cost model's estimate. docs/gain.md is this
page for the committed study (``records=docs/studies/kermany64 out=docs/gain.md``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.infra.records import StudyRecords
from pipeline.infra.study_configs import ReportConfig
from pipeline.infra.study_report import (
    SPLIT_TITLES,
    ablation_markdown,
    ablation_rows,
    child_rows,
    cost_table,
    generator_table,
    summarise,
    to_markdown,
    verdict,
)
from pipeline.infra.viz import plot_gain
from transforms.manifest import atomic_write_text


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Render a study's results page (tables, paired-interval plots, verdict, cost) from its records."""
    if cfg.variants:
        return ablation_report(cfg)
    records = StudyRecords(cfg.records)
    study = records.study()
    if study is None:
        raise FileNotFoundError(f"{cfg.records}: no study.json: not a gain study's records folder")
    children, generators = records.all("children"), records.all("generators")
    out = Path(cfg.out or Path(cfg.records) / "report.md")
    rows = child_rows(children, generators)
    table = summarise(rows) if not rows.empty else None
    conf = study["config"]
    lines = [
        f"# {cfg.title}",
        "",
        f"Rendered from the records in `{_rel(Path(cfg.records), out.parent)}` by "
        f"`python -m pipeline.run report records={cfg.records} out={cfg.out or out}` (no MLflow store, "
        "no weights). Fractions "
        f"{conf.get('fractions')}, seeds {conf.get('seeds')}, arms {conf.get('arms')}; "
        f"{len(children)} classifier children and {len(generators)} generators recorded.",
        "",
    ]
    plots = []
    if table is not None:
        for split, t in table.groupby("split", sort=False):
            lines += [f"## Verdict: {SPLIT_TITLES.get(split, split)}", ""]
            lines += [f"- {v}" for v in verdict(t)] + [""]
        if cfg.notes:
            lines += [Path(cfg.notes).read_text(encoding="utf-8").rstrip(), ""]
        for split, t in table.groupby("split", sort=False):
            lines += [f"## Results: {SPLIT_TITLES.get(split, split)}", "", to_markdown(t)]
            for ref in ("real", "real_dup"):
                if ref not in set(t["arm"]) or len(set(t["arm"])) < 2:
                    continue
                png = out.with_name(f"{out.stem}_{split}_vs_{ref}.png")
                title = f"ΔAUROC vs {ref}, {SPLIT_TITLES.get(split, split)}: paired 95 % intervals"
                plots.append(plot_gain(t, png, title=title, ref=ref))
                lines += [f"![ΔAUROC vs {ref} ({split})]({png.name})", ""]
    else:
        lines += ["No classifier child is recorded yet.", ""]
    lines += ["## Generators", "", generator_table(generators) if generators else "None recorded.", ""]
    lines += _sample_grids(Path(cfg.records), generators, out)
    lines += ["## What the study cost (measured)", "", cost_table(children, generators)]
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    print(f"report: {out} ({len(children)} children, {len(generators)} generators; plots: {len(plots)})")
    return {"page": str(out), "plots": [str(p) for p in plots], "table": table}


def _sample_grids(records: Path, generators: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """One sample grid per fraction (its lowest seed's generator, the kept epoch's prior samples,
    columns headed by their class), from ``RECORDS/grids/GENERATOR.png``, copied beside the page."""
    first: dict[float, str] = {}
    for name, g in sorted(
        generators.items(), key=lambda kv: (float(kv[1]["fraction"]), int(kv[1].get("seed") or 0))
    ):
        if (records / "grids" / f"{name}.png").is_file():
            first.setdefault(float(g["fraction"]), name)
    if not first:
        return []
    lines = [
        "## Samples",
        "",
        "Prior samples of each fraction's first generator at its kept epoch (columns headed by class):",
        "",
    ]
    for fraction, name in sorted(first.items()):
        dest = out.with_name(f"{out.stem}_samples_{name}.png")
        shutil.copyfile(records / "grids" / f"{name}.png", dest)
        lines += [f"![{name} ({fraction:g} of the real data)]({dest.name})", ""]
    return lines


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def ablation_report(cfg: ReportConfig) -> dict[str, Any]:
    """A recipe ablation's page: per variant and seed, the generator's quality and its downstream
    value on the selection split, then each variant's mean (the choice reads CAS and ΔAUROC)."""
    variants = {}
    for folder in cfg.variants:
        rec = StudyRecords(folder)
        if rec.study() is None:
            raise FileNotFoundError(f"{folder}: no study.json: not a gain study's records folder")
        variants[Path(folder).name] = (rec.all("children"), rec.all("generators"))
    rows = ablation_rows(variants, cfg.select_split)
    out = Path(cfg.out or "ablation.md")
    lines = [
        f"# {cfg.title}",
        "",
        f"Rendered from the records of {len(variants)} variant(s) by `python -m pipeline.run report "
        f"variants=[{','.join(cfg.variants)}] out={cfg.out or out}`. CAS and ΔAUROC are measured on the "
        f"`{cfg.select_split}` split (carved from the training pool, never a test split).",
        "",
        ablation_markdown(rows) if not rows.empty else "No generator is recorded yet.",
    ]
    if cfg.notes:
        lines += ["", Path(cfg.notes).read_text(encoding="utf-8").rstrip()]
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    print(f"report: {out} ({len(rows)} generator(s) in {len(variants)} variant(s))")
    return {"page": str(out), "rows": rows}

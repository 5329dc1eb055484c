"""What a value study found, from its records alone (:mod:`pipeline.infra.records`).

No MLflow store and no weights are read: the per-image test scores in the child records give the
paired statistics; the generator records give the generators' quality and cost. Used by the gain
stage at the end of a study and by ``python -m pipeline.run report`` (docs/gain.md).

Statistics: per (test split, fraction, arm), the mean test AUROC with a t-interval over seeds, and
the AUROC difference to ``real`` and to ``real_dup`` paired on the same test images (per seed a
paired bootstrap of the two classifiers' per-image scores, over seeds a two-level bootstrap:
:func:`pipeline.infra.metrics.combine_seed_deltas`). The verdict reads the paired intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.infra.arms import ARM_REGISTRY
from pipeline.infra.metrics import clipped_mean_ci, combine_seed_deltas, paired_auroc_deltas

SPLIT_TITLES = {"test": "official test split (shifted)", "holdout": "in-distribution held-out test split"}
NAN3 = (float("nan"),) * 3


def child_rows(
    children: dict[str, dict[str, Any]],
    generators: dict[str, dict[str, Any]] | None = None,
    names: set[str] | None = None,
) -> pd.DataFrame:
    """One row per (child record, test split): metrics, steps, wall time, the per-image scores and
    the class fidelity of the child's generator judged by that seed's real child (``names``: only
    these children)."""
    rows = []
    for name, rec in sorted(children.items()):
        if names is not None and name not in names:
            continue
        gen = (generators or {}).get(rec.get("generator") or "") or {}
        fid = ((gen.get("class_fidelity") or {}).get(str(rec["seed"])) or {}).get("auroc")
        for split, sc in (rec.get("scores") or {}).items():
            m = rec["metrics"]
            pre = "test" if split == rec.get("test_split", "test") else split
            rows.append(
                {
                    "name": name,
                    "split": split,
                    "fraction": float(rec["fraction"]),
                    "arm": rec["arm"],
                    "seed": int(rec["seed"]),
                    "auroc": m.get(f"{pre}/auroc", float("nan")),
                    "balanced_accuracy": m.get(f"{pre}/balanced_accuracy", float("nan")),
                    "sensitivity": m.get(f"{pre}/sensitivity", float("nan")),
                    "specificity": m.get(f"{pre}/specificity", float("nan")),
                    "steps": float(rec.get("optimizer_steps", float("nan"))),
                    "wall_s": float(rec.get("wall_s", float("nan"))),
                    "run_id": rec.get("run_id"),
                    "images": sc["images_sha256"],
                    "labels": np.asarray(sc["labels"], dtype=int),
                    "scores": np.asarray(sc["scores"], dtype=float),
                    "generator_class_fidelity": float("nan") if fid is None else float(fid),
                }
            )
    return pd.DataFrame(rows)


def paired_deltas(rows: pd.DataFrame, ref: str, n_boot: int = 1000) -> dict[tuple[str, float, str], tuple]:
    """(split, fraction, arm) -> (mean ΔAUROC against ``ref``, 95 % low, high), paired on the same
    test images per seed; a (fraction, arm) missing a seed of ``ref`` is left out."""
    out: dict[tuple[str, float, str], tuple] = {}
    if rows.empty or ref not in set(rows["arm"]):
        return out
    for (split, frac, arm), g in rows.groupby(["split", "fraction", "arm"], sort=True):
        if arm == ref:
            continue
        base = rows[(rows["split"] == split) & (rows["fraction"] == frac) & (rows["arm"] == ref)]
        base = base.set_index("seed")
        deltas, reps = [], []
        for r in g.itertuples():
            if r.seed not in base.index:
                deltas = []
                break
            b = base.loc[r.seed]
            # pairing needs the same test images in the same order, each with the same label
            if b["images"] != r.images or not np.array_equal(b["labels"], r.labels):
                raise ValueError(
                    f"children {r.name} and {b['name']} scored different {split} images: arms of one "
                    "(fraction, seed) must share the test split; re-run the study with one manifest"
                )
            d, rep = paired_auroc_deltas(r.labels, r.scores, b["scores"], n_boot, int(r.seed))
            deltas.append(d)
            reps.append(rep)
        if deltas:
            out[(split, frac, arm)] = combine_seed_deltas(deltas, reps, seed=0)
    return out


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (split, fraction, arm): AUROC with a t-interval over seeds, the paired differences to
    ``real`` and ``real_dup``, balanced accuracy, sensitivity, specificity, steps, wall time."""
    vs_real, vs_dup = paired_deltas(rows, "real"), paired_deltas(rows, "real_dup")
    out = []
    for (split, frac, arm), g in rows.groupby(["split", "fraction", "arm"], sort=True):
        m, lo, hi = clipped_mean_ci(g["auroc"].to_numpy())
        fid = g["generator_class_fidelity"].to_numpy(dtype=float)
        fid = fid[np.isfinite(fid)]
        out.append(
            {
                "split": split,
                "fraction": frac,
                "arm": arm,
                "n_seeds": len(g),
                "auroc": m,
                "auroc_lo": lo,
                "auroc_hi": hi,
                "balanced_accuracy": g["balanced_accuracy"].mean(),
                "sensitivity": g["sensitivity"].mean(),
                "specificity": g["specificity"].mean(),
                "steps": g["steps"].mean(),
                "wall_s": g["wall_s"].mean(),
                **dict(
                    zip(
                        ("paired_delta", "paired_lo", "paired_hi"),
                        vs_real.get((split, frac, arm), NAN3),
                        strict=True,
                    )
                ),
                **dict(
                    zip(
                        ("vs_dup_delta", "vs_dup_lo", "vs_dup_hi"),
                        vs_dup.get((split, frac, arm), NAN3),
                        strict=True,
                    )
                ),
                "generator_class_fidelity": float(fid.mean()) if fid.size else float("nan"),
                "generator_class_fidelity_min": float(fid.min()) if fid.size else float("nan"),
            }
        )
    return pd.DataFrame(out)


def _ci(m: float, lo: float, hi: float, signed: bool = True) -> str:
    if not np.isfinite(m):
        return "—"
    f = "{:+.4f}" if signed else "{:.4f}"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f.format(m)
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def to_markdown(table: pd.DataFrame) -> str:
    """The table of one test split (rows of :func:`summarise` with one ``split``)."""
    head = (
        "| fraction | arm | seeds | optimiser steps | AUROC (t-interval over seeds) "
        "| ΔAUROC vs real (paired 95 % CI) | ΔAUROC vs real_dup (paired 95 % CI) | bal. acc | sens | spec "
        "| generator class fidelity (mean, min) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in table.itertuples():
        fid = (
            "—"
            if not np.isfinite(r.generator_class_fidelity)
            else f"{r.generator_class_fidelity:.3f}, {r.generator_class_fidelity_min:.3f}"
        )
        steps = "—" if not np.isfinite(r.steps) else f"{r.steps:,.0f}"
        lines.append(
            f"| {r.fraction:g} | {r.arm} | {r.n_seeds} | {steps} | {_ci(r.auroc, r.auroc_lo, r.auroc_hi, False)} "
            f"| {'—' if r.arm == 'real' else _ci(r.paired_delta, r.paired_lo, r.paired_hi)} "
            f"| {'—' if r.arm == 'real_dup' else _ci(r.vs_dup_delta, r.vs_dup_lo, r.vs_dup_hi)} "
            f"| {r.balanced_accuracy:.4f} | {r.sensitivity:.4f} | {r.specificity:.4f} | {fid} |"
        )
    return head + "\n".join(lines) + "\n"


def verdict(table: pd.DataFrame) -> list[str]:
    """A plain sentence per fraction: the arm a user should choose, and by how much it wins or loses
    against real-only and against the count-matched real_dup control (paired 95 % intervals)."""
    out = []
    for frac, g in table.groupby("fraction", sort=True):
        g = g.set_index("arm")
        best = g["auroc"].idxmax()
        # the arms that add synthetic images to the real ones (synthetic images alone, CAS, do not)
        syn = [a for a in g.index if a in ARM_REGISTRY and ARM_REGISTRY[a].augments]
        helps = [
            a
            for a in syn
            if np.isfinite(g.loc[a, "paired_lo"])
            and g.loc[a, "paired_lo"] > 0
            and (not np.isfinite(g.loc[a, "vs_dup_lo"]) or g.loc[a, "vs_dup_lo"] > 0)
        ]
        line = f"**{frac:g} of the real data**: highest mean AUROC: `{best}` ({g.loc[best, 'auroc']:.3f}"
        if best != "real" and np.isfinite(g.loc[best, "paired_delta"]):
            line += f", {_ci(g.loc[best, 'paired_delta'], g.loc[best, 'paired_lo'], g.loc[best, 'paired_hi'])} vs real"
        line += "). "
        if helps:
            against = "real-only and the count-matched control" if "real_dup" in g.index else "real-only"
            line += f"Synthetic augmentation beats {against}: " + ", ".join(
                f"`{a}` {_ci(g.loc[a, 'paired_delta'], g.loc[a, 'paired_lo'], g.loc[a, 'paired_hi'])} vs real, "
                f"{_ci(g.loc[a, 'vs_dup_delta'], g.loc[a, 'vs_dup_lo'], g.loc[a, 'vs_dup_hi'])} vs real_dup"
                for a in helps
            )
            line += "."
        elif syn:
            a = max(
                syn, key=lambda x: g.loc[x, "paired_delta"] if np.isfinite(g.loc[x, "paired_delta"]) else -9
            )
            line += (
                f"No synthetic arm beats {'both real-only and real_dup' if 'real_dup' in g.index else 'real-only'}; "
                f"the best, `{a}`, is "
                f"{_ci(g.loc[a, 'paired_delta'], g.loc[a, 'paired_lo'], g.loc[a, 'paired_hi'])} vs real and "
                f"{_ci(g.loc[a, 'vs_dup_delta'], g.loc[a, 'vs_dup_lo'], g.loc[a, 'vs_dup_hi'])} vs real_dup."
            )
        out.append(line)
    return out


def generator_table(generators: dict[str, dict[str, Any]]) -> str:
    head = (
        "| generator | fraction | seed | optimiser steps | wall time | gate checks | kept epoch | gate FD "
        "| gate class fidelity | class fidelity (judge: real child) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, g in sorted(generators.items()):
        best = (g.get("gate") or {}).get("best") or {}
        # judged once per seed (at fraction 1 one generator serves every seed): their mean
        per_seed = [v.get("auroc") for v in (g.get("class_fidelity") or {}).values() if isinstance(v, dict)]
        fid = (
            float(np.mean([v for v in per_seed if v is not None]))
            if any(v is not None for v in per_seed)
            else float("nan")
        )
        lines.append(
            f"| {name} | {g.get('fraction', float('nan')):g} | {g.get('seed', '')} | {g.get('steps', 0):,} "
            f"| {g.get('wall_s', 0) / 60:.1f} min | {len((g.get('gate') or {}).get('checks') or [])} "
            f"| {best.get('epoch') or 'last'} | {_num(best.get('fd'))} | {_num(best.get('class_fidelity'))} "
            f"| {_num(fid)} |"
        )
    return head + "\n".join(lines) + "\n"


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    """A number for a table cell; "—" for a missing or non-finite one."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "—"
    return fmt.format(v) if np.isfinite(v) else "—"


def cost_table(children: dict[str, dict[str, Any]], generators: dict[str, dict[str, Any]]) -> str:
    """Measured CPU time per fraction: children, generators, hours."""
    rows: dict[float, dict[str, float]] = {}
    for rec in children.values():
        r = rows.setdefault(
            float(rec["fraction"]), {"children": 0, "child_s": 0.0, "generators": 0, "gen_s": 0.0}
        )
        r["children"] += 1
        r["child_s"] += float(rec.get("wall_s", 0.0))
    for g in generators.values():
        r = rows.setdefault(
            float(g["fraction"]), {"children": 0, "child_s": 0.0, "generators": 0, "gen_s": 0.0}
        )
        r["generators"] += 1
        r["gen_s"] += float(g.get("wall_s", 0.0))
    head = "| fraction | children | mean child | generators | mean generator | hours |\n|---|---|---|---|---|---|\n"
    lines, total = [], 0.0
    for f, r in sorted(rows.items()):
        hours = (r["child_s"] + r["gen_s"]) / 3600
        total += hours
        mc = r["child_s"] / r["children"] if r["children"] else float("nan")
        mg = r["gen_s"] / r["generators"] if r["generators"] else float("nan")
        lines.append(
            f"| {f:g} | {r['children']} | {_num(mc)} s | {r['generators']} | {_num(mg)} s | {hours:.2f} |"
        )
    lines.append(
        f"| all | {sum(r['children'] for r in rows.values())} | | "
        f"{sum(r['generators'] for r in rows.values())} | | {total:.2f} |"
    )
    return head + "\n".join(lines) + "\n"


def ablation_rows(variants: dict[str, tuple[dict, dict]], split: str) -> pd.DataFrame:
    """Per (variant, seed): the generator's quality (gate FD, class fidelity, precision, recall,
    coverage, FD against the validation split) and its downstream value on ``split``: CAS (the
    synthetic_only child's AUROC) and the synthetic child's AUROC minus the real child's.
    ``variants``: name -> (children records, generator records)."""
    rows = []
    for name, (children, generators) in variants.items():
        for _, g in sorted(generators.items()):
            seed = int(g["seed"])
            q = (g.get("class_fidelity") or {}).get(str(seed)) or {}
            temp = q.get("temperature", 1.0)
            auc = {}
            for arm in ("real", "synthetic", "synthetic_only"):
                rec = children.get(f"{arm}-f{float(g['fraction']):g}-s{seed}")
                pre = "test" if rec is None or split == rec.get("test_split", "test") else split
                auc[arm] = float((rec or {}).get("metrics", {}).get(f"{pre}/auroc") or float("nan"))
            best = (g.get("gate") or {}).get("best") or {}
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "temperature": temp,
                    "steps": g.get("steps"),
                    "gate_fd": best.get("fd"),
                    "class_fidelity": q.get("auroc"),
                    "fd_val": q.get("fd"),
                    "precision": q.get("precision"),
                    "recall": q.get("recall"),
                    "coverage": q.get("coverage"),
                    "cas": auc["synthetic_only"],
                    "delta_synthetic": auc["synthetic"] - auc["real"],
                }
            )
    return pd.DataFrame(rows)


def ablation_markdown(rows: pd.DataFrame) -> str:
    cols = [
        "gate_fd",
        "class_fidelity",
        "fd_val",
        "precision",
        "recall",
        "coverage",
        "cas",
        "delta_synthetic",
    ]
    head = (
        "| variant | seed | temperature | steps | gate FD | class fidelity | FD (val) | precision | recall "
        "| coverage | CAS | ΔAUROC synthetic − real |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows.itertuples():
        vals = " | ".join(
            _num(getattr(r, c)) if c != "delta_synthetic" else _signed(r.delta_synthetic) for c in cols
        )
        lines.append(f"| {r.variant} | {r.seed} | {r.temperature:g} | {r.steps} | {vals} |")
    means = rows.groupby("variant", sort=False)[cols].mean()
    for name, m in means.iterrows():
        vals = " | ".join(_num(m[c]) if c != "delta_synthetic" else _signed(m[c]) for c in cols)
        lines.append(f"| **{name}** | mean | | | {vals} |")
    return head + "\n".join(lines) + "\n"


def _signed(v: Any) -> str:
    return _num(v, "{:+.4f}")

"""``python -m pipeline.run compare [EXPERIMENT] [FILTER]``: a table of runs from ``mlflow.search_runs``.

Classifier runs (the augmentation study) are grouped by arm and fraction and aggregated over
seeds: mean test metrics with 95 % t-intervals over seeds. Other runs (VAE-GAN training) are
listed one per row with their final validation metrics. A plot of the chosen metric is written.
A missing experiment exits non-zero with a clear message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class CompareConfig:
    experiment: str = "cxr-vaegan-gain"
    filter: str = ""  # an MLflow filter string, e.g. "tags.arm = 'real'"
    metric: str = "test/auroc"
    uri: str = ""  # tracking URI; empty: MLFLOW_TRACKING_URI, else the embedded store
    out: str = "outputs/compare"


def aggregate(runs: pd.DataFrame, metric: str = "test/auroc") -> pd.DataFrame:
    """Seed-aggregated table of classifier runs: one row per (arm, fraction)."""
    from pipeline.metrics import mean_ci

    rows = []
    names = ["auroc", "balanced_accuracy", "sensitivity", "specificity"]
    for (arm, frac), g in runs.groupby(["tags.arm", "tags.fraction"], sort=True):
        row: dict = {"arm": arm, "fraction": float(frac), "n_seeds": int(g["tags.seed"].nunique())}
        for n in names:
            col = f"metrics.test/{n}"
            if col in g:
                m, lo, hi = mean_ci(g[col].to_numpy(dtype=float))
                row[n], row[f"{n}_lo"], row[f"{n}_hi"] = m, lo, hi
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["fraction", "arm"]).reset_index(drop=True)


def _fmt(r: pd.Series, n: str) -> str:
    if n not in r or not np.isfinite(r[n]):
        return "—"
    lo, hi = r.get(f"{n}_lo", np.nan), r.get(f"{n}_hi", np.nan)
    return f"{r[n]:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) else "")


def compare(cfg: CompareConfig) -> int:
    import mlflow

    from pipeline.tracking import TrackingConfig, fail_fast_http, resolve_uri

    uri = resolve_uri(TrackingConfig(uri=cfg.uri))
    if uri.startswith(("http://", "https://")):
        fail_fast_http()  # a dead server: a clear error in seconds, not minutes of retries
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.experiment)
    except Exception as e:  # noqa: BLE001 - unreachable or refusing: say so, no traceback
        print(
            f"error: the tracking server {uri} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "compare reads finished runs from it, so it needs the server up",
            file=sys.stderr,
        )
        return 2
    if exp is None:
        known = [e.name for e in mlflow.search_experiments()]
        print(
            f"error: experiment '{cfg.experiment}' does not exist in {uri} (known: {', '.join(known) or 'none'})",
            file=sys.stderr,
        )
        return 2
    try:
        runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=cfg.filter)
    except Exception as e:
        print(f"error: filter {cfg.filter!r} rejected by MLflow: {e}", file=sys.stderr)
        return 2
    if runs.empty:
        print(f"error: no runs in '{cfg.experiment}' match filter {cfg.filter!r}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    is_cls = "tags.stage" in runs and "tags.arm" in runs and (runs["tags.stage"] == "classify").any()
    if is_cls:
        table = aggregate(runs[runs["tags.stage"] == "classify"], cfg.metric)
        names = ["auroc", "balanced_accuracy", "sensitivity", "specificity"]
        lines = [f"{'arm':22s} {'fraction':>8s} {'seeds':>5s}  " + "  ".join(f"{n:>26s}" for n in names)]
        for _, r in table.iterrows():
            lines.append(
                f"{r['arm']:22s} {r['fraction']:8g} {r['n_seeds']:5d}  "
                + "  ".join(f"{_fmt(r, n):>26s}" for n in names)
            )
        print("\n".join(lines))
        table.to_csv(out / f"{cfg.experiment}.csv", index=False)
        _plot_arms(table, cfg.metric.split("/")[-1], out / f"{cfg.experiment}.png", cfg.experiment)
    else:
        cols = [c for c in runs.columns if c.startswith("metrics.val/") or c.startswith("metrics.test/")]
        keep = ["run_id", "tags.mlflow.runName", "status", *sorted(cols)]
        keep = [c for c in keep if c in runs]
        table = runs[keep].rename(columns=lambda c: c.replace("metrics.", "").replace("tags.mlflow.", ""))
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(index=False))
        table.to_csv(out / f"{cfg.experiment}.csv", index=False)
        metric = cfg.metric if f"metrics.{cfg.metric}" in runs else "val/ssim"
        if f"metrics.{metric}" in runs:
            _plot_runs(runs, metric, out / f"{cfg.experiment}.png", cfg.experiment)
    print(f"table: {out / (cfg.experiment + '.csv')}\nplot: {out / (cfg.experiment + '.png')}")
    return 0


def _plot_arms(table: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    from pipeline.viz import plot_arm_bars

    lo = np.nanmin(table[f"{metric}_lo"].to_numpy(float)) if f"{metric}_lo" in table else 0.5
    bottom = max(0.0, (lo if np.isfinite(lo) else 0.5) - 0.05)
    plot_arm_bars(
        table,
        metric,
        f"{metric}_lo",
        f"{metric}_hi",
        path,
        f"test {metric} (mean over seeds, 95% CI)",
        title,
        ylim=(bottom, 1.0),
    )


def _plot_runs(runs: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    from pipeline.viz import pyplot, save_figure

    plt = pyplot()

    names = runs.get("tags.mlflow.runName", runs["run_id"]).astype(str).to_list()
    vals = runs[f"metrics.{metric}"].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3.6))
    ax.bar(np.arange(len(names)), vals)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)

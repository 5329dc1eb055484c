"""``python -m pipeline.run compare [EXPERIMENT] [FILTER]``: a table of runs from ``mlflow.search_runs``.

Classifier runs (the augmentation study) are grouped by their configuration without the seed:
two runs are pooled only when every logged param other than ``seed`` is the same, apart from the
settings that cannot change a result (``tracking.*``, ``out_dir``, ``device``, ``threads``, data
caching and loader workers) and the counts derived from the config and the seed's subset
(``n_train_real``, ``n_train_total``, ``optimizer_steps``, ``steps_per_epoch``). A path that names the run's own seed (``..._s3.csv``,
``vaegan-f0.1-s3/``: the gain stage's per-seed subsets and generators) counts as the same path for
every seed. Each group is one row with the params that set it apart from the other groups.

Per group: the mean of each test metric over seeds (runs repeating a seed are averaged first)
with a 95 % t-interval over seeds, clipped to [0, 1] since every reported metric (AUROC, balanced
accuracy, sensitivity, specificity) lies there. A group with one seed has no interval (printed as
the value alone; empty cells in the CSV). Other runs (VAE-GAN training) are listed one per row
with their final validation metrics. A plot of the chosen metric is written. A missing experiment
exits non-zero with a clear message.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.infra.config import renamed_keys, tagged_keys
from pipeline.infra.metrics import clipped_mean_ci
from pipeline.infra.stage_configs import EXECUTION, ClassifyConfig
from pipeline.infra.study_configs import CompareConfig
from pipeline.infra.tracking import fail_fast_http, resolve_uri
from pipeline.infra.viz import pyplot, save_figure
from transforms.manifest import is_inside, write_csv

# metrics aggregated per group; all lie in [0, 1]
METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity")
# a classifier run's params that do not define its configuration: the seed itself, where and how
# it was executed and logged, and counts derived from the config and the seed's subset draw
NOT_CONFIG = tagged_keys(ClassifyConfig, EXECUTION) | {
    "seed",
    "device",
    "data.num_workers",
    "n_train_real",
    "n_train_total",
    "optimizer_steps",
    "steps_per_epoch",
}
UNSET = "<unset>"
MAX_STEM = 120  # characters of an output file's name taken from the experiment's name


def file_stem(experiment: str) -> str:
    """The experiment's name as a file name inside ``out``: every run of characters other than
    letters, digits, ``.``, ``-`` and ``_`` (path separators included) becomes ``_``, leading and
    trailing dots and underscores go (no ``..``, no hidden file), and it is cut to
    :data:`MAX_STEM` characters. MLflow allows any name (``/Users/me/study``, ``../``), and an
    unsanitised one would make compare write outside its ``out`` folder."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._")[:MAX_STEM].strip("._")
    return stem or "experiment"


def config_params(columns) -> list[str]:
    """The ``params.*`` columns that define a configuration (see the module docstring)."""
    keys = []
    for c in columns:
        if not c.startswith("params."):
            continue
        k = c[len("params.") :]
        if k in NOT_CONFIG:
            continue
        keys.append(k)
    return sorted(keys)


def _seed_of(run: pd.Series) -> str:
    for c in ("params.seed", "tags.seed"):
        v = run.get(c)
        if isinstance(v, str) and v != "":
            return v
    return f"run:{run['run_id']}"  # no recorded seed: each run counts as its own repeat


def _normalise(value, seed: str) -> str:
    """A param value as a grouping key: missing -> UNSET; the run's own seed inside a path
    component (``f0.1_s3.csv``, ``vaegan-f0.1-s3/``) -> ``s{seed}``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return UNSET
    v = str(value)
    if seed.isdigit():
        v = re.sub(rf"(?<=[_\-])s{seed}(?=[._\-/\\]|$)", "s{seed}", v)
    return v


def _first(g: pd.DataFrame, col: str, default: str) -> str:
    vals = g[col].dropna() if col in g else ()
    return str(vals.iloc[0]) if len(vals) else default


def _old_spelling(runs: pd.DataFrame) -> pd.DataFrame:
    """Classifier runs' params as spelled before the renames of 2026-12-06 (``params.optim.lr`` ->
    ``params.lr``, ``speed.channels_last`` ``on`` -> ``channels_last`` ``True``, ...), so runs
    logged before and after them group together."""
    out = runs.copy()
    for new, (old, ren) in renamed_keys(ClassifyConfig).items():
        n, o = f"params.{new}", f"params.{old}"
        if n not in out:
            continue
        vals = out[n].map(lambda v, ren=ren: v if pd.isna(v) else str(ren.backward(v)))
        out[o] = out[o].where(out[o].notna(), vals) if o in out else vals
        out = out.drop(columns=[n])
    return out


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed-aggregated table of classifier runs: one row per configuration (all params but the
    seed and the non-config ones). Columns: arm, fraction, n_seeds, n_runs, config (the params
    that distinguish the group, ``k=v`` joined by spaces), ``params.K`` for each such param, and
    per metric its mean and ``_lo``/``_hi`` bounds (NaN for a single seed)."""
    runs = _old_spelling(runs.reset_index(drop=True))
    keys = config_params(runs.columns)
    seeds = runs.apply(_seed_of, axis=1) if len(runs) else pd.Series([], dtype=object)
    norm = pd.DataFrame(
        {k: [_normalise(v, s) for v, s in zip(runs[f"params.{k}"], seeds, strict=True)] for k in keys},
        index=runs.index,
    )
    # the params that differ between groups: shown on each row
    varying = [k for k in keys if norm[k].nunique(dropna=False) > 1]
    group_key = norm.apply(lambda r: tuple(r), axis=1) if keys else pd.Series([()] * len(runs))
    rows = []
    for key in dict.fromkeys(group_key):
        idx = group_key.index[group_key == key]
        g = runs.loc[idx]
        gseeds = seeds.loc[idx]
        params = dict(zip(keys, key, strict=True))
        arm = _first(g, "tags.arm", params.get("arm", UNSET))
        # the gain stage tags the fraction (its children's own param is 1.0: they get a subset manifest)
        frac = _first(g, "tags.fraction", params.get("fraction", "1"))
        try:
            frac_f = float(frac)
        except ValueError:
            frac_f = float("nan")
        row: dict = {
            "arm": str(arm),
            "fraction": frac_f,
            "n_seeds": int(gseeds.nunique()),
            "n_runs": len(g),
            # arm and fraction have their own columns
            "config": " ".join(f"{k}={params[k]}" for k in varying if k not in ("arm", "fraction")) or "-",
        }
        row.update({f"params.{k}": params[k] for k in varying})
        for n in METRICS:
            col = f"metrics.test/{n}"
            if col not in g:
                continue
            vals = pd.to_numeric(g[col], errors="coerce").astype(float)
            # runs repeating a seed are not independent repeats: average them first
            per_seed = vals.groupby(gseeds.to_numpy(), sort=True).mean().to_numpy(dtype=float)
            m, lo, hi = clipped_mean_ci(per_seed)
            row[n], row[f"{n}_lo"], row[f"{n}_hi"] = m, lo, hi
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["fraction", "arm", "config"], kind="stable").reset_index(drop=True)


def _fmt(r: pd.Series, n: str) -> str:
    v = r.get(n, np.nan)
    if not isinstance(v, (int, float)) or not np.isfinite(v):
        return "—"
    lo, hi = r.get(f"{n}_lo", np.nan), r.get(f"{n}_hi", np.nan)
    return f"{v:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


class _Refused(Exception):
    """Why compare shows nothing: printed as ``error: ...``, exit status 2."""


def compare(cfg: CompareConfig) -> int:
    try:
        runs = _find_runs(cfg)
        csv_path, png_path = _output_paths(cfg)
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "tags.stage" in runs and "tags.arm" in runs and (runs["tags.stage"] == "classify").any():
        _show_arms(runs[runs["tags.stage"] == "classify"], cfg, csv_path, png_path)
    else:
        _show_runs(runs, cfg, csv_path, png_path)
    print(f"table: {csv_path}\nplot: {png_path}")
    return 0


def _find_runs(cfg: CompareConfig) -> pd.DataFrame:
    """The runs of ``cfg.tracking.experiment`` that match ``cfg.filter``; :class:`_Refused` says why none."""
    import mlflow

    uri = resolve_uri(cfg.tracking)
    if uri.startswith(("http://", "https://")):
        fail_fast_http()  # a dead server: a clear error in seconds, not minutes of retries
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    except Exception as e:  # noqa: BLE001 - unreachable or refusing: say so, no traceback
        raise _Refused(
            f"the tracking server {uri} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "compare reads finished runs from it, so it needs the server up"
        ) from e
    if exp is None:
        known = [e.name for e in mlflow.search_experiments()]
        raise _Refused(
            f"experiment '{cfg.tracking.experiment}' does not exist in {uri} (known: {', '.join(known) or 'none'})"
        )
    try:
        runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=cfg.filter)
    except Exception as e:
        raise _Refused(f"filter {cfg.filter!r} rejected by MLflow: {e}") from e
    if runs.empty:
        raise _Refused(f"no runs in '{cfg.tracking.experiment}' match filter {cfg.filter!r}")
    return runs


def _output_paths(cfg: CompareConfig) -> tuple[Path, Path]:
    """The table's and the plot's file, in ``cfg.out`` (made here) and named after the experiment."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(cfg.tracking.experiment)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    if not (is_inside(csv_path, out) and is_inside(png_path, out)):  # file_stem keeps them in: a last guard
        raise _Refused(f"experiment name {cfg.tracking.experiment!r} gives no file name inside {out}")
    return csv_path, png_path


def _show_arms(runs: pd.DataFrame, cfg: CompareConfig, csv_path: Path, png_path: Path) -> None:
    """Classifier runs: one row per arm, fraction and configuration, averaged over seeds."""
    table = aggregate(runs)
    names = [n for n in METRICS if n in table]
    lines = [
        f"{'arm':22s} {'fraction':>8s} {'seeds':>5s} {'runs':>4s}  "
        + "  ".join(f"{n:>26s}" for n in names)
        + "  config (params that differ between rows)"
    ]
    for _, r in table.iterrows():
        lines.append(
            f"{r['arm']:22s} {r['fraction']:8g} {r['n_seeds']:5d} {r['n_runs']:4d}  "
            + "  ".join(f"{_fmt(r, n):>26s}" for n in names)
            + f"  {r['config']}"
        )
    lines.append("mean over seeds with a 95% t-interval over seeds, clipped to [0, 1]; one seed: no interval")
    print("\n".join(lines))
    write_csv(csv_path, table)  # formula-like cells (a param or name starting with =+-@) neutralised
    metric = cfg.metric.split("/")[-1]
    _plot_groups(table, metric if metric in table else "auroc", png_path, cfg.tracking.experiment)


def _show_runs(runs: pd.DataFrame, cfg: CompareConfig, csv_path: Path, png_path: Path) -> None:
    """Any other runs: one row per run with its validation and test metrics."""
    cols = [c for c in runs.columns if c.startswith("metrics.val/") or c.startswith("metrics.test/")]
    keep = ["run_id", "tags.mlflow.runName", "status", *sorted(cols)]
    keep = [c for c in keep if c in runs]
    table = runs[keep].rename(columns=lambda c: c.replace("metrics.", "").replace("tags.mlflow.", ""))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    write_csv(csv_path, table)  # a run named "=HYPERLINK(...)" is text in a spreadsheet
    metric = cfg.metric if f"metrics.{cfg.metric}" in runs else "val/ssim"
    if f"metrics.{metric}" in runs:
        _plot_runs(runs, metric, png_path, cfg.tracking.experiment)


def _plot_groups(table: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """One horizontal bar per group (configuration), with its interval where it has one."""

    plt = pyplot()
    labels = [
        f"{r['arm']} f={r['fraction']:g}"
        + (f" {r['config']}" if r["config"] != "-" else "")
        + f" (n={r['n_seeds']})"
        for _, r in table.iterrows()
    ]
    m = table[metric].to_numpy(dtype=float) if metric in table else np.full(len(table), np.nan)
    lo = table[f"{metric}_lo"].to_numpy(dtype=float) if f"{metric}_lo" in table else np.full(len(m), np.nan)
    hi = table[f"{metric}_hi"].to_numpy(dtype=float) if f"{metric}_hi" in table else np.full(len(m), np.nan)
    has = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(m)
    err = np.zeros((2, len(m)))
    err[0, has], err[1, has] = m[has] - lo[has], hi[has] - m[has]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.35 * len(m)))
    y = np.arange(len(m))
    ax.barh(y, np.nan_to_num(m), color="C0")
    if has.any():
        ax.errorbar(m[has], y[has], xerr=err[:, has], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    finite = np.concatenate([m[np.isfinite(m)], lo[has]])
    left = max(0.0, float(finite.min()) - 0.05) if finite.size else 0.0
    ax.set_xlim(left, 1.0)
    ax.set_xlabel(f"test {metric} (mean over seeds, 95% t-interval clipped to [0, 1])")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def _plot_runs(runs: pd.DataFrame, metric: str, path: Path, title: str) -> None:

    plt = pyplot()

    names = runs.get("tags.mlflow.runName", runs["run_id"]).astype(str).to_list()
    vals = runs[f"metrics.{metric}"].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3.6))
    ax.bar(np.arange(len(names)), vals)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)

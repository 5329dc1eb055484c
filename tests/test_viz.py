"""User-facing pictures: the evaluate report shows its figures, the gain plot is not clipped."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(\s*(<[^>]*>|[^)\s]+)\s*\)")


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)
    return path


def _report_inputs() -> tuple[dict, dict]:
    res = {"n_fake": 12.0, "n_real": 12.0, "n_train": 40.0}
    for k, v in {"fd": 3.2, "kid": 0.01, "precision": 0.7, "anomaly_auroc": 0.8}.items():
        res.update({k: v, f"{k}_lo": v * 0.9, f"{k}_hi": v * 1.1})
    meta = {
        "checkpoint": "/x/checkpoints/last.pt",
        "model_kind": "vaegan",
        "extractor": "/x/classifier.pt",
        "extractor_sha256": "ab" * 32,
        "extractor_arch": "densenet121",
        "extractor_arm": "real",
        "extractor_train_manifest": "/x/manifest.csv",
        "foreign_extractor": "",
        "reference": "/x/manifest.csv",
        "reference_split": "test",
    }
    return res, meta


def _image_links(md: str) -> dict[str, str]:
    """alt text -> link target (angle brackets and percent-escapes undone), every image link."""
    return {alt: unquote(t[1:-1] if t.startswith("<") else t) for alt, t in IMAGE_LINK.findall(md)}


def _check_report(report: Path, figs: dict[str, Path]) -> None:
    links = _image_links(report.read_text())
    for k in figs:
        assert k in links, f"figure {k} is not embedded as an image link:\n{report.read_text()}"
        target = links[k]
        assert not Path(target).is_absolute() and "/" not in target, (k, target)
        assert (report.parent / target).is_file(), f"{k}: {target} does not exist beside {report}"
    # MLflow: evaluate logs each figure and the report with tr.log_artifact(p, "report"), i.e. by
    # basename into one artifact folder; every link must resolve there as well
    art = report.parent.parent / "mlflow_artifacts" / "report"
    art.mkdir(parents=True)
    for p in [*figs.values(), report]:
        shutil.copy(p, art / Path(p).name)
    for k in figs:
        assert (art / links[k]).is_file(), f"{k}: {links[k]} does not resolve in the MLflow artifact folder"


def test_report_embeds_every_figure_as_a_relative_image_link(tmp_path):
    from pipeline.evaluate import _report

    run_dir = tmp_path / "run"
    names = ["samples", "nn_distances", "closest_pairs", "interpolation", "anomaly_roc"]
    figs = {k: _png(run_dir / f"{k}.png") for k in names}
    res, meta = _report_inputs()
    report = _report(res, meta, figs, run_dir)
    assert report.parent == run_dir
    _check_report(report, figs)
    # the figures follow the metric table, not inside it (a table row ends at the first blank line)
    md = report.read_text()
    assert md.index("| metric |") < md.index("![samples]")


def test_report_links_resolve_for_awkward_names_and_figures_made_elsewhere(tmp_path):
    """A file name with a space or parentheses is still one link; a figure written outside the run
    folder is placed beside the report (and ``figs`` updated, so evaluate logs that copy)."""
    from pipeline.evaluate import _report

    run_dir = tmp_path / "run"
    figs = {
        "samples": _png(run_dir / "samples.png"),
        "anomaly roc": _png(run_dir / "anomaly roc (rec).png"),
        "nn_distances": _png(tmp_path / "elsewhere" / "nn_distances.png"),
    }
    res, meta = _report_inputs()
    report = _report(res, meta, figs, run_dir)
    _check_report(report, figs)
    assert all(p.parent == run_dir for p in figs.values()), figs


# ------------------------------------------------------------------------------ gain plot
LONG_ARMS = [
    "real",
    "classical augmentation (flips, crops, contrast)",
    "synthetic VAE-GAN images, class-conditional",
    "classical+synthetic (both augmentations together)",
    "synthetic_only (no real images at all)",
]


def _gain_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for frac in (0.05, 0.1, 0.5, 1.0):
        for j, arm in enumerate(LONG_ARMS):
            d = 0.0 if arm == "real" else rng.normal(0.02 * j - 0.05, 0.04)
            half = 0.0 if arm == "real" else rng.uniform(0.05, 0.3)  # wide CIs, some past +-0.2
            rows.append(
                {
                    "fraction": frac,
                    "arm": arm,
                    "n_seeds": 3,
                    "auroc": 0.8 + d,
                    "auroc_lo": 0.7,
                    "auroc_hi": 0.9,
                    "paired_delta": d,
                    "paired_lo": d - half,
                    "paired_hi": d + half,
                }
            )
    rows[-1].update(
        paired_delta=float("nan"), paired_lo=float("nan"), paired_hi=float("nan")
    )  # one failed cell
    return pd.DataFrame(rows)


def _text_artists(fig):
    """Every text the figure draws: titles, axis labels, tick labels (of ticks within the view
    limits: matplotlib keeps, but does not draw, the others), legend entries and figure texts."""
    out = list(fig.texts)
    for leg in [*fig.legends, *(a.get_legend() for a in fig.axes)]:
        if leg is not None:
            out += [*leg.get_texts(), leg.get_title()]
    for ax in fig.axes:
        out += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        out += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        out += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def _inside(e, box, tol: float = 0.5) -> bool:
    return e.x0 >= box.x0 - tol and e.y0 >= box.y0 - tol and e.x1 <= box.x1 + tol and e.y1 <= box.y1 + tol


@pytest.mark.parametrize("shape", ["5 arms x 4 fractions", "2 arms x 1 fraction"])
@pytest.mark.parametrize("title", ["", "AUROC gain over real-only (3 seeds), a long title for a small plot"])
def test_gain_plot_keeps_every_label_legend_and_error_bar_inside_the_figure(tmp_path, title, shape):
    from matplotlib.collections import LineCollection

    from pipeline.infra.viz import gain_figure, plot_gain, pyplot

    table = _gain_table()
    if shape == "2 arms x 1 fraction":
        table = table[table["arm"].isin(LONG_ARMS[:2]) & (table["fraction"] == 1.0)].reset_index(drop=True)
    path = plot_gain(table, tmp_path / "gain.png", title=title)
    assert path == tmp_path / "gain.png" and path.stat().st_size > 0

    fig = gain_figure(table, title=title)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        texts = _text_artists(fig)
        assert {"fraction of the real training split", "AUROC - AUROC(real only)"} <= {
            t.get_text() for t in texts
        }
        legends = [leg for leg in [*fig.legends, *(a.get_legend() for a in fig.axes)] if leg is not None]
        legend = " ".join(t.get_text().replace("\n", " ") for leg in legends for t in leg.get_texts())
        assert all(arm in legend for arm in table["arm"].unique()), "every arm is in the legend"
        for t in texts:
            e = t.get_window_extent(renderer)
            assert _inside(e, box), f"{t.get_text()!r} at {e} is outside the figure {box}"
        ax = fig.axes[0]
        for leg in legends:
            e = leg.get_window_extent(renderer)
            assert _inside(e, box), f"legend at {e} is outside the figure {box}"
            # nor over the bars and their error bars
            assert not e.overlaps(ax.get_window_extent(renderer)), "the legend covers the plot"
        lo, hi = ax.get_ylim()
        ends = [
            y
            for c in ax.collections
            if isinstance(c, LineCollection)
            for seg in c.get_segments()
            for y in np.asarray(seg).reshape(-1, 2)[:, 1]
        ]
        assert ends, "no error bars drawn"
        finite = table["paired_lo"].notna()
        assert len(ends) >= 2 * int((finite & (table["arm"] != "real")).sum())
        assert all(lo <= y <= hi for y in ends if np.isfinite(y)), (lo, hi, min(ends), max(ends))
        # the bars' CIs themselves (not only what was drawn) lie within the limits
        assert lo <= table["paired_lo"].min() and table["paired_hi"].max() <= hi
    finally:
        pyplot().close(fig)


def test_gain_figure_grows_with_arms_and_fractions():
    from pipeline.infra.viz import gain_figure, pyplot

    big = gain_figure(_gain_table())
    small_table = _gain_table()
    small_table = small_table[small_table["arm"].isin(LONG_ARMS[:2]) & (small_table["fraction"] == 1.0)]
    small = gain_figure(small_table)
    try:
        assert big.get_figwidth() > small.get_figwidth()
    finally:
        pyplot().close(big)
        pyplot().close(small)


def test_arm_bars_widen_a_given_ylim_to_hold_every_ci():
    """A caller's ``ylim`` narrower than the data would cut error bars off: it is widened."""
    from pipeline.infra.viz import arm_bars_figure, pyplot

    table = _gain_table()
    fig = arm_bars_figure(table, ("paired_delta", "paired_lo", "paired_hi"), "gain", ylim=(-0.05, 0.05))
    try:
        lo, hi = fig.axes[0].get_ylim()
        assert lo <= min(-0.05, table["paired_lo"].min()) and hi >= max(0.05, table["paired_hi"].max())
    finally:
        pyplot().close(fig)

"""Pictures people would rather see than read: image grids and loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """``[N, 1, H, W]`` in ``[-1, 1]`` -> uint8 ``(rows*H, nrow*W)`` mosaic with white gutters."""
    imgs = images.detach().float().cpu().clamp(-1, 1)
    n, _, h, w = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=np.uint8)
    arr = ((imgs[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            arr[i]
        )
    return grid


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    upscale: int = 1,
    col_labels: list[str] | None = None,
) -> Path:
    """Save a mosaic; ``col_labels`` (one per column) are written in a header band above it."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    if col_labels:
        band = 14
        out = Image.new("L", (im.width, im.height + band), 255)
        out.paste(im, (0, band))
        draw = ImageDraw.Draw(out)
        col_w = im.width / min(nrow, len(images))
        for c, text in enumerate(col_labels[: min(nrow, len(images))]):
            draw.text((c * col_w + 3, 1), text[: max(1, int(col_w // 6))], fill=0)
        im = out
    im.save(path)
    return path


def pairs(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Interleave so that each real image is followed by its reconstruction."""
    return torch.stack([real, recon], dim=1).flatten(0, 1)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save and close ``fig``, cropped to everything drawn (``bbox_inches="tight"``), so a label,
    legend or title that reaches past the figure's edge is kept, not cut off."""
    if fig.get_layout_engine() is None:  # a figure with its own (constrained) layout keeps it
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    pyplot().close(fig)
    return path


def plot_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric, step on x."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k, v in history.items() if v]
    ncol = min(3, max(1, len(keys)))
    nrow = (len(keys) + ncol - 1) // ncol or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        steps, vals = zip(*sorted(history[k]), strict=True)
        ax.plot(steps, vals, lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=90)


def plot_roc(curves: dict[str, tuple], path: str | Path, title: str = "") -> Path:
    """ROC curves: ``{name: (labels, scores)}``, the AUROC in each legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (a character
    is taken as 0.6 em wide, generous for DejaVu Sans)."""
    import textwrap

    chars = max(8, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_long_words=True)) if len(text) > chars else text


def data_ylim(values, pad: float = 0.08, include: tuple[float, ...] = ()) -> tuple[float, float]:
    """Axis limits that hold every finite value (bars and both ends of their CIs) and ``include``,
    with ``pad`` of the span added on each side."""
    v = np.asarray([*np.ravel(np.asarray(values, dtype=float)), *include], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def _legend_layout(arms: list, width: float, fontsize: float) -> tuple[list[str], int, int]:
    """The arms' legend labels (wrapped to the figure's ``width``), its columns and its rows."""
    labels = [_wrap(str(a), width - 0.6, fontsize) for a in arms]
    longest = max((max(len(line) for line in lab.split("\n")) for lab in labels), default=1)
    col_in = 0.6 + longest * 0.6 * fontsize / 72  # handle, gap and text of one legend column
    ncol = int(max(1, min(len(arms) or 1, (width - 0.4) // col_in)))
    rows = sum(max(lab.count("\n") + 1 for lab in labels[i : i + ncol]) for i in range(0, len(labels), ncol))
    return labels, ncol, rows


def arm_bars_figure(
    table,
    columns: tuple[str, str, str],
    ylabel: str,
    title: str = "",
    zero_line: bool = False,
    ylim: tuple[float, float] | None = None,
):
    """Per real-data fraction, one bar per arm (``table`` columns ``fraction``, ``arm``) with its
    CI: ``columns`` names the value and its low and high ends. Not saved: close it with
    ``pyplot().close(fig)``.

    Its width grows with fractions x arms, the legend sits below the axes in as many columns as
    fit, long titles and arm names are wrapped, and the y-axis holds every bar and both ends of
    every CI (``ylim`` is widened to them when it is narrower), so nothing falls outside.
    """
    plt = pyplot()
    value, lo, hi = columns
    fractions = sorted(table["fraction"].unique())
    arms = list(dict.fromkeys(table["arm"]))
    n_f, n_a = max(1, len(fractions)), max(1, len(arms))
    # about 0.32 in per bar and 0.6 in between fraction groups, within [5, 16] inches
    width = float(np.clip(1.2 + n_f * (0.32 * n_a + 0.6), 5.0, 16.0))
    label_fs, title_fs = 8, 10
    labels, ncol, legend_rows = _legend_layout(arms, width, label_fs)
    height = 3.4 + 0.2 * legend_rows + (0.25 if title else 0.0)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    bar_w = 0.8 / n_a
    ends = []
    for j, (arm, label) in enumerate(zip(arms, labels, strict=True)):
        sub = table[table["arm"] == arm].set_index("fraction").reindex(fractions)
        x = np.arange(len(fractions)) + (j - (n_a - 1) / 2) * bar_w
        m = sub[value].to_numpy(dtype=float)
        lo_v, hi_v = sub[lo].to_numpy(dtype=float), sub[hi].to_numpy(dtype=float)
        # a missing end draws no whisker; an interval clipped past its mean draws a zero one
        err = np.clip(np.nan_to_num(np.stack([m - lo_v, hi_v - m])), 0.0, None)
        ax.bar(x, m, bar_w, label=label)
        ax.errorbar(x, m, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1)
        ends += [m, lo_v, hi_v]
    y0, y1 = data_ylim(ends, include=(0.0,) if zero_line else ())
    if ylim is not None:
        y0, y1 = min(y0, ylim[0]), max(y1, ylim[1])
    ax.set_ylim(y0, y1)
    if zero_line:
        ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(fractions)), [f"{f:g}" for f in fractions])
    ax.set_xlim(-0.6, len(fractions) - 0.4)
    ax.set_xlabel("fraction of the real training split")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", lw=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    if arms:
        fig.legend(loc="outside lower center", ncols=ncol, fontsize=label_fs, frameon=False)
    if title:
        ax.set_title(_wrap(title, width - 0.6, title_fs), fontsize=title_fs)
    return fig


GAIN_YLABEL = "AUROC - AUROC(real only)"


# the paired-bootstrap columns of pipeline.infra.study_report.summarise, per reference arm
GAIN_COLUMNS = {
    "real": ("paired_delta", "paired_lo", "paired_hi"),
    "real_dup": ("vs_dup_delta", "vs_dup_lo", "vs_dup_hi"),
}


def gain_figure(table, title: str = "", ref: str = "real"):
    """The figure of :func:`plot_gain`, not saved (close it with ``pyplot().close(fig)``)."""
    ylabel = GAIN_YLABEL if ref == "real" else f"AUROC - AUROC({ref})"
    return arm_bars_figure(table, GAIN_COLUMNS[ref], ylabel, title, zero_line=True)


def plot_gain(table, path: str | Path, title: str = "", ref: str = "real") -> Path:
    """Per real-data fraction, each arm's AUROC difference to ``ref`` (real or real_dup) with the
    95 % interval the verdict uses: paired on the same test images, combined over seeds by a
    two-level bootstrap (``table``: :func:`pipeline.infra.study_report.summarise`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(gain_figure(table, title, ref), path)

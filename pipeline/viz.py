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
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
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


def plot_arm_bars(
    table,
    value: str,
    lo: str,
    hi: str,
    path: str | Path,
    ylabel: str,
    title: str = "",
    zero_line: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Per real-data fraction, one bar per arm (``table`` columns ``fraction``, ``arm``) with its CI."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fractions = sorted(table["fraction"].unique())
    arms = list(dict.fromkeys(table["arm"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(fractions) * max(1, len(arms)) / 2, 3.6))
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        sub = table[table["arm"] == arm].set_index("fraction").reindex(fractions)
        x = np.arange(len(fractions)) + (j - (len(arms) - 1) / 2) * width
        m = sub[value].to_numpy(dtype=float)
        err = [
            np.nan_to_num(m - sub[lo].to_numpy(dtype=float)),
            np.nan_to_num(sub[hi].to_numpy(dtype=float) - m),
        ]
        ax.bar(x, m, width, label=arm)
        ax.errorbar(x, m, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1)
    if zero_line:
        ax.axhline(0, color="k", lw=0.8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xticks(np.arange(len(fractions)), [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of the real training split")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_gain(table, path: str | Path, title: str = "") -> Path:
    """Per real-data fraction, each arm's AUROC difference to real-only with its 95 % CI."""
    return plot_arm_bars(
        table, "delta_auroc", "delta_lo", "delta_hi", path, "AUROC - AUROC(real only)", title, zero_line=True
    )

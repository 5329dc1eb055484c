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


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, upscale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)
    return path


def pairs(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Interleave so that each real image is followed by its reconstruction."""
    return torch.stack([real, recon], dim=1).flatten(0, 1)


def plot_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric, step on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""What a VAE-GAN run shows of itself while it trains: the per-epoch grids of prior samples (one
class per column) and of validation images beside their reconstructions, from inputs fixed for the
whole run, and the loss curves drawn from the run's local metric record."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.infra.tracking import Tracker
from pipeline.infra.viz import pairs, plot_curves, save_grid


def grid_inputs(grid_size: int, latent_dim: int, num_classes: int, val_ds) -> dict[str, torch.Tensor]:
    """Fixed inputs for the grids: the same prior codes and validation images every epoch."""
    g = torch.Generator().manual_seed(1234)
    n_val = min(32, len(val_ds))
    return {
        "z": torch.randn(grid_size, latent_dim, generator=g),
        # one class per grid column (8 columns)
        "y": (torch.arange(grid_size) % 8) % max(num_classes, 1),
        "val": torch.stack([val_ds[i]["image"] for i in range(n_val)]),
        "val_y": torch.stack([torch.as_tensor(val_ds[i]["label"]) for i in range(n_val)]).clamp_min(0),
    }


def save_grids(
    model, run_dir: Path, epoch: int, fixed: dict[str, torch.Tensor], device, real=True, names=None
) -> tuple[Path, Path | None]:
    """The prior-sample grid (columns headed by their class; codes from the model's prior, fitted
    or N(0, I)), and (``real``) the validation
    images beside their reconstructions."""
    z, y, vx, vy = fixed["z"], fixed["y"], fixed["val"], fixed["val_y"]
    model.eval()
    with torch.no_grad():
        cond = y.to(device) if model.cfg.num_classes > 0 else None
        # the averaged networks when model.ema_decay > 0: what generate and evaluate will use
        samples = model.decode(model.prior(z.to(device), cond), cond, averaged=True).float().cpu()
        vcond = vy.to(device) if model.cfg.num_classes > 0 else None
        rec = model.reconstruct(vx.to(device), vcond, averaged=True).float().cpu()
    up = max(1, 256 // model.cfg.image_size)
    heads = [(names or {}).get(int(c), str(int(c))) for c in y[:8]] if model.cfg.num_classes > 0 else None
    gp = save_grid(
        samples,
        run_dir / "grids" / f"samples_epoch{epoch + 1:03d}.png",
        nrow=8,
        upscale=up // 2 or 1,
        col_labels=heads,
    )
    if not real:
        return gp, None
    rp = save_grid(
        pairs(vx, rec), run_dir / "grids" / f"recon_epoch{epoch + 1:03d}.png", nrow=8, upscale=up // 2 or 1
    )
    return gp, rp


def loss_curve(tracker: Tracker, run_dir: Path) -> Path | None:
    """Plot from the run's local metric record, so a resumed run's curve covers all of it."""
    history = {k: v for k, v in tracker.history().items() if k.startswith(("train/", "val/"))}
    history = {k: v for k, v in history.items() if all(math.isfinite(x) for _, x in v)}
    if not history:
        return None
    return plot_curves(history, run_dir / "loss_curves.png", title=run_dir.name)

"""The train-time random augmentation of ``transforms.presets`` for a whole batch, on its device.

MONAI's random transforms work one image at a time on the loader's CPU workers. On a GPU the
VAE-GAN step at 64 px takes ~30 us per image, less than those transforms cost on one CPU core, so
the loader became the bottleneck (benchmarks/bench_train.py: loader 1.1-1.3x the training rate on
an H100). :class:`BatchAugment` draws the same random parameters (same ranges and probabilities
as ``_random_augmentations``) for every image of a batch at once and applies them with one
``affine_grid``/``grid_sample`` and a few element-wise ops on the device.

Random numbers come from torch's global CPU generator, which the engine seeds per epoch and
checkpoints: a resumed run draws the same augmentation as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transforms.presets import TransformConfig


class BatchAugment:
    """``x [B, 1, H, W]`` in ``[-1, 1]`` -> augmented ``x`` (same shape, device and range).

    Each image independently, each with probability ``aug_prob``: an affine warp about the centre
    (rotation, per-axis scale, translation; bilinear, black outside), a gamma contrast change, an
    intensity scale; and, when ``hflip``, a left-right flip with probability 0.5.
    """

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def _u(self, b: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(b, *shape) * (hi - lo) + lo

    def _coin(self, b: int, p: float) -> torch.Tensor:
        return torch.rand(b) < p

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        p = cfg.aug_prob
        img = ((x.float() + 1) / 2).clamp(0, 1)  # [0, 1]: the warp pads with black, like the borders
        # -- affine: draw every parameter for every image, then keep identity where the coin says no
        use = self._coin(b, p)
        th = self._u(b, -math.radians(cfg.rotate_deg), math.radians(cfg.rotate_deg))
        sc = 1 + self._u(b, -cfg.scale, cfg.scale, 2)
        tr = self._u(b, -cfg.translate, cfg.translate, 2) * 2  # fraction of size -> normalised units
        th, sc, tr = th * use, torch.where(use[:, None], sc, torch.ones_like(sc)), tr * use[:, None]
        # affine_grid maps output to input coordinates: the inverse of "scale, rotate, shift"
        cos, sin = torch.cos(th), torch.sin(th)
        a = torch.stack(
            [
                torch.stack([cos / sc[:, 0], sin / sc[:, 0], -tr[:, 0]], 1),
                torch.stack([-sin / sc[:, 1], cos / sc[:, 1], -tr[:, 1]], 1),
            ],
            1,
        ).to(dev)
        grid = F.affine_grid(a, list(img.shape), align_corners=False)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # -- gamma contrast on the image's own range (MONAI RandAdjustContrast)
        use = self._coin(b, p).to(dev)
        gamma = self._u(b, 1 - cfg.contrast_gamma, 1 + cfg.contrast_gamma).to(dev)
        lo = img.amin(dim=(1, 2, 3), keepdim=True)
        rng = img.amax(dim=(1, 2, 3), keepdim=True) - lo
        adj = ((img - lo) / (rng + 1e-7)).clamp_min(0) ** gamma.view(-1, 1, 1, 1) * rng + lo
        img = torch.where(use.view(-1, 1, 1, 1), adj, img)
        # -- intensity scale (MONAI RandScaleIntensity: x * (1 + f))
        use = self._coin(b, p).to(dev)
        f = self._u(b, -cfg.intensity_scale, cfg.intensity_scale).to(dev)
        img = img * (1 + f * use).view(-1, 1, 1, 1)
        if cfg.hflip:
            flip = self._coin(b, 0.5).to(dev).view(-1, 1, 1, 1)
            img = torch.where(flip, img.flip(-1), img)
        return (img * 2 - 1).clamp(-1, 1).to(x.dtype).contiguous(memory_format=_format(x))


def _format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )

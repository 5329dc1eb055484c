"""Differentiable augmentation of everything the discriminator sees (DiffAugment; Zhao et al.,
NeurIPS 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

A discriminator trained on a few thousand images memorises them and stops giving the generator a
useful signal. DiffAugment augments the discriminator's real *and* generated inputs with the same
random, differentiable transforms, so the generator is trained through them and learns nothing
about the augmentation itself. For the VAE-GAN the three inputs (real images, their
reconstructions, prior samples) share one draw of the parameters per batch position: Larsen's
feature-wise reconstruction compares the discriminator's features of a real image and of its
reconstruction, which must be augmented alike.

Policies (comma-separated, for single-channel images in [-1, 1]):

* ``color``: brightness (+ U(-0.5, 0.5)) and contrast (x U(0.5, 1.5) about the image mean);
* ``translation``: shift by up to 1/8 of the size, zero padded;
* ``cutout``: one zeroed square of half the size at a random place.
"""

from __future__ import annotations

import torch


def draw_params(policy: tuple[str, ...], n: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One draw of every transform's parameters for a batch of ``n`` images of ``size`` pixels."""
    p: dict[str, torch.Tensor] = {}
    if "color" in policy:
        p["brightness"] = torch.rand(n, 1, 1, 1, device=device) - 0.5
        p["contrast"] = torch.rand(n, 1, 1, 1, device=device) + 0.5
    if "translation" in policy:
        s = max(1, size // 8)
        p["shift"] = torch.randint(-s, s + 1, (n, 2), device=device)
    if "cutout" in policy:
        p["cutout"] = torch.randint(0, size - size // 2 + 1, (n, 2), device=device)
    return p


def apply(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply one draw of parameters to ``x`` ``[N, C, H, W]`` (differentiable in ``x``)."""
    if "brightness" in params:
        x = x + params["brightness"].to(x.dtype)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * params["contrast"].to(x.dtype) + mean
    n, _, h, w = x.shape
    if "shift" in params:
        # gather from a zero-padded copy: out[i, :, r, c] = x[i, :, r - dy, c - dx] or 0
        s = int(params["shift"].abs().max().item()) if params["shift"].numel() else 0
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        rows = torch.arange(h, device=x.device)[None, :] - params["shift"][:, 0:1] + s  # [N, H]
        cols = torch.arange(w, device=x.device)[None, :] - params["shift"][:, 1:2] + s  # [N, W]
        idx_r = rows[:, None, :, None].expand(n, x.shape[1], h, padded.shape[3])
        x = padded.gather(2, idx_r)
        idx_c = cols[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, idx_c)
    if "cutout" in params:
        half_h, half_w = h // 2, w // 2
        r = torch.arange(h, device=x.device)[None, :, None]
        c = torch.arange(w, device=x.device)[None, None, :]
        r0 = params["cutout"][:, 0, None, None]
        c0 = params["cutout"][:, 1, None, None]
        hole = (r >= r0) & (r < r0 + half_h) & (c >= c0) & (c < c0 + half_w)  # [N, H, W]
        x = x * (~hole)[:, None].to(x.dtype)
    return x


def diff_augment(images: list[torch.Tensor], policy: tuple[str, ...]) -> list[torch.Tensor]:
    """The same random transforms, one draw per batch position, applied to each tensor of
    ``images`` (all ``[N, C, H, W]`` with the same N and size); ``()`` returns them unchanged."""
    if not policy:
        return images
    x0 = images[0]
    params = draw_params(policy, x0.shape[0], x0.shape[-1], x0.device)
    return [apply(x, params) for x in images]

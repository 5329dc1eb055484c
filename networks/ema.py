"""An exponential moving average of the encoder's and decoder's weights (Polyak averaging, as
GAN practice uses for the generator: Karras et al. 2018; Yazici et al., ICLR 2019, "The unusual
effectiveness of averaging in GAN training").

Adversarial training makes the weights oscillate around a good solution; their running average
sits nearer its centre and draws cleaner, steadier samples than the last step's weights. The
averaged copies never train: they follow the live networks after every optimiser step,
``w_ema <- decay * w_ema + (1 - decay) * w`` (batch-norm statistics copied), stay in eval mode, and
are what grids, validation, the fitted prior, checkpoints' exported generator and evaluation use.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Averaged copies of ``modules`` (name -> module), updated by :meth:`update`."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.nets = nn.ModuleDict({k: copy.deepcopy(m) for k, m in modules.items()})
        for p in self.nets.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> EMA:
        """Always eval mode: the averaged networks are only ever used for inference."""
        return super().train(False)

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        for name, live in modules.items():
            avg = self.nets[name]
            ps = list(avg.parameters())
            torch._foreach_lerp_(ps, [p.detach() for p in live.parameters()], 1.0 - self.decay)
            for b_avg, b_live in zip(avg.buffers(), live.buffers(), strict=True):
                b_avg.copy_(b_live)

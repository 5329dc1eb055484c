"""VAE-GAN losses as pure functions on tensors (Larsen et al. 2016).

All reduce to a scalar mean over the batch so that weights mean the same at any batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, per_pixel: int = 1) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dims, averaged over the batch, divided by ``per_pixel``.

    Dividing by the number of pixels puts the KL on the same per-element scale as the mean
    reconstruction terms, so ``kl_weight`` means the same at 64 and 256 px.
    """
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    return kl.mean() / per_pixel


def feature_reconstruction(fake_features: torch.Tensor, real_features: torch.Tensor) -> torch.Tensor:
    """Larsen's Dis_l likelihood: mean squared error between discriminator features.

    ``real_features`` are treated as the target (detached): the reconstruction loss must not train
    the discriminator.
    """
    return F.mse_loss(fake_features, real_features.detach())


def pixel_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, target)


def generator_adversarial(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(G(z)), i.e. BCE against 'real'."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_adversarial(real_logits: torch.Tensor, *fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE: real -> 1, each fake set (reconstructions, prior samples) -> 0; fakes averaged."""
    loss_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss_fake = sum(F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)) for f in fake_logits) / max(
        len(fake_logits), 1
    )
    return loss_real + loss_fake

from __future__ import annotations

import torch

from networks import losses as L


def test_kl_zero_at_prior_and_positive_elsewhere():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert float(L.kl_divergence(mu, logvar)) == 0.0
    kl = L.kl_divergence(torch.ones(4, 8), torch.zeros(4, 8))
    assert abs(float(kl) - 4.0) < 1e-6  # 0.5 * 8 * 1^2
    assert abs(float(L.kl_divergence(torch.ones(4, 8), torch.zeros(4, 8), per_pixel=4)) - 1.0) < 1e-6


def test_feature_reconstruction_treats_real_features_as_target():
    real = torch.randn(2, 3, requires_grad=True)
    fake = torch.randn(2, 3, requires_grad=True)
    L.feature_reconstruction(fake, real).backward()
    assert real.grad is None and fake.grad is not None
    assert float(L.feature_reconstruction(real, real)) == 0.0


def test_adversarial_losses():
    big = torch.full((4, 1), 20.0)
    assert float(L.generator_adversarial(big)) < 1e-6  # D fooled: no loss
    assert float(L.discriminator_adversarial(big, -big)) < 1e-6  # D perfect: no loss
    assert float(L.discriminator_adversarial(-big, big)) > 10
    assert abs(float(L.pixel_l1(torch.ones(2, 2), torch.zeros(2, 2))) - 1.0) < 1e-6

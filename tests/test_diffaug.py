"""DiffAugment (networks/diffaug.py): one draw applied alike to every discriminator input,
differentiable, each transform doing what it says; and its place in the VAE-GAN objective."""

from __future__ import annotations

import pytest
import torch

from networks.config import LossConfig, ModelConfig
from networks.config import diffaug_policy as parse_policy
from networks.diffaug import apply, diff_augment
from networks.objective import vaegan_losses
from networks.vaegan import VAEGAN


def test_one_draw_is_applied_alike_to_real_and_generated_images():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    a, b, c = diff_augment([x, x.clone(), x.clone()], parse_policy("color,translation,cutout"))
    # the same image in every input comes out the same: real and reconstruction stay comparable
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, x)  # and it was augmented


def test_augmentation_is_differentiable_in_the_images():
    x = (torch.rand(4, 1, 16, 16) * 2 - 1).requires_grad_()
    (y,) = diff_augment([x], parse_policy("color,translation,cutout"))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_and_zero_pads():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = apply(x, {"shift": torch.tensor([[1, -1]])})  # one row down, one column left
    assert torch.equal(y[0, 0, 1:, :3], x[0, 0, :3, 1:])
    assert y[0, 0, 0].abs().sum() == 0 and y[0, 0, :, 3].abs().sum() == 0


def test_cutout_zeroes_one_square_of_half_the_size():
    x = torch.ones(1, 1, 8, 8)
    y = apply(x, {"cutout": torch.tensor([[2, 3]])})
    assert y.sum() == 64 - 16 and y[0, 0, 2:6, 3:7].sum() == 0


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="loss.diffaug"):
        LossConfig(diffaug="blur")


def _tiny_model() -> VAEGAN:
    cfg = ModelConfig(
        image_size=32, latent_dim=8, base_channels=8, max_channels=16, disc_channels=8, num_classes=2
    )
    return VAEGAN(cfg)


def test_the_objective_augments_what_the_discriminator_sees_and_nothing_else():
    torch.manual_seed(0)
    model = _tiny_model()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    noise = (torch.randn(4, 8), torch.randn(4, 8))
    torch.manual_seed(1)
    plain = vaegan_losses(model, x, y, LossConfig(), noise=noise)
    torch.manual_seed(1)
    aug = vaegan_losses(model, x, y, LossConfig(diffaug="translation,cutout"), noise=noise)
    # the pixel and KL terms see the images as they are; the discriminator's terms do not
    assert torch.equal(plain["pixel_l1"], aug["pixel_l1"]) and torch.equal(plain["kl"], aug["kl"])
    assert not torch.equal(plain["adv_d"], aug["adv_d"])

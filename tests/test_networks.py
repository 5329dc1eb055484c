from __future__ import annotations

import copy

import pytest
import torch

from networks import VAEGAN, Decoder, Discriminator, Encoder, Generator, ModelConfig
from networks.config import LossConfig
from networks.objective import route_gradients, vaegan_losses
from networks.prior import LatentPrior


@pytest.mark.parametrize("size", [64, 128, 256])
def test_forward_backward_shapes(size):
    m = VAEGAN(ModelConfig(image_size=size, latent_dim=16, base_channels=8, max_channels=32, disc_channels=8))
    x = torch.randn(2, 1, size, size)
    recon, mu, logvar, z = m(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == z.shape == (2, 16)
    assert float(recon.abs().max()) <= 1.0  # tanh output, same range as the data
    logits, feats = m.discriminator(recon)
    assert logits.shape[:2] == (2, 1) and len(feats) == m.discriminator.num_features
    (recon.mean() + logits.mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_class_conditioning():
    m = VAEGAN(ModelConfig(image_size=32, latent_dim=8, base_channels=8, num_classes=2))
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    recon, *_ = m(x, y)
    assert recon.shape == x.shape
    m.eval()
    z = torch.randn(1, 8).repeat(2, 1)
    a = m.decoder(z, torch.tensor([0, 1]))
    assert not torch.allclose(a[0], a[1])  # the label changes the image
    with pytest.raises(ValueError, match="pass labels"):
        m.decoder(z)


def test_generator_sample_is_deterministic_in_its_seed_whatever_the_batch_size():
    g = Generator(Decoder(image_size=32, latent_dim=8, base_channels=8)).eval()
    a = g.sample(None, n=5, seed=0)
    b = g.sample(None, n=5, seed=0, batch_size=2)
    assert a.shape == (5, 1, 32, 32)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, g.sample(None, n=5, seed=1))
    with pytest.raises(ValueError, match="prior must be one of"):
        g.sample(None, n=2, prior="uniform")


def test_latent_prior_is_the_identity_until_fitted_then_draws_each_class_from_its_own_codes():
    prior = LatentPrior(latent_dim=3, num_classes=2)
    eps = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4000) % 2
    assert not prior.is_fitted and torch.equal(prior(eps, y), eps)  # N(0, I) before fitting
    # posterior means far from the origin, one cluster per class, class 1 stretched along axis 0
    mu = torch.randn(2000, 3, generator=torch.Generator().manual_seed(1)) * 0.5
    ymu = torch.arange(2000) % 2
    mu[ymu == 0] += torch.tensor([5.0, 0.0, 0.0])
    mu[ymu == 1] = mu[ymu == 1] * torch.tensor([4.0, 1.0, 1.0]) - torch.tensor([0.0, 5.0, 0.0])
    prior.fit(mu, ymu)
    z = prior(eps, y)
    for c in (0, 1):
        torch.testing.assert_close(z[y == c].mean(0), mu[ymu == c].mean(0), atol=0.15, rtol=0)
        torch.testing.assert_close(z[y == c].std(0), mu[ymu == c].std(0), atol=0.1, rtol=0.05)


def test_latent_prior_validation():
    with pytest.raises(ValueError, match="latent_dim"):
        LatentPrior(latent_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        LatentPrior(latent_dim=2, num_classes=-1)
    with pytest.raises(ValueError, match=r"mu must be \[N, 2\]"):
        LatentPrior(2).fit(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="shrinkage"):
        LatentPrior(2).fit(torch.randn(5, 2), shrinkage=1.5)
    with pytest.raises(ValueError, match="logvar must have mu's shape"):
        LatentPrior(2).fit(torch.randn(5, 2), logvar=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=">= 2 codes, got 1"):
        LatentPrior(2).fit(torch.randn(1, 2))


def test_a_class_without_training_codes_draws_from_all_codes_and_says_so():
    """A subset (data.max_train) may hold one class only: training must not fail at its epoch end."""
    mu = torch.randn(6, 2) + 3.0
    with pytest.warns(UserWarning, match=r"class\(es\) \[1\] have fewer than 2"):
        prior = LatentPrior(2, num_classes=2).fit(mu, torch.tensor([0, 0, 0, 0, 0, 1]))
    torch.testing.assert_close(prior.mean[1], mu.mean(0))


def test_fitted_prior_travels_with_the_exported_generator_and_a_v1_export_still_loads():
    m = VAEGAN(
        ModelConfig(image_size=32, latent_dim=8, base_channels=8, max_channels=16, num_classes=2)
    ).eval()
    x, y = torch.randn(12, 1, 32, 32), torch.arange(12) % 2
    assert m.fit_prior([{"image": x, "label": y}])
    gen = m.generator({0: "normal", 1: "pneumonia"})
    spec = gen.export_spec(m.cfg)
    back = Generator.from_spec(spec, gen.state_dict())
    labels = torch.tensor([0, 1, 1, 0])
    assert back.prior.is_fitted
    torch.testing.assert_close(back.sample(labels, seed=3), gen.sample(labels, seed=3))
    # the fitted prior changes the images: the same noise through N(0, I) decodes differently
    assert not torch.allclose(gen.sample(labels, seed=3), gen.sample(labels, seed=3, prior="normal"))
    # a model exported before the prior existed (spec version 1: decoder weights only) loads and
    # draws from N(0, I)
    old = Generator.from_spec({**spec, "version": 1}, gen.decoder.state_dict())
    assert not old.prior.is_fitted
    torch.testing.assert_close(old.sample(labels, seed=3), gen.sample(labels, seed=3, prior="normal"))


def test_fit_prior_is_skipped_when_the_model_uses_the_normal_prior():
    m = VAEGAN(ModelConfig(image_size=32, latent_dim=8, base_channels=8, max_channels=16, prior="normal"))
    assert not m.fit_prior([{"image": torch.randn(4, 1, 32, 32), "label": torch.zeros(4)}])
    assert not m.prior.is_fitted
    with pytest.raises(ValueError, match="model.prior must be one of"):
        ModelConfig(prior="gmm")


def test_encoder_validation():
    with pytest.raises(ValueError, match="image_size must be one of"):
        Encoder(image_size=100)
    with pytest.raises(ValueError, match="latent_dim"):
        Encoder(latent_dim=0)
    with pytest.raises(ValueError, match="base_channels"):
        Encoder(base_channels=0)
    with pytest.raises(ValueError, match="max_channels"):
        Encoder(base_channels=64, max_channels=32)
    with pytest.raises(ValueError, match="num_classes"):
        Encoder(num_classes=-1)
    with pytest.raises(ValueError, match="embed_dim"):
        Encoder(num_classes=2, embed_dim=0)
    with pytest.raises(ValueError, match="in_channels"):
        Encoder(in_channels=0)


def test_decoder_validation():
    with pytest.raises(ValueError, match="image_size must be one of"):
        Decoder(image_size=48)
    with pytest.raises(ValueError, match="out_channels"):
        Decoder(out_channels=0)


def test_discriminator_validation():
    with pytest.raises(ValueError, match="too deep"):
        Discriminator(image_size=32, num_layers=4)
    with pytest.raises(ValueError, match="channels must be"):
        Discriminator(channels=0)
    with pytest.raises(ValueError, match="norm must be"):
        Discriminator(norm="WEIRD")


def test_model_config_validation():
    with pytest.raises(ValueError, match="model.kind"):
        ModelConfig(kind="gan")
    with pytest.raises(ValueError, match="feature_layer"):
        VAEGAN(ModelConfig(image_size=32, feature_layer=7))
    assert VAEGAN(ModelConfig(image_size=32, kind="vae")).discriminator is None


def test_norm_choice_and_validation():
    from networks.vaegan import Decoder, Encoder

    enc = Encoder(image_size=32, latent_dim=4, base_channels=4, norm="INSTANCE")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert Decoder(image_size=32, latent_dim=4, base_channels=4, norm="NONE")(torch.randn(2, 4)).shape == (
        2,
        1,
        32,
        32,
    )
    with pytest.raises(ValueError, match="norm must be one of"):
        Encoder(image_size=32, norm="LAYER")


@pytest.mark.parametrize("size", [16, 64, 256])
def test_subpixel_decoder_head(size):
    """The sub-pixel head reaches full size without full-resolution layers, and (ICNR) starts as
    a nearest-neighbour upsampling: every 2x2 block of the first output is constant."""
    dec = Decoder(image_size=size, latent_dim=8, base_channels=8, max_channels=32, head="subpixel").eval()
    img = dec(torch.randn(3, 8))
    assert img.shape == (3, 1, size, size)
    assert torch.allclose(img[..., 0::2, 0::2], img[..., 1::2, 1::2], atol=1e-6)
    assert torch.allclose(img[..., 0::2, 0::2], img[..., 0::2, 1::2], atol=1e-6)
    # no layer runs at full resolution: the last one before PixelShuffle works at half size
    h: dict = {}
    dec.deconv[-2].register_forward_hook(lambda m, i, o: h.update(shape=o.shape))  # returns None
    dec(torch.randn(1, 8))
    assert h["shape"][-1] == size // 2 and h["shape"][1] == 4
    with pytest.raises(ValueError, match="head must be one of"):
        Decoder(image_size=size, head="upsample")
    with pytest.raises(ValueError, match="decoder_head must be one of"):
        ModelConfig(decoder_head="upsample")


def _with_legacy_biases(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` as older code built it: a bias in every conv in front of a norm."""
    import copy

    old = copy.deepcopy(module)
    torch.manual_seed(5)
    for layer in old.modules():
        if hasattr(layer, "adn") and hasattr(layer.adn, "N") and layer.conv.bias is None:
            layer.conv.bias = torch.nn.Parameter(torch.randn(layer.conv.out_channels))
            if getattr(layer.adn.N, "running_mean", None) is not None:
                layer.adn.N.running_mean += torch.randn_like(layer.adn.N.running_mean)
    return old


@pytest.mark.parametrize("norm", ["BATCH", "INSTANCE"])
def test_old_checkpoints_with_conv_biases_load_unchanged_in_function(norm):
    from pipeline.infra.checkpoint import load_module_state

    torch.manual_seed(0)
    kw = dict(image_size=32, latent_dim=8, base_channels=8, max_channels=16, norm=norm)
    dec, enc = Decoder(**kw), Encoder(**kw)
    old_dec, old_enc = _with_legacy_biases(dec), _with_legacy_biases(enc)
    assert (
        any(k.endswith("conv.bias") for k in old_dec.state_dict())
        and "deconv.0.conv.bias" not in dec.state_dict()
    )
    load_module_state(dec, old_dec.state_dict(), "decoder", "old.pt")
    load_module_state(enc, old_enc.state_dict(), "encoder", "old.pt")
    z, x = torch.randn(3, 8), torch.randn(3, 1, 32, 32)
    for mode in ("eval", "train"):
        for m in (dec, enc, old_dec, old_enc):
            getattr(m, mode)()
        with torch.no_grad():
            torch.testing.assert_close(dec(z), old_dec(z), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(enc(x)[0], old_enc(x)[0], rtol=1e-4, atol=1e-5)


def test_old_optimiser_state_follows_its_parameters_by_name():
    from pipeline.infra.checkpoint import load_optimizer_state

    torch.manual_seed(0)
    dec = Decoder(image_size=32, latent_dim=8, base_channels=8, max_channels=16)
    old = _with_legacy_biases(dec)
    old_opt = torch.optim.Adam(old.parameters())
    old(torch.randn(2, 8)).sum().backward()
    old_opt.step()
    opt = torch.optim.Adam(dec.parameters())
    load_optimizer_state(opt, old_opt.state_dict(), dec, old.state_dict())
    old_state = dict(
        zip((n for n, _ in old.named_parameters()), old_opt.state_dict()["state"].values(), strict=True)
    )
    new_state = opt.state_dict()["state"]
    for i, (name, p) in enumerate(dec.named_parameters()):
        assert new_state[i]["exp_avg"].shape == p.shape
        torch.testing.assert_close(new_state[i]["exp_avg"], old_state[name]["exp_avg"])


def test_fusing_norm_and_activation_is_a_cpu_step_that_sync_batchnorm_never_sees():
    # DDP on CUDA converts batch norms before anything else; a module fused at construction would
    # become a plain SyncBatchNorm and lose its ReLU
    from monai.networks.blocks import ADN

    from networks.fused import FusedBatchNormAct, FusedInstanceNormAct

    m = VAEGAN(ModelConfig(image_size=32, latent_dim=8, base_channels=8, num_classes=2))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    acts = [type(a.A) for a in synced.modules() if isinstance(a, ADN) and hasattr(a, "N")]
    assert acts and all(a in (torch.nn.ReLU, torch.nn.LeakyReLU) for a in acts)
    keys = list(m.state_dict())
    m.fuse_norm_act()
    fused = [x for x in m.modules() if isinstance(x, FusedBatchNormAct | FusedInstanceNormAct)]
    assert len(fused) == len(acts) and list(m.state_dict()) == keys


def test_the_model_owns_encode_decode_reconstruct_sample_and_its_objective():
    from networks.config import LossConfig

    m = VAEGAN(
        ModelConfig(
            image_size=32, latent_dim=8, base_channels=8, max_channels=16, disc_channels=8, num_classes=2
        )
    )
    m.eval()
    x, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 0, 1])
    mu, logvar = m.encode(x, y)
    assert mu.shape == logvar.shape == (4, 8)
    # reconstruct = decode(posterior mean): the same tensor through the two paths
    torch.testing.assert_close(m.reconstruct(x, y), m.decode(mu, y))
    assert m.sample(y, seed=0).shape == (4, 1, 32, 32)
    losses = m.objective(x, y, LossConfig())
    # Larsen's composition: one total per network, built from the named terms
    assert {"encoder", "decoder", "discriminator", "kl", "feature_rec", "adv_g", "adv_d"} <= set(losses)
    lc = LossConfig()
    expect = (
        lc.kl_weight * losses["kl"] + lc.feature * losses["feature_rec"] + lc.pixel_l1 * losses["pixel_l1"]
    )
    torch.testing.assert_close(losses["encoder"], expect)
    with pytest.raises(ValueError, match="disc_calls must be one of"):
        VAEGAN(ModelConfig(image_size=32, latent_dim=8, base_channels=8), disc_calls="three")


def test_projection_discriminator_adds_the_class_term_and_starts_unconditional():
    torch.manual_seed(0)
    d = Discriminator(32, 8, 0, "INSTANCE", num_classes=2)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    plain, feats = d(x)
    # zero-initialised embedding: at the start the labels change nothing
    assert torch.equal(d(x, y)[0], plain)
    with torch.no_grad():
        d.embed.weight.normal_()
    cond, _ = d(x, y)
    expected = (d.embed(y) * feats[-1].mean(dim=(2, 3))).sum(dim=1)
    torch.testing.assert_close(cond - plain, expected[:, None, None, None].expand_as(plain))


def test_projection_needs_labels_to_project():
    with pytest.raises(ValueError, match="disc_conditioning=projection needs model.num_classes"):
        ModelConfig(disc_conditioning="projection")


def test_the_adversarial_loss_trains_the_class_embedding():
    torch.manual_seed(0)
    cfg = ModelConfig(
        image_size=32,
        latent_dim=8,
        base_channels=8,
        max_channels=16,
        disc_channels=8,
        num_classes=2,
        disc_conditioning="projection",
    )
    model = VAEGAN(cfg)
    losses = vaegan_losses(model, torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 0, 1]), LossConfig())
    params = {
        "encoder": list(model.encoder.parameters()),
        "decoder": list(model.decoder.parameters()),
        "discriminator": list(model.discriminator.parameters()),
    }
    route_gradients(losses, params)
    assert model.discriminator.embed.weight.grad is not None
    assert model.discriminator.embed.weight.grad.abs().sum() > 0

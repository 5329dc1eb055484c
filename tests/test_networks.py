from __future__ import annotations

import copy

import pytest
import torch

from networks import VAEGAN, Decoder, Discriminator, Encoder, Generator, ModelConfig


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


def test_generator_sample_is_deterministic_with_a_generator():
    g = Generator(Decoder(image_size=32, latent_dim=8, base_channels=8)).eval()
    a = g.sample(3, generator=torch.Generator().manual_seed(0))
    b = g.sample(3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 32, 32) and torch.equal(a, b)


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
    from pipeline.checkpoint import load_module_state

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
    from pipeline.checkpoint import load_optimizer_state

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

"""networks.fused: batch norm + (Leaky)ReLU in one kernel, against nn.BatchNorm2d then the activation."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Convolution
from torch import nn

from networks import fused

CL = torch.channels_last


def _pair(c: int, slope: float, seed: int = 0) -> tuple[nn.BatchNorm2d, fused.FusedBatchNormAct]:
    torch.manual_seed(seed)
    ref = nn.BatchNorm2d(c)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-0.5, 0.5)
    f = fused.FusedBatchNormAct(c)
    f.load_state_dict(ref.state_dict())
    f.negative_slope = slope
    return ref, f


def _both(ref_fn, mod: nn.Module, x: torch.Tensor):
    """The eager reference and the fused module on copies of ``x``, one shared output gradient:
    ``(y_ref, y_fused, dx_ref, dx_fused)``."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref_fn(xr), mod(xf)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    return yr, yf, xr.grad, xf.grad


def test_the_kernel_builds_here():
    # CI has a C++ compiler: the fast path must really run there, not silently fall back
    assert fused.extension() is not None


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(8, 5, 3, 7), (4, 32, 16, 16), (2, 64, 1, 3)])
def test_values_gradients_and_running_stats_match_batchnorm_then_activation(slope, shape):
    ref, f = _pair(shape[1], slope)
    x = (torch.randn(*shape) * 2 + 0.7).contiguous(memory_format=CL)
    yr, yf, gr, gf = _both(lambda t: nn.functional.leaky_relu(ref(t), slope), f, x)
    assert yf.is_contiguous(memory_format=CL)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(f, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)


def test_more_accurate_than_float32_batchnorm_at_full_resolution():
    # the decoder's full-resolution shape: the kernel sums in double per thread, eager float32
    # batch norm drifts (and so flips some ReLU masks); both against a float64 reference
    ref, f = _pair(32, 0.0)
    ref64 = nn.BatchNorm2d(32).double()
    ref64.load_state_dict(ref.state_dict())
    x = (torch.randn(128, 32, 64, 64) * 2 + 0.7).contiguous(memory_format=CL)
    x64 = x.double().requires_grad_()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y64, yr, yf = torch.relu(ref64(x64)), torch.relu(ref(xr)), f(xf)
    g = torch.randn_like(yr)
    for y, gg in ((y64, g.double()), (yr, g), (yf, g)):
        y.backward(gg)

    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    assert rel(yf, y64) < 1e-6 and rel(xf.grad, x64.grad) < 1e-6
    assert rel(yf, y64) <= rel(yr, y64) and rel(xf.grad, x64.grad) <= rel(xr.grad, x64.grad)


def test_partial_backward_computes_only_what_is_asked():
    # the VAE-GAN's per-network passes ask for the input gradient or the weights, not both
    ref, f = _pair(16, 0.2)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL).requires_grad_()
    (gx,) = torch.autograd.grad(f(x).square().sum(), [x])
    (gw,) = torch.autograd.grad(f(x).square().sum(), [f.weight])
    xr = x.detach().clone().requires_grad_()
    out = nn.functional.leaky_relu(ref(xr), 0.2).square().sum()
    gxr, gwr = torch.autograd.grad(out, [xr, ref.weight])
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-5)


def test_falls_back_to_batchnorm_then_activation_elsewhere():
    ref, f = _pair(8, 0.2)
    x = torch.randn(4, 8, 6, 6)
    # NCHW input, eval mode (running statistics), and the switch off: all the eager reference
    torch.testing.assert_close(f(x), nn.functional.leaky_relu(ref(x), 0.2))
    f.eval()
    ref.eval()
    xc = x.contiguous(memory_format=CL)
    torch.testing.assert_close(f(xc), nn.functional.leaky_relu(ref(xc), 0.2))


def test_fuse_adn_keeps_the_state_dict_and_only_takes_a_plain_norm_then_relu():
    def block(act, norm="BATCH", dropout=None):
        return Convolution(2, 4, 8, strides=2, kernel_size=3, act=act, norm=norm, dropout=dropout, bias=False)

    b = block(("leakyrelu", {"negative_slope": 0.2, "inplace": True}))
    keys = list(b.state_dict())
    before = {k: v.clone() for k, v in b.state_dict().items()}
    params = list(b.parameters())
    rng = torch.get_rng_state()
    assert fused.fuse_adn(b.adn)
    assert list(b.state_dict()) == keys and torch.equal(torch.get_rng_state(), rng)
    # the fused norm holds the very parameters (an optimiser built before keeps working) and values
    assert all(p is q for p, q in zip(b.parameters(), params, strict=True))
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(b.adn.N, fused.FusedBatchNormAct) and b.adn.N.negative_slope == 0.2
    assert isinstance(b.adn.A, nn.Identity)
    inst = block("leakyrelu", norm="INSTANCE")  # the discriminator's: N, D(p=0), A
    assert fused.fuse_adn(inst.adn) and isinstance(inst.adn.N, fused.FusedInstanceNormAct)
    affine_in = block("relu", norm=("INSTANCE", {"affine": True}))
    for other in (
        block("prelu"),
        block("relu", dropout=0.1),
        block("relu", norm=("GROUP", {"num_groups": 2})),
        affine_in,
    ):
        assert not fused.fuse_adn(other.adn)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape", [(8, 5, 3, 7), (64, 128, 7, 7), (4, 16, 32, 32)])
def test_instance_norm_kernel_matches_instance_norm_then_leaky_relu(shape, layout):
    ref = nn.InstanceNorm2d(shape[1])
    f = fused.FusedInstanceNormAct(shape[1])
    f.negative_slope = 0.2
    x = (torch.randn(*shape) * 2 + 0.5).contiguous(memory_format=layout)
    yr, yf, gr, gf = _both(lambda t: nn.functional.leaky_relu(ref(t), 0.2), f, x)
    assert yf.is_contiguous(memory_format=layout)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=2e-5)

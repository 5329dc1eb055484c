"""networks.layers: the GEMM convolution paths compute exactly what nn.Conv2d computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import layers
from networks.layers import FewInputConv2d, FewOutputConv2d, adopt

CASES = [
    # cls, (in, out, kernel, stride, padding), input shape
    (FewOutputConv2d, (32, 1, 3, 1, 1), (3, 32, 12, 10)),  # the decoder's last layer
    (FewOutputConv2d, (8, 3, 5, 1, 2), (2, 8, 9, 7)),
    (FewOutputConv2d, (16, 1, 4, 1, 1), (2, 16, 7, 7)),  # the discriminator's last layer
    (FewOutputConv2d, (6, 2, 3, 1, 0), (2, 6, 8, 8)),
    (FewInputConv2d, (1, 16, 4, 2, 1), (3, 1, 16, 16)),  # the discriminator's first layer
    (FewInputConv2d, (2, 5, 3, 2, 1), (2, 2, 9, 11)),
    (FewInputConv2d, (1, 4, 3, 1, 1), (2, 1, 6, 6)),
]


@pytest.mark.parametrize("cls,args,shape", CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_conv2d_values_and_gradients(cls, args, shape, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast = cls(*args).to(memory_format=fmt)
    ref = nn.Conv2d(*args).to(memory_format=fmt)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
    y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [x, *fast.parameters()], g)
    want = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backward_computes_only_what_the_pass_asks_for():
    """``backward(inputs=...)`` (Larsen's per-network passes) must not fill other gradients."""
    torch.manual_seed(0)
    conv = FewOutputConv2d(8, 1, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    conv(x).sum().backward(inputs=[x])
    assert x.grad is not None and conv.weight.grad is None and conv.bias.grad is None
    first = FewInputConv2d(1, 4, 4, 2, 1)
    img = torch.randn(2, 1, 8, 8, requires_grad=True)
    first(img).sum().backward(inputs=list(first.parameters()))
    assert img.grad is None and first.weight.grad is not None


def test_switch_off_and_other_dtypes_fall_back_to_conv2d():
    torch.manual_seed(0)
    conv = FewOutputConv2d(4, 1, 3, 1, 1)
    x = torch.randn(1, 4, 5, 5)
    layers.set_gemm(conv, False)
    off = conv(x)
    layers.set_gemm(conv, True)
    torch.testing.assert_close(conv(x), off, rtol=1e-5, atol=1e-6)
    assert conv.double()(x.double()).dtype == torch.float64  # plain nn.Conv2d path


def test_adopt_shares_parameters_and_state_dict_keys_and_draws_no_random_numbers():
    conv = nn.Conv2d(32, 1, 3, padding=1)
    keys, w = set(conv.state_dict()), conv.weight
    rng = torch.get_rng_state()
    new = adopt(conv, FewOutputConv2d)
    # a seeded model built with GEMM convolutions initialises every later layer as without them
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(new, FewOutputConv2d) and set(new.state_dict()) == keys and new.weight is w
    assert new.bias is conv.bias and new.weight.device.type == "cpu"


def test_fewoutput_rejects_a_stride():
    with pytest.raises(ValueError, match="stride 1"):
        FewOutputConv2d(8, 1, 3, stride=2, padding=1)


def test_fewoutput_rejects_padding_beyond_the_kernel():
    with pytest.raises(ValueError, match="padding < kernel"):
        FewOutputConv2d(8, 1, 3, padding=3)


def test_fewinput_rejects_unequal_strides():
    with pytest.raises(ValueError, match="equal strides"):
        FewInputConv2d(1, 4, 3, stride=(1, 2), padding=1)


def test_rejects_groups():
    with pytest.raises(ValueError, match="groups=1"):
        FewInputConv2d(2, 4, 3, padding=1, groups=2)


def test_adopt_refuses_an_unsuitable_conv_and_leaves_it_intact():
    conv = nn.Conv2d(8, 1, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="stride 1"):
        adopt(conv, FewOutputConv2d)
    assert type(conv) is nn.Conv2d and conv.weight.device.type == "cpu"

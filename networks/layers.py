"""Drop-in ``nn.Conv2d`` subclasses for the two convolution shapes oneDNN runs slowly on CPU.

Same parameters, same initialisation, same ``state_dict`` keys and the same function as
``nn.Conv2d`` (checked to float rounding by ``tests/test_layers.py``); only how some passes are
computed on a CPU in float32 differs. Elsewhere (CUDA, other dtypes, autocast) they are plain
``nn.Conv2d``.

* :class:`FewOutputConv2d` -- many channels in, few out, stride 1: the decoder's last layer
  (32 -> 1 channel at full resolution) and the discriminator's (128 -> 1). oneDNN's forward and weight-gradient passes
  run at a few per cent of the machine's matmul rate there; done as one GEMM (a 1x1 convolution)
  into the ``out * k * k`` per-tap products plus a shift-and-add, they are several times faster
  (docs/benchmarks.md). The input gradient stays with oneDNN, which is fast in that direction.
* :class:`FewInputConv2d` -- one (or few) input channels: the discriminator's first layer. Its
  input gradient (needed to train the decoder through the discriminator) runs at a small fraction
  of the matmul rate in oneDNN; as a GEMM plus ``fold`` (col2im) it is faster (docs/benchmarks.md).
  Forward and weight gradient stay with oneDNN.

Measured with ``benchmarks/bench_train.py`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_conv_backward = torch.ops.aten.convolution_backward


def _use_gemm(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def _needed(ctx, i: int) -> bool:
    """Whether input ``i``'s gradient is wanted by *this* backward pass: ``needs_input_grad`` only
    says it requires grad, but ``backward(inputs=...)`` (the VAE-GAN's per-network passes) often
    skips it. Built-in nodes make this check themselves; torch.utils.checkpoint uses the same call."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # not inside an engine-run backward: be safe
        return True


class _FewOutputConv(torch.autograd.Function):
    """``conv2d(x, w, b, stride=1, padding=p)`` through per-tap products.

    With ``T[o, i, j] = w[o, :, i, j] . x`` (one GEMM: a 1x1 convolution into ``n_out*k*k``
    channels), the output is
    ``out[o, y, x] = sum_ij T[o, i, j][y + i - p, x + j - p]``, a shift-and-add over k*k small maps.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: int) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        n_out, k = w.shape[0], w.shape[-1]
        Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
        # the per-tap GEMM as oneDNN's 1x1 convolution into n_out*k*k channels (faster than
        # torch.mm for these skinny shapes)
        w1 = w.permute(0, 2, 3, 1).reshape(n_out * k * k, C, 1, 1)
        taps = F.conv2d(x, w1).permute(1, 0, 2, 3)  # [n_out*k*k, B, H, W]
        tp = F.pad(taps, (p, p, p, p)).view(n_out, k, k, B, H + 2 * p, W + 2 * p)
        out = tp[:, 0, 0, :, :Ho, :Wo].clone()
        for i in range(k):
            for j in range(k):
                if i or j:
                    out += tp[:, i, j, :, i : i + Ho, j : j + Wo]
        if b is not None:
            out += b.view(n_out, 1, 1, 1)
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.p = b is not None, p
        # [n_out, B, Ho, Wo] -> [B, n_out, Ho, Wo]; in channels_last memory, like the input
        return out.permute(1, 0, 2, 3).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        p = ctx.p
        B, C, H, W = x.shape
        n_out, k = w.shape[0], w.shape[-1]
        gx = gw = gb = None
        if _needed(ctx, 0):  # oneDNN is fast in this direction (few -> many channels)
            # its fast path wants every operand in one layout: the input's (no copy of it)
            fmt = (
                torch.channels_last
                if x.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format
            )
            g, x, w = (
                g.contiguous(memory_format=fmt),
                x.contiguous(memory_format=fmt),
                w.contiguous(memory_format=fmt),
            )
            gx = _conv_backward(
                g, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        if _needed(ctx, 1):
            # dL/dT[o, i, j](y', x') = g[o](y' - i + p, x' - j + p): the shift-and-add's adjoint
            q = k - 1 - p
            gp = F.pad(g.permute(1, 0, 2, 3), (q, q, q, q))  # [n_out, B, Ho + 2q, Wo + 2q]
            gt = torch.empty(n_out, k, k, B, H, W, dtype=g.dtype)
            for i in range(k):
                for j in range(k):
                    gt[:, i, j] = gp[:, :, k - 1 - i : k - 1 - i + H, k - 1 - j : k - 1 - j + W]
            # the 1x1 convolution's weight gradient, in oneDNN
            w1 = w.permute(0, 2, 3, 1).reshape(n_out * k * k, C, 1, 1)
            gt1 = gt.view(n_out * k * k, B, H, W).permute(1, 0, 2, 3)
            gw = _conv_backward(
                gt1, x, w1, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
            )
            gw = gw[1].reshape(n_out, k, k, C).permute(0, 3, 1, 2)
        if ctx.has_bias and _needed(ctx, 2):
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


class _FewInputConv(torch.autograd.Function):
    """``conv2d(x, w, b, stride, padding)`` whose input gradient is a GEMM plus ``fold``."""

    @staticmethod
    def forward(ctx, x, w, b, stride: int, padding: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.stride, ctx.padding = b is not None, stride, padding
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        B, C, H, W = x.shape
        n_out, k = w.shape[0], w.shape[-1]
        gx = gw = gb = None
        if _needed(ctx, 0):
            # column gradients [B, C*k*k, L] = w^T g (one small GEMM per image on g's NCHW view,
            # no copy), then col2im sums the overlapping windows
            g3 = g.contiguous().view(B, n_out, g.shape[2] * g.shape[3])
            cols = torch.matmul(w.reshape(n_out, C * k * k).t(), g3)
            gx = F.fold(cols, (H, W), k, padding=p, stride=s)
            if x.is_contiguous(memory_format=torch.channels_last):
                gx = gx.contiguous(memory_format=torch.channels_last)
        if _needed(ctx, 1):
            gw = _conv_backward(
                g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]
        if ctx.has_bias and _needed(ctx, 2):
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _check_plain(conv: nn.Conv2d, what: str) -> None:
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"{what} needs groups=1, dilation=1 and zero padding, got {conv}")
    if conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"{what} needs a square kernel, got {conv.kernel_size}")


class GemmConv2d(nn.Conv2d):
    """``nn.Conv2d`` that validates its shape for a GEMM formulation and runs it when it applies
    and ``self.gemm`` is true (false: ``nn.Conv2d``'s own path; see :func:`set_gemm`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._validate()
        self.gemm = True

    def _validate(self) -> None:
        raise NotImplementedError

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x) if self.gemm and _use_gemm(x, self.weight) else super().forward(x)


class FewOutputConv2d(GemmConv2d):
    """``nn.Conv2d`` (stride 1, square kernel, padding < kernel) for few output channels."""

    def _validate(self) -> None:
        _check_plain(self, "FewOutputConv2d")
        k = self.kernel_size[0]
        if isinstance(self.padding, str) or self.stride != (1, 1) or self.padding[0] != self.padding[1]:
            raise ValueError(f"FewOutputConv2d needs stride 1 and equal integer paddings, got {self}")
        if not 0 <= self.padding[0] < k:
            raise ValueError(f"FewOutputConv2d needs 0 <= padding < kernel size, got {self}")

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return _FewOutputConv.apply(x, self.weight, self.bias, self.padding[0])


class FewInputConv2d(GemmConv2d):
    """``nn.Conv2d`` for few input channels (the input gradient is computed as GEMM + col2im)."""

    def _validate(self) -> None:
        _check_plain(self, "FewInputConv2d")
        if (
            isinstance(self.padding, str)
            or self.stride[0] != self.stride[1]
            or self.padding[0] != self.padding[1]
        ):
            raise ValueError(f"FewInputConv2d needs equal strides and paddings, got {self}")

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return _FewInputConv.apply(x, self.weight, self.bias, self.stride[0], self.padding[0])


def adopt(conv: nn.Conv2d, cls: type[GemmConv2d]) -> GemmConv2d:
    """A ``cls`` that computes what ``conv`` (e.g. inside a MONAI block) computes and shares its
    parameters: same ``state_dict``, no random numbers drawn (it is built on the meta device).
    Put it in ``conv``'s place. Raises ``ValueError`` if ``conv``'s shape does not suit ``cls``."""
    if type(conv) is not nn.Conv2d:
        raise ValueError(f"expected a plain nn.Conv2d, got {type(conv).__name__}")
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    new.weight, new.bias = conv.weight, conv.bias
    return new.train(conv.training)


def set_gemm(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch the GEMM formulations of every :class:`GemmConv2d` in ``module`` on or off (off:
    plain ``nn.Conv2d`` arithmetic; the speed measure ``gemm_convs``). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, GemmConv2d):
            m.gemm = bool(enabled)
    return module

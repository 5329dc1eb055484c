"""Batch norm + ReLU/LeakyReLU in one pass over memory, for CPU training in channels_last float32.

The VAE-GAN's encoder and decoder blocks end in ``BatchNorm2d -> (Leaky)ReLU``. In eager PyTorch
that is five passes over the activation forward (statistics, normalise, activation in place) and
eight backward (``threshold_backward``, then batch norm's two). At the decoder's full resolution
([128, 32, 64, 64], 64 MiB per tensor) those passes are memory-bound (docs/benchmarks.md has
their share of a CPU step). :class:`FusedBatchNormAct` does the same function in three passes forward and
four backward (the activation's mask is recomputed from the input, which batch norm saves anyway),
with a small C++ kernel built on first use by ``torch.utils.cpp_extension.load_inline`` (the
machine's C++ compiler and ninja; built once per machine, cached).

Same parameters, buffers and ``state_dict`` as ``nn.BatchNorm2d``; running statistics updated
the same way. Elsewhere (eval mode, CUDA, other dtypes or layouts, autocast, no compiler) it is
``nn.BatchNorm2d`` followed by the activation. ``tests/test_fused.py`` checks values, gradients and
running statistics against that reference.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from networks.layers import _needed

# the kernel's C++ source, shipped beside this file (package data)
SOURCE = Path(__file__).resolve().parent / "fused_norm_act.cpp"

_lock = threading.Lock()
_ext = None
_failed = ""


def extension():
    """The compiled kernel, built on first use; None (with one warning) if it cannot be built."""
    global _ext, _failed
    if _ext is not None or _failed:
        return _ext
    with _lock:
        if _ext is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                # the ninja that pip installs beside this Python, when the shell's PATH lacks it
                venv_bin = os.path.dirname(sys.executable)
                if os.path.isfile(os.path.join(venv_bin, "ninja")) and venv_bin not in os.environ.get(
                    "PATH", ""
                ):
                    os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")

                # vector width from what this CPU runs PyTorch's own kernels with; part of the name,
                # so a cache shared between machines never hands one a binary it cannot run
                cap = torch.backends.cpu.get_cpu_capability()
                flags = {"AVX512": ["-mavx512f", "-mavx512dq", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
                _ext = load_inline(
                    name=f"cxr_norm_act_{cap.lower()}_v7",
                    cpp_sources=SOURCE.read_text(),
                    functions=[
                        "bn_act_forward",
                        "bn_act_backward",
                        "in_act_forward",
                        "in_act_backward",
                        "in_act_forward_cl",
                        "in_act_backward_cl",
                    ],
                    # -fno-trapping-math: FP exceptions are never enabled here, so GCC may compute
                    # both sides of the activation's select and blend them; without it the AVX2
                    # build (no mask registers, unlike AVX-512) kept the loops scalar and ran
                    # slower than eager PyTorch (docs/benchmarks.md). Values are unchanged: no
                    # reassociation beyond the marked `omp simd` reductions; sqrt skips errno only
                    extra_cflags=[
                        "-O3",
                        "-fopenmp",
                        "-fno-trapping-math",
                        "-fno-math-errno",
                        *flags.get(cap, []),
                    ],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: eager PyTorch instead
                _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"networks.fused: the batch-norm+activation kernel could not be built ({_failed}); "
                    "using batch norm then the activation (same results, slower on CPU)",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _ext


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps: float, slope: float):  # type: ignore[override]
        B, C, H, W = x.shape
        x2 = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view: x is channels_last
        y2, mean, invstd, var = extension().bn_act_forward(x2, w.contiguous(), b.contiguous(), eps, slope)
        ctx.save_for_backward(x2, w, b, mean, invstd)
        ctx.slope, ctx.shape = slope, (B, C, H, W)
        ctx.mark_non_differentiable(mean, var)
        return y2.view(B, H, W, C).permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, gy, _gm, _gv):  # type: ignore[override]
        x2, w, b, mean, invstd = ctx.saved_tensors
        B, C, H, W = ctx.shape
        need_dx, need_w, need_b = _needed(ctx, 0), _needed(ctx, 1), _needed(ctx, 2)
        if not (need_dx or need_w or need_b):
            return None, None, None, None, None
        g2 = gy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B * H * W, C)
        dx2, dw, db = extension().bn_act_backward(
            g2, x2, w.contiguous(), b.contiguous(), mean, invstd, ctx.slope, need_dx
        )
        dx = dx2.view(B, H, W, C).permute(0, 3, 1, 2) if need_dx else None
        return dx, dw if need_w else None, db if need_b else None, None, None


class FusedBatchNormAct(nn.BatchNorm2d):
    """``BatchNorm2d`` followed by ``LeakyReLU(negative_slope)`` (0: ReLU), fused on CPU in training.

    Build with :func:`fuse_adn`, which turns a MONAI ``ADN`` block's norm + activation into one.
    """

    negative_slope: float = 0.0

    def _use_fused(self, x: torch.Tensor) -> bool:
        return (
            self.training
            and self.affine
            and self.track_running_stats
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu")
            and extension() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_fused(x):
            return F.leaky_relu(super().forward(x), self.negative_slope, inplace=True)
        y, mean, var = _BNAct.apply(x, self.weight, self.bias, self.eps, self.negative_slope)
        with torch.no_grad():  # the running statistics exactly as nn.BatchNorm2d keeps them
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
            n = x.numel() / x.shape[1]
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * (n / (n - 1)), alpha=m)
        return y


class _INAct(torch.autograd.Function):
    """NCHW: one row per (sample, channel) plane; channels_last: [B, H*W, C] slabs."""

    @staticmethod
    def forward(ctx, x, eps: float, slope: float):  # type: ignore[override]
        B, C, H, W = x.shape
        ext = extension()
        ctx.cl = not x.is_contiguous()  # then channels_last (checked by the caller)
        if ctx.cl:
            x2 = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # views, no copy
            y2, mean, invstd = ext.in_act_forward_cl(x2, eps, slope)
            y = y2.view(B, H, W, C).permute(0, 3, 1, 2)
        else:
            x2 = x.reshape(B * C, H * W)
            y2, mean, invstd = ext.in_act_forward(x2, eps, slope)
            y = y2.view(B, C, H, W)
        ctx.save_for_backward(x2, mean, invstd)
        ctx.slope, ctx.shape = slope, (B, C, H, W)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        if not _needed(ctx, 0):
            return None, None, None
        x2, mean, invstd = ctx.saved_tensors
        B, C, H, W = ctx.shape
        ext = extension()
        if ctx.cl:
            g2 = gy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B, H * W, C)
            dx = ext.in_act_backward_cl(g2, x2, mean, invstd, ctx.slope).view(B, H, W, C).permute(0, 3, 1, 2)
        else:
            dx = ext.in_act_backward(gy.contiguous().view(B * C, H * W), x2, mean, invstd, ctx.slope)
            dx = dx.view(B, C, H, W)
        return dx, None, None


class FusedInstanceNormAct(nn.InstanceNorm2d):
    """``InstanceNorm2d`` (no affine, no running statistics) followed by ``LeakyReLU``, fused on
    CPU for float32 in NCHW or channels_last. Elsewhere: the two eager ops."""

    negative_slope: float = 0.0

    def _use_fused(self, x: torch.Tensor) -> bool:
        return (
            not self.affine
            and not self.track_running_stats
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
            and x.shape[2] * x.shape[3] > 1
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and not torch.is_autocast_enabled("cpu")
            and extension() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_fused(x):
            return F.leaky_relu(super().forward(x), self.negative_slope)
        return _INAct.apply(x, self.eps, self.negative_slope)


def fuse_adn(adn: nn.Module) -> bool:
    """Put one fused module in place of a MONAI ``ADN``'s norm (``N``: ``BatchNorm2d`` or a plain
    ``InstanceNorm2d``, then ``A``: ``ReLU``/``LeakyReLU``, no dropout) and an identity in place
    of its activation. The fused module shares the norm's parameters and running statistics (same
    ``state_dict``; built on the meta device, so no random numbers are drawn). False (and
    unchanged) when the block is anything else."""
    kids = dict(adn.named_children())
    dropout = kids.get("D")
    if list(kids) not in (["N", "A"], ["N", "D", "A"]) or (dropout is not None and dropout.p != 0):
        return False  # MONAI adds Dropout(p=0.0), an identity, to some blocks; a real dropout stays
    if type(adn.N) is nn.BatchNorm2d:
        cls: type[nn.Module] = FusedBatchNormAct
    elif type(adn.N) is nn.InstanceNorm2d and not adn.N.affine and not adn.N.track_running_stats:
        cls = FusedInstanceNormAct
    else:
        return False
    act = adn.A
    if type(act) is nn.ReLU:
        slope = 0.0
    elif type(act) is nn.LeakyReLU:
        slope = float(act.negative_slope)
    else:
        return False
    old = adn.N
    new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, device="meta")
    for name, value in [*old.named_parameters(recurse=False), *old.named_buffers(recurse=False)]:
        setattr(new, name, value)
    new.negative_slope = slope
    adn.N = new.train(old.training)
    adn.A = nn.Identity()
    return True

"""Batch norm + ReLU/LeakyReLU in one pass over memory, for CPU training in channels_last float32.

The VAE-GAN's encoder and decoder blocks end in ``BatchNorm2d -> (Leaky)ReLU``. In eager PyTorch
that is five passes over the activation forward (statistics, normalise, activation in place) and
eight backward (``threshold_backward``, then batch norm's two). At the decoder's full resolution
([128, 32, 64, 64], 64 MiB per tensor) those passes are memory-bound and cost ~50 ms of a ~420 ms
step on a 2-core CPU. :class:`FusedBatchNormAct` does the same function in three passes forward and
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

import torch
import torch.nn.functional as F
from torch import nn

from networks.layers import _needed

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// x is [M, C] row-major: a channels_last activation with rows = pixels. Per-channel sums are
// accumulated in float over blocks of rows, then in double, per thread (no atomics). The row
// loops are free functions with restrict pointers: that is what lets GCC vectorise them.
static constexpr int64_t kBlock = 64;

// z = x * scale + shift with an explicit fma: forward and backward must agree on its sign
static inline void row_stats(const float* __restrict__ r, float* __restrict__ f1, float* __restrict__ f2,
                             int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    f1[c] += r[c];
    f2[c] += r[c] * r[c];
  }
}

static inline void row_apply(const float* __restrict__ r, float* __restrict__ o, const float* __restrict__ sc,
                             const float* __restrict__ sh, int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = std::fma(r[c], sc[c], sh[c]);
    o[c] = z > 0.f ? z : z * slope;
  }
}

static inline void row_bwd_stats(const float* __restrict__ r, const float* __restrict__ q,
                                 const float* __restrict__ sc, const float* __restrict__ sh,
                                 const float* __restrict__ mu, float* __restrict__ f1, float* __restrict__ f2,
                                 int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = std::fma(r[c], sc[c], sh[c]);
    const float gg = z > 0.f ? q[c] : q[c] * slope;
    f1[c] += gg;
    f2[c] += gg * (r[c] - mu[c]);
  }
}

static inline void row_dx(const float* __restrict__ r, const float* __restrict__ q, const float* __restrict__ sc,
                          const float* __restrict__ sh, const float* __restrict__ mu, const float* __restrict__ k1,
                          const float* __restrict__ k2, float* __restrict__ o, int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = std::fma(r[c], sc[c], sh[c]);
    const float gg = z > 0.f ? q[c] : q[c] * slope;
    o[c] = sc[c] * (gg - k1[c] - (r[c] - mu[c]) * k2[c]);
  }
}

static inline void row_centred_sq(const float* __restrict__ r, const float* __restrict__ mu,
                                  float* __restrict__ f2, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float d = r[c] - mu[c];
    f2[c] += d * d;
  }
}

// instance norm rows (no affine): z = (x - mean) * invstd, as in the NCHW plane kernel
static inline void row_norm_act(const float* __restrict__ r, float* __restrict__ o, const float* __restrict__ mu,
                                const float* __restrict__ is, int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = (r[c] - mu[c]) * is[c];
    o[c] = z > 0.f ? z : z * slope;
  }
}

static inline void row_in_bwd_stats(const float* __restrict__ r, const float* __restrict__ q,
                                    const float* __restrict__ mu, const float* __restrict__ is,
                                    float* __restrict__ f1, float* __restrict__ f2, int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = (r[c] - mu[c]) * is[c];
    const float gg = z > 0.f ? q[c] : q[c] * slope;
    f1[c] += gg;
    f2[c] += gg * z;
  }
}

static inline void row_in_dx(const float* __restrict__ r, const float* __restrict__ q, const float* __restrict__ mu,
                             const float* __restrict__ is, const float* __restrict__ k1, const float* __restrict__ k2,
                             float* __restrict__ o, int64_t C, float slope) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = (r[c] - mu[c]) * is[c];
    const float gg = z > 0.f ? q[c] : q[c] * slope;
    o[c] = is[c] * (gg - k1[c] - z * k2[c]);
  }
}

// per-thread sums over row blocks; rowfn(i, f1, f2) adds row i into the float block sums
template <typename F>
static void channel_sums(int64_t M, int64_t C, std::vector<double>& s1, std::vector<double>& s2, F rowfn) {
  const int nt = at::get_num_threads();
  s1.assign(nt * C, 0.0);
  s2.assign(nt * C, 0.0);
  at::parallel_for(0, M, kBlock, [&](int64_t beg, int64_t end) {
    double* a1 = s1.data() + at::get_thread_num() * C;
    double* a2 = s2.data() + at::get_thread_num() * C;
    std::vector<float> f1(C), f2(C);
    for (int64_t i0 = beg; i0 < end; i0 += kBlock) {
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      const int64_t i1 = std::min(end, i0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) rowfn(i, f1.data(), f2.data());
      for (int64_t c = 0; c < C; ++c) {
        a1[c] += f1[c];
        a2[c] += f2[c];
      }
    }
  });
  for (int t = 1; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += s1[t * C + c];
      s2[c] += s2[t * C + c];
    }
}

std::vector<at::Tensor> bn_act_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                       double eps, double slope_d) {
  const int64_t M = x.size(0), C = x.size(1);
  const float* xp = x.data_ptr<float>();
  std::vector<double> s1, s2;
  channel_sums(M, C, s1, s2, [&](int64_t i, float* f1, float* f2) { row_stats(xp + i * C, f1, f2, C); });
  auto opt = x.options();
  at::Tensor mean = at::empty({C}, opt), invstd = at::empty({C}, opt), var = at::empty({C}, opt);
  float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>(), *vp = var.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mu = s1[c] / M, v = std::max(s2[c] / M - mu * mu, 0.0);
    mp[c] = (float)mu;
    vp[c] = (float)v;
    ip[c] = (float)(1.0 / std::sqrt(v + eps));
    // the same float arithmetic as the backward pass, so both see the same activation mask
    scale[c] = wp[c] * ip[c];
    shift[c] = std::fma(-mp[c], scale[c], bp[c]);
  }
  at::Tensor y = at::empty({M, C}, opt);
  float* yp = y.data_ptr<float>();
  const float* sc = scale.data();
  const float* sh = shift.data();
  const float slope = (float)slope_d;
  at::parallel_for(0, M, kBlock, [&](int64_t beg, int64_t end) {
    for (int64_t i = beg; i < end; ++i) row_apply(xp + i * C, yp + i * C, sc, sh, C, slope);
  });
  return {y, mean, invstd, var};
}

// returns {dx (undefined unless need_dx), dweight, dbias}
std::vector<at::Tensor> bn_act_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& b, const at::Tensor& mean,
                                        const at::Tensor& invstd, double slope_d, bool need_dx) {
  const int64_t M = x.size(0), C = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float slope = (float)slope_d;
  std::vector<float> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = wp[c] * ip[c];
    shift[c] = std::fma(-mp[c], scale[c], bp[c]);
  }
  const float* sc = scale.data();
  const float* sh = shift.data();
  // sums of g' and g' * (x - mean), g' = g * activation'(z)
  std::vector<double> s1, s2;
  channel_sums(M, C, s1, s2, [&](int64_t i, float* f1, float* f2) {
    row_bwd_stats(xp + i * C, gp + i * C, sc, sh, mp, f1, f2, C, slope);
  });
  auto opt = x.options();
  at::Tensor dw = at::empty({C}, opt), db = at::empty({C}, opt);
  float *dwp = dw.data_ptr<float>(), *dbp = db.data_ptr<float>();
  std::vector<float> k1(C), k2(C);
  for (int64_t c = 0; c < C; ++c) {
    dbp[c] = (float)s1[c];
    dwp[c] = (float)(s2[c] * ip[c]);
    // dx = w*invstd * (g' - mean(g') - xhat * mean(g' * xhat)), xhat = (x - mean) * invstd
    k1[c] = (float)(s1[c] / M);
    k2[c] = (float)(s2[c] / M * (double)ip[c] * (double)ip[c]);
  }
  at::Tensor dx;
  if (need_dx) {
    dx = at::empty({M, C}, opt);
    float* dp = dx.data_ptr<float>();
    const float* q1 = k1.data();
    const float* q2 = k2.data();
    at::parallel_for(0, M, kBlock, [&](int64_t beg, int64_t end) {
      for (int64_t i = beg; i < end; ++i)
        row_dx(xp + i * C, gp + i * C, sc, sh, mp, q1, q2, dp + i * C, C, slope);
    });
  }
  return {dx, dw, db};
}

// Instance norm (no affine) + activation on NCHW: x is [R, L], one row per (sample, channel)
// plane, normalised over its L = H*W pixels. A plane is small (<= a few KiB here), so its three
// sweeps run from cache: one read of x from memory, one write of y.
static inline void plane_stats(const float* __restrict__ r, int64_t L, double eps, float* mean, float* invstd) {
  double s = 0;  // "omp simd reduction": lets the compiler vectorise the sum (reassociating it)
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < L; ++j) s += r[j];
  const float m = (float)(s / L);
  double v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < L; ++j) {
    const float d = r[j] - m;
    v += (double)d * d;
  }
  *mean = m;
  *invstd = (float)(1.0 / std::sqrt(v / L + eps));
}

static inline void plane_apply(const float* __restrict__ r, float* __restrict__ o, int64_t L, float m, float is,
                               float slope) {
  for (int64_t j = 0; j < L; ++j) {
    const float z = (r[j] - m) * is;
    o[j] = z > 0.f ? z : z * slope;
  }
}

std::vector<at::Tensor> in_act_forward(const at::Tensor& x, double eps, double slope_d) {
  const int64_t R = x.size(0), L = x.size(1);
  const float* xp = x.data_ptr<float>();
  auto opt = x.options();
  at::Tensor y = at::empty({R, L}, opt), mean = at::empty({R}, opt), invstd = at::empty({R}, opt);
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const float slope = (float)slope_d;
  at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
    for (int64_t i = beg; i < end; ++i) {
      plane_stats(xp + i * L, L, eps, mp + i, ip + i);
      plane_apply(xp + i * L, yp + i * L, L, mp[i], ip[i], slope);
    }
  });
  return {y, mean, invstd};
}

static inline void plane_bwd(const float* __restrict__ r, const float* __restrict__ q, float* __restrict__ o,
                             int64_t L, float m, float is, float slope) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t j = 0; j < L; ++j) {
    const float z = (r[j] - m) * is;
    const float gg = z > 0.f ? q[j] : q[j] * slope;
    s1 += gg;
    s2 += (double)gg * z;
  }
  const float k1 = (float)(s1 / L), k2 = (float)(s2 / L);
  for (int64_t j = 0; j < L; ++j) {
    const float z = (r[j] - m) * is;
    const float gg = z > 0.f ? q[j] : q[j] * slope;
    o[j] = is * (gg - k1 - z * k2);
  }
}

at::Tensor in_act_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& invstd, double slope_d) {
  const int64_t R = x.size(0), L = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  at::Tensor dx = at::empty({R, L}, x.options());
  float* dp = dx.data_ptr<float>();
  const float slope = (float)slope_d;
  at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
    for (int64_t i = beg; i < end; ++i) plane_bwd(xp + i * L, gp + i * L, dp + i * L, L, mp[i], ip[i], slope);
  });
  return dx;
}

// Instance norm (no affine) + activation on channels_last: x is [B, L, C], per-(sample, channel)
// statistics over a sample's L pixels. One sample's slab (L*C floats, tens of KiB) stays in cache.
std::vector<at::Tensor> in_act_forward_cl(const at::Tensor& x, double eps, double slope_d) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const float* xp = x.data_ptr<float>();
  auto opt = x.options();
  at::Tensor y = at::empty({B, L, C}, opt), mean = at::empty({B, C}, opt), invstd = at::empty({B, C}, opt);
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const float slope = (float)slope_d;
  at::parallel_for(0, B, 1, [&](int64_t beg, int64_t end) {
    std::vector<float> f1(C), f2(C), sc(C), sh(C);
    for (int64_t n = beg; n < end; ++n) {
      const float* xs = xp + n * L * C;
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t i = 0; i < L; ++i) row_stats(xs + i * C, f1.data(), f2.data(), C);
      for (int64_t c = 0; c < C; ++c) f1[c] /= L;  // the mean; then centred squares (two-pass)
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t i = 0; i < L; ++i) row_centred_sq(xs + i * C, f1.data(), f2.data(), C);
      for (int64_t c = 0; c < C; ++c) {
        mp[n * C + c] = f1[c];
        ip[n * C + c] = (float)(1.0 / std::sqrt((double)f2[c] / L + eps));
      }
      for (int64_t i = 0; i < L; ++i)
        row_norm_act(xs + i * C, yp + (n * L + i) * C, mp + n * C, ip + n * C, C, slope);
    }
  });
  return {y, mean, invstd};
}

at::Tensor in_act_backward_cl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& invstd, double slope_d) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  at::Tensor dx = at::empty({B, L, C}, x.options());
  float* dp = dx.data_ptr<float>();
  const float slope = (float)slope_d;
  at::parallel_for(0, B, 1, [&](int64_t beg, int64_t end) {
    std::vector<float> f1(C), f2(C);
    for (int64_t n = beg; n < end; ++n) {
      const int64_t o = n * L * C;
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t i = 0; i < L; ++i)
        row_in_bwd_stats(xp + o + i * C, gp + o + i * C, mp + n * C, ip + n * C, f1.data(), f2.data(), C, slope);
      for (int64_t c = 0; c < C; ++c) {
        f1[c] /= L;
        f2[c] /= L;
      }
      for (int64_t i = 0; i < L; ++i)
        row_in_dx(xp + o + i * C, gp + o + i * C, mp + n * C, ip + n * C, f1.data(), f2.data(), dp + o + i * C, C,
                  slope);
    }
  });
  return dx;
}
"""

_lock = threading.Lock()
_ext = None
_failed = ""
_enabled = True


def set_fused(enabled: bool) -> None:
    """Switch the fused kernel on or off process-wide (off: batch norm then the activation, as
    ``nn`` does; ``benchmarks/bench_train.py`` times its naive reference and ablation that way)."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


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
                    name=f"cxr_norm_act_{cap.lower()}_v6",
                    cpp_sources=_SRC,
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
                    # build (no mask registers, unlike AVX-512) kept the loops scalar and ran 2-5x
                    # slower than eager PyTorch (docs/benchmarks.md). Values are unchanged: no
                    # reassociation beyond the marked `omp simd` reductions; sqrt skips errno only
                    extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *flags.get(cap, [])],
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
            _enabled
            and self.training
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
            _enabled
            and not self.affine
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
    """Turn a MONAI ``ADN`` (``N``: ``BatchNorm2d`` or a plain ``InstanceNorm2d``, then ``A``:
    ``ReLU``/``LeakyReLU``, no dropout) into one fused module in place: same ``state_dict``.
    False (and unchanged) when the block is anything else."""
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
    adn.N.__class__ = cls
    adn.N.negative_slope = slope
    adn.A = nn.Identity()
    return True

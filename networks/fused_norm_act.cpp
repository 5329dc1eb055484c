// Batch/instance norm + (Leaky)ReLU in one pass over memory: networks/fused.py builds this with
// torch.utils.cpp_extension on first use and documents what each function computes.
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

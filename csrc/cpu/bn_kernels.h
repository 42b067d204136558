// Per-channel BatchNorm passes on the CPU, shared by the standalone BN ops and
// the fused conv_bn_relu op.
//
// Two layouts of an [N, C, H, W] activation are read as they are:
//  * NCHW: a "plane" is a contiguous run of one (image, channel) pair, H*W
//    values or part of them (the im2col epilogues pass tiles of one);
//  * NHWC (channels_last): a "row" is one position's C channels, and the
//    kernels take blocks of kRows rows, vectorised over the channels.
//
// The leaf kernels (a plane, a block of rows) are CNNOPS_VECTORISED: built for
// AVX-512, AVX2 and the baseline, picked at load time. Their loops are
// branch-free in the body so that the compiler vectorises them. Sums are taken
// in blocks: within a block in T (across `omp simd` lanes in a plane, in
// registers per channel in a row block), and the block totals in double, which
// keeps the error near T's epsilon at any length.
//
// The whole-activation passes at the end (channel_moments, channel_affine,
// channel_grad_sums, channel_grad_apply) run the kernels in parallel over
// either layout; the ops call those.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "vectorised.h"

namespace cnnops {
namespace cpu {

// ---- sums and moments ---------------------------------------------------------

constexpr int64_t kBlock = 1024;

// (sum over i of a_i, sum over i of b_i) for i < len, where terms(i) returns
// the pair (a_i, b_i) in T.
// (Always inlined: GCC vectorises the loop inlined into its caller, not an
// out-of-line copy that reaches the terms through a closure pointer.)
template <typename T, typename Terms>
C10_ALWAYS_INLINE std::pair<double, double> blocked_sums(int64_t len, const Terms& terms) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min(len, b + kBlock);
    T a1 = T(0), a2 = T(0);
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = b; i < e; ++i) {
      const std::pair<T, T> t = terms(i);
      a1 += t.first;
      a2 += t.second;
    }
    s1 += a1;
    s2 += a2;
  }
  return {s1, s2};
}

// s1[c] += sum of terms(r, c).first and (when kTwo) s2[c] += sum of
// terms(r, c).second over the rows r in [r0, r1), for every channel c < C. The
// rows are read in memory order, kUnroll at a time: their terms are added in
// registers and then to s1 and s2, which stay in L1. (Adding each row to s1
// and s2 directly waits on the previous row's store every time; summing a
// group of channels in registers over all the rows instead reads with a stride
// of C values, which maps the rows to a few L1 sets. Both measured slower.)
template <typename T, bool kTwo, typename Terms>
C10_ALWAYS_INLINE void column_sums(int64_t r0, int64_t r1, int64_t C, T* s1, T* s2,
                                   const Terms& terms) {
  constexpr int64_t kUnroll = 4;
  int64_t r = r0;
  for (; r + kUnroll <= r1; r += kUnroll) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const std::pair<T, T> t0 = terms(r, c), t1 = terms(r + 1, c), t2 = terms(r + 2, c),
                            t3 = terms(r + 3, c);
      s1[c] += (t0.first + t1.first) + (t2.first + t3.first);
      if constexpr (kTwo) s2[c] += (t0.second + t1.second) + (t2.second + t3.second);
    }
  }
  for (; r < r1; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const std::pair<T, T> t = terms(r, c);
      s1[c] += t.first;
      if constexpr (kTwo) s2[c] += t.second;
    }
  }
}

// Count, mean and sum of squared deviations of a set of values; two sets merge
// with Chan et al.'s parallel update, which stays accurate when the mean is
// large relative to the spread (E[x^2] - E[x]^2 does not).
struct Moments {
  int64_t count = 0;
  double mean = 0.0;
  double m2 = 0.0;

  void merge(const Moments& o) {
    if (o.count == 0) return;
    if (count == 0) { *this = o; return; }
    const int64_t n = count + o.count;
    const double delta = o.mean - mean;
    mean += delta * static_cast<double>(o.count) / static_cast<double>(n);
    m2 += o.m2 + delta * delta * static_cast<double>(count) *
                     static_cast<double>(o.count) / static_cast<double>(n);
    count = n;
  }
  double biased_var() const { return count > 0 ? m2 / static_cast<double>(count) : 0.0; }
};

// The moments of n values from sd = sum(d) and sd2 = sum(d^2), d = x - mt:
// with n values, sum((x - mean)^2) = sum(d^2) - sum(d)^2 / n exactly, so the
// rounding of the shift mt costs no accuracy.
inline Moments shifted_moments(int64_t n, double mt, double sd, double sd2) {
  const double dn = static_cast<double>(n);
  return {n, mt + sd / dn, std::max(0.0, sd2 - sd * sd / dn)};
}

// Two passes over one plane (it is in cache after the first): the mean, then
// the deviations from it rounded to T.
template <typename T>
CNNOPS_VECTORISED Moments plane_moments(const T* x, int64_t len) {
  if (len == 0) return Moments();
  const double mean =
      blocked_sums<T>(len, [&](int64_t i) { return std::pair<T, T>(x[i], T(0)); }).first /
      static_cast<double>(len);
  const T mt = static_cast<T>(mean);
  const auto [sd, sd2] = blocked_sums<T>(len, [&](int64_t i) {
    const T d = x[i] - mt;
    return std::pair<T, T>(d, d * d);
  });
  return shifted_moments(len, static_cast<double>(mt), sd, sd2);
}

// Planes of fewer values than this (4x4 and smaller) have their channel's
// moments taken over all its planes at once (small_planes_moments).
constexpr int64_t kSmallPlane = 32;

// The moments of one channel's N planes of P values each, `stride` apart, as
// one set: two passes summed in double, no per-plane Moments. (Merging a
// 4-value plane's moments costs two divisions, and the two vector loops of
// plane_moments are mostly set-up at that size: with them the statistics of a
// [2, 1000, 2, 2] activation took longer than the rest of its BatchNorm.)
template <typename T>
CNNOPS_VECTORISED Moments small_planes_moments(const T* x, int64_t N, int64_t stride, int64_t P) {
  double sum = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < P; ++i) sum += x[n * stride + i];
  }
  const T mt = static_cast<T>(sum / static_cast<double>(N * P));
  double sd = 0.0, sd2 = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < P; ++i) {
      const T d = x[n * stride + i] - mt;
      sd += d;
      sd2 += static_cast<double>(d) * d;
    }
  }
  return shifted_moments(N * P, static_cast<double>(mt), sd, sd2);
}

// The same for each channel of rows [r0, r1) of an [rows, C] array: the mean
// into mean[0..C), the squared deviations into m2[0..C); s1, s2 and mt are C
// values of scratch.
template <typename T>
CNNOPS_VECTORISED void block_moments(const T* x, int64_t C, int64_t r0, int64_t r1,
                                     double* mean, double* m2, T* s1, T* s2, T* mt) {
  const int64_t n = r1 - r0;
  std::fill(s1, s1 + C, T(0));
  column_sums<T, false>(r0, r1, C, s1, s2, [&](int64_t r, int64_t c) {
    return std::pair<T, T>(x[r * C + c], T(0));
  });
  for (int64_t c = 0; c < C; ++c) {
    mt[c] = static_cast<T>(static_cast<double>(s1[c]) / static_cast<double>(n));
  }
  std::fill(s1, s1 + C, T(0));
  std::fill(s2, s2 + C, T(0));
  column_sums<T, true>(r0, r1, C, s1, s2, [&](int64_t r, int64_t c) {
    const T d = x[r * C + c] - mt[c];
    return std::pair<T, T>(d, d * d);
  });
  for (int64_t c = 0; c < C; ++c) {
    const Moments m = shifted_moments(n, mt[c], s1[c], s2[c]);
    mean[c] = m.mean;
    m2[c] = m.m2;
  }
}

// ---- forward: y = relu?(x * scale + shift + residual?) ------------------------

// A coefficient of the per-element loops below: one value for a whole NCHW
// plane (a scalar), or one per element of an NHWC row (a pointer to C values,
// one per channel). The same loop serves both layouts.
template <typename T>
inline T coef_at(T v, int64_t) { return v; }
template <typename T>
inline T coef_at(const T* v, int64_t i) { return v[i]; }

// y = relu?(x * scale + shift + residual?) over len values; y may alias x.
// relu(NaN) is NaN, as in torch (NaN <= 0 is false).
template <typename T, typename K>
C10_ALWAYS_INLINE void bn_forward_run(const T* x, const T* residual, T* y, int64_t len,
                                      K scale, K shift, bool relu) {
  const auto run = [&](auto with_residual, auto with_relu) {
    for (int64_t i = 0; i < len; ++i) {
      T v = x[i] * coef_at(scale, i) + coef_at(shift, i);
      if constexpr (decltype(with_residual)::value) v += residual[i];
      if constexpr (decltype(with_relu)::value) v = v <= T(0) ? T(0) : v;
      y[i] = v;
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (residual) {
    relu ? run(yes{}, yes{}) : run(yes{}, no{});
  } else {
    relu ? run(no{}, yes{}) : run(no{}, no{});
  }
}

// One plane, one scale and shift.
template <typename T>
CNNOPS_VECTORISED void bn_forward_plane(const T* x, const T* residual, T* y, int64_t len,
                                        T scale, T shift, bool relu) {
  bn_forward_run(x, residual, y, len, scale, shift, relu);
}

// Rows [r0, r1) of [rows, C] arrays, a scale and shift per channel.
template <typename T>
CNNOPS_VECTORISED void bn_forward_rows(const T* x, const T* residual, T* y, int64_t C,
                                       int64_t r0, int64_t r1, const T* scale,
                                       const T* shift, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    bn_forward_run(x + off, residual ? residual + off : nullptr, y + off, C, scale, shift,
                   relu);
  }
}

// ---- backward -----------------------------------------------------------------

// The gradient reaching the BN output: grad, masked by ReLU when `out` is
// given (out > 0; a NaN output passes no gradient, as in torch).
template <typename T>
inline T relu_grad(T grad, T out) {
  return out > T(0) ? grad : T(0);
}

// dst = relu_grad(grad, out) over len values (a copy when out is null).
template <typename T>
CNNOPS_VECTORISED void relu_grad_plane(const T* grad, const T* out, T* dst, int64_t len) {
  if (out == nullptr) {
    std::copy(grad, grad + len, dst);
    return;
  }
  for (int64_t i = 0; i < len; ++i) dst[i] = relu_grad(grad[i], out[i]);
}

// sum(gy) and sum(gy * (x - mean)) over one plane, gy = relu_grad(grad, out),
// added to sum_gy and sum_gy_xc (x may be null: the second sum is then 0).
template <typename T>
CNNOPS_VECTORISED void bn_backward_reduce_plane(const T* grad, const T* out, const T* x,
                                                int64_t len, double mean, double& sum_gy,
                                                double& sum_gy_xc) {
  const T mt = static_cast<T>(mean);
  const auto run = [&](auto with_out) {
    const auto gy = [&](int64_t i) {
      if constexpr (decltype(with_out)::value) return relu_grad(grad[i], out[i]);
      else return grad[i];
    };
    if (x == nullptr) {
      return blocked_sums<T>(len, [&](int64_t i) { return std::pair<T, T>(gy(i), T(0)); });
    }
    return blocked_sums<T>(len, [&](int64_t i) {
      const T g = gy(i);
      return std::pair<T, T>(g, g * (x[i] - mt));
    });
  };
  const auto [s, sx] = out ? run(std::true_type{}) : run(std::false_type{});
  sum_gy += s;
  // The deviations were taken from mean rounded to T: shift them back.
  sum_gy_xc += sx + (static_cast<double>(mt) - mean) * s;
}

// The same sums for each channel of rows [r0, r1) of [rows, C] arrays, in T,
// added to s1[0..C) and s2[0..C); deviations from mt[c] (mean rounded to T).
template <typename T>
CNNOPS_VECTORISED void block_grad_sums(const T* grad, const T* out, const T* x, int64_t C,
                                       int64_t r0, int64_t r1, const T* mt, T* s1, T* s2) {
  const auto run = [&](auto with_out, auto with_x) {
    column_sums<T, decltype(with_x)::value>(r0, r1, C, s1, s2, [&](int64_t r, int64_t c) {
      const int64_t i = r * C + c;
      T g = grad[i];
      if constexpr (decltype(with_out)::value) g = relu_grad(g, out[i]);
      if constexpr (decltype(with_x)::value) return std::pair<T, T>(g, g * (x[i] - mt[c]));
      else return std::pair<T, T>(g, T(0));
    });
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (x) {
    out ? run(yes{}, yes{}) : run(no{}, yes{});
  } else {
    out ? run(yes{}, no{}) : run(no{}, no{});
  }
}

// Input gradient of BN as one affine map per channel:
//   gx = a * gy + b * (x - mean) + c
// training: a = w*invstd, b = -w*invstd^3 * sum(gy*(x-mean)) / M,
//           c = -w*invstd * sum(gy) / M
// inference: a = w*invstd, b = c = 0 (x is not read then and may be null).
struct BNBackwardCoef {
  double a = 0.0, b = 0.0, c = 0.0;
};

inline BNBackwardCoef bn_backward_coef(bool training, double w, double invstd,
                                       double sum_gy, double sum_gy_xc,
                                       int64_t count) {
  BNBackwardCoef k;
  k.a = w * invstd;
  if (training && count > 0) {
    const double m = static_cast<double>(count);
    k.b = -w * invstd * invstd * invstd * sum_gy_xc / m;
    k.c = -k.a * sum_gy / m;
  }
  return k;
}

// gx = a * gy + b * (x - mu) + c over len values; x is read only when with_x.
template <typename T, typename K>
C10_ALWAYS_INLINE void bn_backward_apply_run(const T* grad, const T* out, const T* x, T* gx,
                                             int64_t len, K a, K b, K c, K mu, bool with_x) {
  const auto run = [&](auto with_out, auto read_x) {
    for (int64_t i = 0; i < len; ++i) {
      T g = grad[i];
      if constexpr (decltype(with_out)::value) g = relu_grad(g, out[i]);
      T v = coef_at(a, i) * g;
      if constexpr (decltype(read_x)::value) v += coef_at(b, i) * (x[i] - coef_at(mu, i));
      gx[i] = v + coef_at(c, i);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (!with_x) {
    out ? run(yes{}, no{}) : run(no{}, no{});
  } else {
    out ? run(yes{}, yes{}) : run(no{}, yes{});
  }
}

// One plane, one channel's coefficients.
template <typename T>
CNNOPS_VECTORISED void bn_backward_apply_plane(const T* grad, const T* out, const T* x, T* gx,
                                               int64_t len, const BNBackwardCoef& k,
                                               double mean) {
  bn_backward_apply_run(grad, out, x, gx, len, static_cast<T>(k.a), static_cast<T>(k.b),
                        static_cast<T>(k.c), static_cast<T>(mean),
                        x != nullptr && k.b != 0.0);
}

// Rows [r0, r1) of [rows, C] arrays, the coefficients a, b, c and mean mu per
// channel (C values each).
template <typename T>
CNNOPS_VECTORISED void bn_backward_apply_rows(const T* grad, const T* out, const T* x, T* gx,
                                              int64_t C, int64_t r0, int64_t r1, const T* a,
                                              const T* b, const T* c, const T* mu,
                                              bool with_x) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    bn_backward_apply_run(grad + off, out ? out + off : nullptr, x ? x + off : nullptr,
                          gx + off, C, a, b, c, mu, with_x);
  }
}

// The C values of an optional [C] tensor (contiguous, of type T) in double,
// or C times `fallback` when it is absent. (Read once per call: a tensor's
// data pointer checks its dtype and storage each time it is taken, which over
// every channel of a 512-channel layer cost more than a small BN pass.)
template <typename T>
std::vector<double> channel_values(const at::Tensor& t, int64_t C, double fallback) {
  std::vector<double> v(C, fallback);
  if (t.defined()) {
    const T* p = t.const_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(p[c]);
  }
  return v;
}

// ---- whole activations, in either layout ------------------------------------

// An [N, C, H, W] activation, contiguous in NCHW (N*C planes of P = H*W values)
// or in NHWC (N*P rows of C values). (When C == 1 or H == W == 1 both layouts
// are the same bytes, and either reading is right.)
struct Activation {
  int64_t N, C, P;
  bool nhwc;

  // t is contiguous in fmt.
  Activation(const at::Tensor& t, at::MemoryFormat fmt)
      : N(t.size(0)), C(t.size(1)), P(t.size(2) * t.size(3)),
        nhwc(fmt == at::MemoryFormat::ChannelsLast) {}
  int64_t rows() const { return N * P; }
};

// Rows per NHWC block: each channel sums kRows values in T before the block
// total goes to double, the per-lane count of blocked_sums (kBlock over 8
// lanes), so both layouts keep the same accuracy.
constexpr int64_t kRows = 128;

// Runs f(block, first row, end row) for every NHWC block of rows, in parallel.
template <typename F>
void for_each_row_block(const Activation& a, const F& f) {
  const int64_t blocks = (a.rows() + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kRows * a.C + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k, k * kRows, std::min(a.rows(), (k + 1) * kRows));
  });
}

// Mean and squared deviations of each channel. NCHW: each channel's planes in
// image order. NHWC: each row block's, combined in block order. Neither
// depends on the thread count.
template <typename T>
std::vector<Moments> channel_moments(const T* x, const Activation& a) {
  const int64_t C = a.C, P = a.P;
  std::vector<Moments> m(C);
  if (!a.nhwc) {
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        if (P < kSmallPlane) {
          m[c] = small_planes_moments(x + c * P, a.N, C * P, P);
          continue;
        }
        for (int64_t n = 0; n < a.N; ++n) m[c].merge(plane_moments(x + (n * C + c) * P, P));
      }
    });
    return m;
  }
  // Block k's means and squared deviations at [k * C, (k + 1) * C), combined
  // as the whole set's mean, then m2 = sum over blocks of m2_k + n_k * (mean_k
  // - mean)^2: exact, and vectorised over the channels (a merge per block and
  // channel, with its divisions, cost as much as the blocks themselves).
  const int64_t blocks = (a.rows() + kRows - 1) / kRows;
  std::vector<double> bmean(blocks * C), bm2(blocks * C);
  for_each_row_block(a, [&](int64_t k, int64_t r0, int64_t r1) {
    std::vector<T> scratch(3 * C);
    block_moments(x, C, r0, r1, bmean.data() + k * C, bm2.data() + k * C, scratch.data(),
                  scratch.data() + C, scratch.data() + 2 * C);
  });
  std::vector<double> mean(C, 0.0), m2(C, 0.0);
  const auto count = [&](int64_t k) {
    return static_cast<double>(std::min(a.rows(), (k + 1) * kRows) - k * kRows);
  };
  for (int64_t k = 0; k < blocks; ++k) {
    const double n = count(k);
    const double* bk = bmean.data() + k * C;
    for (int64_t c = 0; c < C; ++c) mean[c] += n * bk[c];
  }
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<double>(a.rows());
  for (int64_t k = 0; k < blocks; ++k) {
    const double n = count(k);
    const double *bk = bmean.data() + k * C, *mk = bm2.data() + k * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = bk[c] - mean[c];
      m2[c] += mk[c] + n * d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) m[c] = {a.rows(), mean[c], std::max(0.0, m2[c])};
  return m;
}

// y = relu?(x * scale[c] + shift[c] + residual?) over the activation (residual
// in the same layout, or null); y may alias x.
template <typename T>
void channel_affine(const T* x, const T* residual, T* y, const Activation& a,
                    const std::vector<double>& scale, const std::vector<double>& shift,
                    bool relu) {
  const int64_t C = a.C, P = a.P;
  if (!a.nhwc) {
    at::parallel_for(0, a.N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C, off = plane * P;
        bn_forward_plane(x + off, residual ? residual + off : nullptr, y + off, P,
                         static_cast<T>(scale[c]), static_cast<T>(shift[c]), relu);
      }
    });
    return;
  }
  const std::vector<T> sc(scale.begin(), scale.end()), sh(shift.begin(), shift.end());
  for_each_row_block(a, [&](int64_t, int64_t r0, int64_t r1) {
    bn_forward_rows(x, residual, y, C, r0, r1, sc.data(), sh.data(), relu);
  });
}

// Per channel, sum(gy) and sum(gy * (x - mean)), gy = relu_grad(grad, out)
// (out may be null; x may be null, and the second sum is then 0).
template <typename T>
void channel_grad_sums(const T* grad, const T* out, const T* x, const Activation& a,
                       const std::vector<double>& mean, std::vector<double>& sum_gy,
                       std::vector<double>& sum_gy_xc) {
  const int64_t C = a.C, P = a.P;
  sum_gy.assign(C, 0.0);
  sum_gy_xc.assign(C, 0.0);
  if (!a.nhwc) {
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        for (int64_t n = 0; n < a.N; ++n) {
          const int64_t off = (n * C + c) * P;
          bn_backward_reduce_plane(grad + off, out ? out + off : nullptr,
                                   x ? x + off : nullptr, P, mean[c], sum_gy[c],
                                   sum_gy_xc[c]);
        }
      }
    });
    return;
  }
  const int64_t blocks = (a.rows() + kRows - 1) / kRows;
  std::vector<T> part(blocks * C * 2, T(0));  // block k: C sums of gy, then C of gy*(x-mean)
  const std::vector<T> mt(mean.begin(), mean.end());
  for_each_row_block(a, [&](int64_t k, int64_t r0, int64_t r1) {
    T* s = part.data() + k * C * 2;
    block_grad_sums(grad, out, x, C, r0, r1, mt.data(), s, s + C);
  });
  at::parallel_for(0, C, 16, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double s = 0.0, sx = 0.0;
      for (int64_t k = 0; k < blocks; ++k) {
        s += part[k * C * 2 + c];
        sx += part[k * C * 2 + C + c];
      }
      sum_gy[c] = s;
      // The deviations were taken from mean rounded to T: shift them back.
      sum_gy_xc[c] = x ? sx + (static_cast<double>(mt[c]) - mean[c]) * s : 0.0;
    }
  });
}

// gx = coef.a * gy + coef.b * (x - mean) + coef.c per channel over the
// activation (x is read only where some b is nonzero; it may then not be null).
template <typename T>
void channel_grad_apply(const T* grad, const T* out, const T* x, T* gx, const Activation& a,
                        const std::vector<BNBackwardCoef>& coef,
                        const std::vector<double>& mean) {
  const int64_t C = a.C, P = a.P;
  if (!a.nhwc) {
    at::parallel_for(0, a.N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C, off = plane * P;
        bn_backward_apply_plane(grad + off, out ? out + off : nullptr, x ? x + off : nullptr,
                                gx + off, P, coef[c], mean[c]);
      }
    });
    return;
  }
  std::vector<T> ka(C), kb(C), kc(C), mu(C);
  bool with_x = false;
  for (int64_t c = 0; c < C; ++c) {
    ka[c] = static_cast<T>(coef[c].a);
    kb[c] = static_cast<T>(coef[c].b);
    kc[c] = static_cast<T>(coef[c].c);
    mu[c] = static_cast<T>(mean[c]);
    with_x = with_x || coef[c].b != 0.0;
  }
  with_x = with_x && x != nullptr;
  for_each_row_block(a, [&](int64_t, int64_t r0, int64_t r1) {
    bn_backward_apply_rows(grad, out, x, gx, C, r0, r1, ka.data(), kb.data(), kc.data(),
                           mu.data(), with_x);
  });
}

// dst = relu_grad(grad, out) over a whole tensor (all three in one layout).
template <typename T>
void relu_grad_all(const T* grad, const T* out, T* dst, int64_t numel) {
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
    relu_grad_plane(grad + b, out ? out + b : nullptr, dst + b, e - b);
  });
}

}  // namespace cpu
}  // namespace cnnops

// Per-channel BatchNorm building blocks on contiguous runs of one channel,
// shared by the standalone BN op and the fused conv_bn_relu op.
//
// A "plane" is a contiguous run of one (image, channel) pair: H*W values of an
// NCHW tensor, or part of them. Every loop here is branch-free in its body so
// the compiler vectorises it. Sums are taken in blocks of kBlock values: within
// a block in T, across `omp simd` lanes (so they vectorise too), and the block
// totals in double, which keeps the error near T's epsilon at any length.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace cnnops {
namespace cpu {

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

// Two passes over one plane (it is in cache after the first): the mean, then
// the deviations from it rounded to T, d = x - mean_T. With n values,
// sum((x - mean)^2) = sum(d^2) - sum(d)^2 / n exactly, so the rounding of the
// mean costs no accuracy.
template <typename T>
Moments plane_moments(const T* x, int64_t len) {
  Moments m;
  if (len == 0) return m;
  const double n = static_cast<double>(len);
  m.count = len;
  m.mean = blocked_sums<T>(len, [&](int64_t i) { return std::pair<T, T>(x[i], T(0)); }).first / n;
  const T mt = static_cast<T>(m.mean);
  const auto [sd, sd2] = blocked_sums<T>(len, [&](int64_t i) {
    const T d = x[i] - mt;
    return std::pair<T, T>(d, d * d);
  });
  m.m2 = std::max(0.0, sd2 - sd * sd / n);
  return m;
}

// y = relu?(x * scale + shift + residual?) over one plane; y may alias x.
// relu(NaN) is NaN, as in torch (NaN <= 0 is false).
template <typename T>
void bn_forward_plane(const T* x, const T* residual, T* y, int64_t len, T scale,
                      T shift, bool relu) {
  const auto run = [&](auto with_residual, auto with_relu) {
    for (int64_t i = 0; i < len; ++i) {
      T v = x[i] * scale + shift;
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

// The gradient reaching the BN output: grad, masked by ReLU when `out` is
// given (out > 0; a NaN output passes no gradient, as in torch).
template <typename T>
inline T relu_grad(T grad, T out) {
  return out > T(0) ? grad : T(0);
}

// dst = relu_grad(grad, out) over one plane (a copy when out is null).
template <typename T>
void relu_grad_plane(const T* grad, const T* out, T* dst, int64_t len) {
  if (out == nullptr) {
    std::copy(grad, grad + len, dst);
    return;
  }
  for (int64_t i = 0; i < len; ++i) dst[i] = relu_grad(grad[i], out[i]);
}

// sum(gy) and sum(gy * (x - mean)) over one plane, gy = relu_grad(grad, out),
// added to sum_gy and sum_gy_xc (x may be null: the second sum is then 0).
template <typename T>
void bn_backward_reduce_plane(const T* grad, const T* out, const T* x,
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

template <typename T>
void bn_backward_apply_plane(const T* grad, const T* out, const T* x, T* gx,
                             int64_t len, const BNBackwardCoef& k, double mean) {
  const T a = static_cast<T>(k.a), b = static_cast<T>(k.b), c = static_cast<T>(k.c);
  const T mu = static_cast<T>(mean);
  const auto run = [&](auto with_out, auto with_x) {
    for (int64_t i = 0; i < len; ++i) {
      T g = grad[i];
      if constexpr (decltype(with_out)::value) g = relu_grad(g, out[i]);
      T v = a * g;
      if constexpr (decltype(with_x)::value) v += b * (x[i] - mu);
      gx[i] = v + c;
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (x == nullptr || k.b == 0.0) {
    out ? run(yes{}, no{}) : run(no{}, no{});
  } else {
    out ? run(yes{}, yes{}) : run(no{}, yes{});
  }
}

// Per-channel value of an optional [C] tensor, or `fallback` when absent.
template <typename T>
inline double channel_value(const at::Tensor& t, int64_t c, double fallback) {
  return t.defined() ? static_cast<double>(t.const_data_ptr<T>()[c]) : fallback;
}

}  // namespace cpu
}  // namespace cnnops

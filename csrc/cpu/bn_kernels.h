// Per-channel BatchNorm building blocks on contiguous planes, shared by the
// standalone BN op and the fused conv_bn_relu op.
//
// A "plane" is the contiguous run of one (image, channel) pair: H*W values of
// an NCHW tensor. Statistics are accumulated in double.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace cnnops {
namespace cpu {

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

// Two passes over one plane (it is in cache after the first).
template <typename T>
Moments plane_moments(const T* x, int64_t len) {
  Moments m;
  if (len == 0) return m;
  double sum = 0.0;
  for (int64_t i = 0; i < len; ++i) sum += x[i];
  m.count = len;
  m.mean = sum / static_cast<double>(len);
  double m2 = 0.0;
  for (int64_t i = 0; i < len; ++i) {
    const double d = static_cast<double>(x[i]) - m.mean;
    m2 += d * d;
  }
  m.m2 = m2;
  return m;
}

// y = relu?(x * scale + shift + residual?) over one plane; y may alias x.
template <typename T>
void bn_forward_plane(const T* x, const T* residual, T* y, int64_t len, T scale,
                      T shift, bool relu) {
  if (residual) {
    for (int64_t i = 0; i < len; ++i) {
      const T v = x[i] * scale + shift + residual[i];
      y[i] = relu && !(v > T(0)) && !std::isnan(v) ? T(0) : v;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const T v = x[i] * scale + shift;
      y[i] = relu && !(v > T(0)) && !std::isnan(v) ? T(0) : v;
    }
  }
}

// The gradient reaching the BN output: grad, masked by ReLU when `out` is given.
template <typename T>
inline T relu_grad(const T* grad, const T* out, int64_t i) {
  return (out == nullptr || out[i] > T(0)) ? grad[i] : T(0);
}

// sum(gy) and sum(gy * (x - mean)) over one plane, gy = relu_grad(grad, out).
template <typename T>
void bn_backward_reduce_plane(const T* grad, const T* out, const T* x,
                              int64_t len, double mean, double& sum_gy,
                              double& sum_gy_xc) {
  double s = 0.0, sx = 0.0;
  for (int64_t i = 0; i < len; ++i) {
    const double gy = relu_grad(grad, out, i);
    s += gy;
    if (x) sx += gy * (static_cast<double>(x[i]) - mean);
  }
  sum_gy += s;
  sum_gy_xc += sx;
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
  if (x == nullptr || k.b == 0.0) {
    for (int64_t i = 0; i < len; ++i) gx[i] = a * relu_grad(grad, out, i) + c;
  } else {
    for (int64_t i = 0; i < len; ++i)
      gx[i] = a * relu_grad(grad, out, i) + b * (x[i] - mu) + c;
  }
}

// Per-channel value of an optional [C] tensor, or `fallback` when absent.
template <typename T>
inline double channel_value(const at::Tensor& t, int64_t c, double fallback) {
  return t.defined() ? static_cast<double>(t.const_data_ptr<T>()[c]) : fallback;
}

}  // namespace cpu
}  // namespace cnnops

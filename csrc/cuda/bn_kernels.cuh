// Per-channel BatchNorm building blocks on the GPU, shared by the standalone
// BN ops (batch_norm.cu) and the fused conv_bn_relu op (conv_bn_relu.cu).
//
// Two layouts of an activation tensor [B, C, L] (L = H*W) are supported:
//  * "planes": the L values of each (image b, channel c) pair are contiguous,
//    at b*sB + c*sC. NCHW-contiguous is sB = C*L, sC = L.
//  * "rows": NHWC, a dense [M = B*L, C] matrix, channels contiguous.
// Planes kernels give each thread block one (b, c) plane at a time, so the
// per-channel constants are loaded once per plane; rows kernels use 2-D
// blocks, threadIdx.x along the channels (coalesced) and threadIdx.y along
// the rows. Neither divides per element.
//
// Reductions are deterministic: each block reduces a fixed slice of one
// channel (or of 32 channels) into a partial result in a fixed order, and a
// second kernel merges a channel's partials in split order. Batch statistics
// use Welford's update within a thread and Chan et al.'s merge across
// threads and blocks, in at::acc_type (float for half/bfloat16/float,
// double for double).
#pragma once

#include "common.cuh"

namespace cnnops {
namespace gpu {

// ---- Welford / Chan moments --------------------------------------------------

template <typename acc_t>
struct Moments {
  acc_t mean;
  acc_t m2;
  int64_t n;

  __device__ __forceinline__ void reset() {
    mean = acc_t(0);
    m2 = acc_t(0);
    n = 0;
  }
  __device__ __forceinline__ void push(acc_t x) {
    ++n;
    const acc_t delta = x - mean;
    mean += delta / static_cast<acc_t>(n);
    m2 += delta * (x - mean);
  }
  // Chan et al.: merging (n_a, mean_a, m2_a) and (n_b, mean_b, m2_b) gives
  // mean = mean_a + delta * n_b / n, m2 = m2_a + m2_b + delta^2 * n_a * n_b / n.
  __device__ __forceinline__ void merge(acc_t o_mean, acc_t o_m2, int64_t o_n) {
    if (o_n == 0) return;
    if (n == 0) {
      mean = o_mean;
      m2 = o_m2;
      n = o_n;
      return;
    }
    const int64_t total = n + o_n;
    const acc_t delta = o_mean - mean;
    const acc_t w = static_cast<acc_t>(o_n) / static_cast<acc_t>(total);
    mean += delta * w;
    m2 += o_m2 + delta * delta * static_cast<acc_t>(n) * w;
    n = total;
  }
  // Merges in the value held by the lane `offset` above (warp shuffle).
  __device__ __forceinline__ void merge_down(int offset) {
    const acc_t o_mean = __shfl_down_sync(0xffffffffu, mean, offset);
    const acc_t o_m2 = __shfl_down_sync(0xffffffffu, m2, offset);
    const long long o_n = __shfl_down_sync(0xffffffffu, static_cast<long long>(n), offset);
    merge(o_mean, o_m2, static_cast<int64_t>(o_n));
  }
};

// Block of the planes reductions: blockDim.x along a plane, blockDim.y along
// the images; kThreads threads in all.
inline dim3 planes_block(int64_t L) {
  const int bx = pow2_clamp(L, kWarp, kThreads);
  return dim3(bx, kThreads / bx);
}

// Block of the rows reductions: 32 channels by 8 rows.
constexpr int kRowsX = 32;
constexpr int kRowsY = 8;

// Block of the elementwise rows kernels: threadIdx.x along up to 256
// channels, threadIdx.y along rows.
inline dim3 rows_block(int64_t C) {
  const int bx = pow2_clamp(C, kWarp, kThreads);
  return dim3(bx, kThreads / bx);
}

// Merges the Moments of all threads of a block (blockDim.x * blockDim.y,
// a multiple of 32, at most 1024) into thread 0's. Deterministic: the order
// of the shuffles and of the warp partials is fixed.
template <typename acc_t>
__device__ void block_merge(Moments<acc_t>& m) {
  __shared__ acc_t s_mean[32];
  __shared__ acc_t s_m2[32];
  __shared__ int64_t s_n[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int warps = (blockDim.x * blockDim.y) / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) m.merge_down(offset);
  if (lane == 0) {
    s_mean[warp] = m.mean;
    s_m2[warp] = m.m2;
    s_n[warp] = m.n;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < warps) {
      m.mean = s_mean[lane];
      m.m2 = s_m2[lane];
      m.n = s_n[lane];
    } else {
      m.reset();
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) m.merge_down(offset);
  }
}

// Sums two values over all threads of a block into thread 0's.
template <typename acc_t>
__device__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t s_a[32];
  __shared__ acc_t s_b[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int warps = (blockDim.x * blockDim.y) / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? s_a[lane] : acc_t(0);
    b = lane < warps ? s_b[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
  }
}

// Partial moments of channel blockIdx.x over the images n = split, split + S,
// ... (in units of blockDim.y images), split = blockIdx.y, S = gridDim.y.
// Writes partial[c * S + split].
template <typename scalar_t, typename acc_t>
__global__ void moments_planes_kernel(const scalar_t* __restrict__ x, int64_t sB, int64_t sC,
                                      int64_t B, int64_t L, acc_t* __restrict__ p_mean,
                                      acc_t* __restrict__ p_m2, int64_t* __restrict__ p_n) {
  const int64_t c = blockIdx.x;
  const int64_t S = gridDim.y;
  Moments<acc_t> m;
  m.reset();
  for (int64_t b = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; b < B;
       b += S * blockDim.y) {
    const scalar_t* plane = x + b * sB + c * sC;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      m.push(static_cast<acc_t>(plane[l]));
    }
  }
  block_merge(m);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int64_t i = c * S + blockIdx.y;
    p_mean[i] = m.mean;
    p_m2[i] = m.m2;
    p_n[i] = m.n;
  }
}

// Partial moments of channels blockIdx.x * 32 + threadIdx.x over the rows
// m = split * 8 + threadIdx.y, + S * 8, ... of a dense [M, C] matrix.
template <typename scalar_t, typename acc_t>
__global__ void moments_rows_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                    acc_t* __restrict__ p_mean, acc_t* __restrict__ p_m2,
                                    int64_t* __restrict__ p_n) {
  __shared__ acc_t s_mean[kRowsY][kRowsX];
  __shared__ acc_t s_m2[kRowsY][kRowsX];
  __shared__ int64_t s_n[kRowsY][kRowsX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsX + tx;
  const int64_t S = gridDim.y;
  Moments<acc_t> m;
  m.reset();
  if (c < C) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsY + ty; r < M; r += S * kRowsY) {
      m.push(static_cast<acc_t>(x[r * C + c]));
    }
  }
  s_mean[ty][tx] = m.mean;
  s_m2[ty][tx] = m.m2;
  s_n[ty][tx] = m.n;
  __syncthreads();
  for (int half = kRowsY / 2; half > 0; half /= 2) {
    if (ty < half) {
      m.merge(s_mean[ty + half][tx], s_m2[ty + half][tx], s_n[ty + half][tx]);
      s_mean[ty][tx] = m.mean;
      s_m2[ty][tx] = m.m2;
      s_n[ty][tx] = m.n;
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    const int64_t i = c * S + blockIdx.y;
    p_mean[i] = m.mean;
    p_m2[i] = m.m2;
    p_n[i] = m.n;
  }
}

// Per-channel BN constants. Training (p_mean given): merges the S partial
// moments of each channel; inference: reads the running statistics. Writes
// save_mean / save_invstd and the normalisation as y = (x - center) * scale
// + shift, i.e. center = mean, scale = weight * invstd, shift = bias. The
// mean is subtracted before scaling (as aten does) rather than folded into
// the shift: x * scale + (bias - mean * scale) loses all precision when
// |mean| >> std. `conv_bias` (inference only, may be null) is a bias that the
// conv output feeding BN lacks: it shifts the center.
template <typename acc_t>
__global__ void bn_constants_kernel(int64_t C, int64_t S, const acc_t* __restrict__ p_mean,
                                    const acc_t* __restrict__ p_m2,
                                    const int64_t* __restrict__ p_n,
                                    const acc_t* __restrict__ running_mean,
                                    const acc_t* __restrict__ running_var,
                                    const acc_t* __restrict__ weight,
                                    const acc_t* __restrict__ bias,
                                    const acc_t* __restrict__ conv_bias, double eps,
                                    acc_t* __restrict__ save_mean,
                                    acc_t* __restrict__ save_invstd,
                                    acc_t* __restrict__ center, acc_t* __restrict__ scale,
                                    acc_t* __restrict__ shift) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t mean, var;
    if (p_mean != nullptr) {
      Moments<acc_t> m;
      m.reset();
      for (int64_t s = 0; s < S; ++s) m.merge(p_mean[c * S + s], p_m2[c * S + s], p_n[c * S + s]);
      mean = m.mean;
      var = m.n > 0 ? m.m2 / static_cast<acc_t>(m.n) : acc_t(0);  // biased
    } else {
      mean = running_mean[c];
      var = running_var[c];
    }
    const acc_t invstd = acc_t(1) / device_sqrt(var + static_cast<acc_t>(eps));
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    center[c] = mean - (conv_bias != nullptr ? conv_bias[c] : acc_t(0));
    scale[c] = (weight != nullptr ? weight[c] : acc_t(1)) * invstd;
    shift[c] = bias != nullptr ? bias[c] : acc_t(0);
  }
}

// y = relu?((x - center[c]) * scale[c] + shift[c] + residual?) over planes;
// center / scale / shift / residual may be null (0, 1, 0, none). y may alias
// x (same strides).
template <typename scalar_t, typename acc_t>
__global__ void apply_planes_kernel(const scalar_t* x, int64_t x_sB, int64_t x_sC,
                                    const scalar_t* res, int64_t r_sB, int64_t r_sC, scalar_t* y,
                                    int64_t y_sB, int64_t y_sC, const acc_t* __restrict__ center,
                                    const acc_t* __restrict__ scale,
                                    const acc_t* __restrict__ shift, int64_t B, int64_t C,
                                    int64_t L, bool relu) {
  for (int64_t p = blockIdx.x; p < B * C; p += gridDim.x) {
    const int64_t b = p / C, c = p - b * C;
    const acc_t ce = center != nullptr ? center[c] : acc_t(0);
    const acc_t sc = scale != nullptr ? scale[c] : acc_t(1);
    const acc_t sh = shift != nullptr ? shift[c] : acc_t(0);
    const scalar_t* xp = x + b * x_sB + c * x_sC;
    const scalar_t* rp = res != nullptr ? res + b * r_sB + c * r_sC : nullptr;
    scalar_t* yp = y + b * y_sB + c * y_sC;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      acc_t v = (static_cast<acc_t>(xp[l]) - ce) * sc + sh;
      if (rp != nullptr) v += static_cast<acc_t>(rp[l]);
      yp[l] = static_cast<scalar_t>(relu ? relu_keep_nan(v) : v);
    }
  }
}

// The same over a dense [M, C] (NHWC) matrix; y may alias x.
template <typename scalar_t, typename acc_t>
__global__ void apply_rows_kernel(const scalar_t* x, const scalar_t* res, scalar_t* y,
                                  const acc_t* __restrict__ center,
                                  const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, int64_t M, int64_t C,
                                  bool relu) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const int64_t i = r * C + c;
      acc_t v = static_cast<acc_t>(x[i]);
      if (center != nullptr) v -= center[c];
      if (scale != nullptr) v *= scale[c];
      if (shift != nullptr) v += shift[c];
      if (res != nullptr) v += static_cast<acc_t>(res[i]);
      y[i] = static_cast<scalar_t>(relu ? relu_keep_nan(v) : v);
    }
  }
}

// apply_rows_kernel 16 bytes at a time: the dense [M, C] rows walked as flat
// vectors of kVec channels (rows_vectorizable), one division per vector.
template <typename scalar_t, typename acc_t>
__global__ void apply_rows_vec_kernel(const scalar_t* x, const scalar_t* res, scalar_t* y,
                                      const acc_t* __restrict__ center,
                                      const acc_t* __restrict__ scale,
                                      const acc_t* __restrict__ shift, int64_t vectors,
                                      int64_t C, bool relu) {
  constexpr int V = kVec<scalar_t>;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vectors;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t * V, c0 = i % C;
    const Vec16<scalar_t> xv = load16(x + i);
    Vec16<scalar_t> rv{}, out{};
    if (res != nullptr) rv = load16(res + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      acc_t v = static_cast<acc_t>(xv.v[j]);
      if (center != nullptr) v -= center[c];
      if (scale != nullptr) v *= scale[c];
      if (shift != nullptr) v += shift[c];
      if (res != nullptr) v += static_cast<acc_t>(rv.v[j]);
      out.v[j] = static_cast<scalar_t>(relu ? relu_keep_nan(v) : v);
    }
    store16(y + i, out);
  }
}

// The gradient reaching BN's output: grad, masked by the ReLU when the
// forward output is given (zero where output <= 0, as the CPU kernels).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(const scalar_t* g, const scalar_t* o, int64_t i) {
  return (o == nullptr || static_cast<acc_t>(o[i]) > acc_t(0)) ? static_cast<acc_t>(g[i])
                                                                : acc_t(0);
}

// Partial sums of gy and gy * (x - mean[c]) per channel over planes (x may be
// null: the second sum is then zero). g, o and x share the strides sB, sC.
template <typename scalar_t, typename acc_t>
__global__ void bwd_reduce_planes_kernel(const scalar_t* __restrict__ g,
                                         const scalar_t* __restrict__ o,
                                         const scalar_t* __restrict__ x, int64_t sB, int64_t sC,
                                         int64_t B, int64_t L, const acc_t* __restrict__ mean,
                                         acc_t* __restrict__ p_sum, acc_t* __restrict__ p_dot) {
  const int64_t c = blockIdx.x;
  const int64_t S = gridDim.y;
  const acc_t mu = (x != nullptr) ? mean[c] : acc_t(0);
  acc_t sum = 0, dot = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; b < B;
       b += S * blockDim.y) {
    const int64_t off = b * sB + c * sC;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const acc_t gy = masked_grad<scalar_t, acc_t>(g, o, off + l);
      sum += gy;
      if (x != nullptr) dot += gy * (static_cast<acc_t>(x[off + l]) - mu);
    }
  }
  block_sum2(sum, dot);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    p_sum[c * S + blockIdx.y] = sum;
    p_dot[c * S + blockIdx.y] = dot;
  }
}

// The same over a dense [M, C] matrix (32 channels x 8 rows per block).
template <typename scalar_t, typename acc_t>
__global__ void bwd_reduce_rows_kernel(const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ o,
                                       const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                       const acc_t* __restrict__ mean, acc_t* __restrict__ p_sum,
                                       acc_t* __restrict__ p_dot) {
  __shared__ acc_t s_sum[kRowsY][kRowsX];
  __shared__ acc_t s_dot[kRowsY][kRowsX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsX + tx;
  const int64_t S = gridDim.y;
  acc_t sum = 0, dot = 0;
  if (c < C) {
    const acc_t mu = (x != nullptr) ? mean[c] : acc_t(0);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsY + ty; r < M; r += S * kRowsY) {
      const int64_t i = r * C + c;
      const acc_t gy = masked_grad<scalar_t, acc_t>(g, o, i);
      sum += gy;
      if (x != nullptr) dot += gy * (static_cast<acc_t>(x[i]) - mu);
    }
  }
  s_sum[ty][tx] = sum;
  s_dot[ty][tx] = dot;
  __syncthreads();
  for (int half = kRowsY / 2; half > 0; half /= 2) {
    if (ty < half) {
      s_sum[ty][tx] += s_sum[ty + half][tx];
      s_dot[ty][tx] += s_dot[ty + half][tx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    p_sum[c * S + blockIdx.y] = s_sum[0][tx];
    p_dot[c * S + blockIdx.y] = s_dot[0][tx];
  }
}

// Per-channel BN backward constants from the S partial sums of each channel
// (p_sum may be null: no reduction ran, both sums are zero). The input
// gradient is, per channel,
//   gx = a * ((gy - c) - b * (x - mean))
// training: a = w*invstd, b = invstd^2 * sum(gy*(x-mean)) / M, c = sum(gy) / M;
// inference: a = w*invstd, b = c = 0.
// gy is centred before it is scaled, as aten's CUDA kernel does: with few
// values per channel (two, say) the terms nearly cancel, and scaling each one
// by w*invstd first (up to 1/sqrt(eps)) before they cancel lost three digits.
// coef holds a, b, c as [3, C]. Also writes, when non-null, the weight and
// bias gradients (sum(gy*(x-mean)) * invstd, sum(gy)) and the gradient of a
// conv bias feeding BN (the sum of gx over the channel: a * (sum(gy) - c*M),
// zero up to rounding in training), all from the float sums, before any
// rounding to a half type.
template <typename scalar_t, typename acc_t>
__global__ void bwd_constants_kernel(int64_t C, int64_t S, const acc_t* __restrict__ p_sum,
                                     const acc_t* __restrict__ p_dot,
                                     const acc_t* __restrict__ invstd,
                                     const acc_t* __restrict__ weight, int64_t count,
                                     bool training, acc_t* __restrict__ coef,
                                     acc_t* __restrict__ grad_weight,
                                     acc_t* __restrict__ grad_bias,
                                     scalar_t* __restrict__ grad_conv_bias) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = 0, dot = 0;
    if (p_sum != nullptr) {
      for (int64_t s = 0; s < S; ++s) {
        sum += p_sum[c * S + s];
        dot += p_dot[c * S + s];
      }
    }
    const acc_t is = invstd[c];
    const acc_t w = weight != nullptr ? weight[c] : acc_t(1);
    const acc_t a = w * is;
    acc_t b = 0, k = 0;
    const acc_t m = static_cast<acc_t>(count);
    if (training && count > 0) {
      b = is * is * dot / m;
      k = sum / m;
    }
    coef[c] = a;
    coef[C + c] = b;
    coef[2 * C + c] = k;
    if (grad_weight != nullptr) grad_weight[c] = dot * is;
    if (grad_bias != nullptr) grad_bias[c] = sum;
    if (grad_conv_bias != nullptr) grad_conv_bias[c] = static_cast<scalar_t>(a * (sum - k * m));
  }
}

// gx = a*((gy - c) - b*(x - mean)) (gx may be null) and gr = gy (gr may be null)
// over planes. g, o, x and gr share the strides sB, sC; gx has its own.
template <typename scalar_t, typename acc_t>
__global__ void bwd_apply_planes_kernel(const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ o,
                                        const scalar_t* __restrict__ x, int64_t sB, int64_t sC,
                                        scalar_t* __restrict__ gx, int64_t gx_sB, int64_t gx_sC,
                                        scalar_t* __restrict__ gr, const acc_t* __restrict__ coef,
                                        const acc_t* __restrict__ mean, int64_t B, int64_t C,
                                        int64_t L) {
  for (int64_t p = blockIdx.x; p < B * C; p += gridDim.x) {
    const int64_t b = p / C, c = p - b * C;
    const acc_t ka = coef[c], kb = coef[C + c], kc = coef[2 * C + c];
    const bool centred = x != nullptr && kb != acc_t(0);
    const acc_t mu = centred ? mean[c] : acc_t(0);
    const int64_t off = b * sB + c * sC;
    scalar_t* gxp = gx != nullptr ? gx + b * gx_sB + c * gx_sC : nullptr;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const acc_t gy = masked_grad<scalar_t, acc_t>(g, o, off + l);
      if (gxp != nullptr) {
        acc_t v = gy - kc;
        if (centred) v -= kb * (static_cast<acc_t>(x[off + l]) - mu);
        gxp[l] = static_cast<scalar_t>(ka * v);
      }
      if (gr != nullptr) gr[off + l] = static_cast<scalar_t>(gy);
    }
  }
}

// The same over dense [M, C] matrices (all of g, o, x, gx, gr).
template <typename scalar_t, typename acc_t>
__global__ void bwd_apply_rows_kernel(const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ o,
                                      const scalar_t* __restrict__ x, scalar_t* __restrict__ gx,
                                      scalar_t* __restrict__ gr, const acc_t* __restrict__ coef,
                                      const acc_t* __restrict__ mean, int64_t M, int64_t C) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const int64_t i = r * C + c;
      const acc_t gy = masked_grad<scalar_t, acc_t>(g, o, i);
      if (gx != nullptr) {
        const acc_t kb = coef[C + c];
        acc_t v = gy - coef[2 * C + c];
        if (x != nullptr && kb != acc_t(0)) v -= kb * (static_cast<acc_t>(x[i]) - mean[c]);
        gx[i] = static_cast<scalar_t>(coef[c] * v);
      }
      if (gr != nullptr) gr[i] = static_cast<scalar_t>(gy);
    }
  }
}

// bwd_apply_rows_kernel 16 bytes at a time (see apply_rows_vec_kernel).
template <typename scalar_t, typename acc_t>
__global__ void bwd_apply_rows_vec_kernel(const scalar_t* __restrict__ g,
                                          const scalar_t* __restrict__ o,
                                          const scalar_t* __restrict__ x,
                                          scalar_t* __restrict__ gx, scalar_t* __restrict__ gr,
                                          const acc_t* __restrict__ coef,
                                          const acc_t* __restrict__ mean, int64_t vectors,
                                          int64_t C) {
  constexpr int V = kVec<scalar_t>;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vectors;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t * V, c0 = i % C;
    const Vec16<scalar_t> gv = load16(g + i);
    Vec16<scalar_t> ov{}, xv{}, gxv{}, grv{};
    if (o != nullptr) ov = load16(o + i);
    if (gx != nullptr && x != nullptr) xv = load16(x + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      const acc_t gy = (o == nullptr || static_cast<acc_t>(ov.v[j]) > acc_t(0))
                           ? static_cast<acc_t>(gv.v[j])
                           : acc_t(0);
      if (gx != nullptr) {
        const acc_t kb = coef[C + c];
        acc_t v = gy - coef[2 * C + c];
        if (x != nullptr && kb != acc_t(0)) v -= kb * (static_cast<acc_t>(xv.v[j]) - mean[c]);
        gxv.v[j] = static_cast<scalar_t>(coef[c] * v);
      }
      grv.v[j] = static_cast<scalar_t>(gy);
    }
    if (gx != nullptr) store16(gx + i, gxv);
    if (gr != nullptr) store16(gr + i, grv);
  }
}

// ---- host-side launchers ------------------------------------------------------
// Tensors passed here are already checked and laid out as the kernels assume;
// acc-typed per-channel tensors are contiguous [C] of acc_dtype(input).

// A view of an activation tensor as planes or rows.
struct ActView {
  bool rows;       // NHWC [M, C] (true) or planes (false)
  int64_t B, C, L;
  int64_t sB, sC;  // planes strides (unused for rows)
};

inline ActView nchw_view(int64_t B, int64_t C, int64_t L) {
  return ActView{false, B, C, L, C * L, L};
}
inline ActView rows_view(int64_t B, int64_t C, int64_t L) {
  return ActView{true, B, C, L, 0, 0};
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
inline T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Batch statistics of the activation `x` (view v, dtype scalar_t):
// returns per-channel partial moments as (mean, m2, count) tensors of [C, S].
struct Partials {
  at::Tensor mean, m2, n;
  int64_t S = 0;
};

template <typename scalar_t>
Partials batch_moments(const scalar_t* x, const ActView& v, const at::TensorOptions& opts) {
  using acc_t = acc_type<scalar_t>;
  Partials p;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (v.C == 0) {  // nothing to reduce; S = 1 keeps "training" distinguishable
    p.S = 1;
    p.mean = at::empty({0}, acc_opts);
    p.m2 = at::empty({0}, acc_opts);
    p.n = at::empty({0}, opts.dtype(at::kLong));
    return p;
  }
  if (v.rows) {
    const int64_t cblocks = ceil_div(v.C, kRowsX);
    const int64_t M = v.B * v.L;
    p.S = reduction_splits(cblocks, ceil_div(M, kRowsY));
    p.mean = at::empty({v.C * p.S}, acc_opts);
    p.m2 = at::empty({v.C * p.S}, acc_opts);
    p.n = at::empty({v.C * p.S}, opts.dtype(at::kLong));
    moments_rows_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(cblocks), static_cast<unsigned>(p.S)),
           dim3(kRowsX, kRowsY), 0, stream>>>(x, M, v.C, p.mean.mutable_data_ptr<acc_t>(),
                                              p.m2.mutable_data_ptr<acc_t>(),
                                              p.n.mutable_data_ptr<int64_t>());
  } else {
    const dim3 block = planes_block(v.L);
    p.S = reduction_splits(v.C, ceil_div(v.B, block.y));
    p.mean = at::empty({v.C * p.S}, acc_opts);
    p.m2 = at::empty({v.C * p.S}, acc_opts);
    p.n = at::empty({v.C * p.S}, opts.dtype(at::kLong));
    moments_planes_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(v.C), static_cast<unsigned>(p.S)), block, 0, stream>>>(
            x, v.sB, v.sC, v.B, v.L, p.mean.mutable_data_ptr<acc_t>(),
            p.m2.mutable_data_ptr<acc_t>(), p.n.mutable_data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// save_mean, save_invstd, center, scale, shift (all [C], acc dtype) from
// partial moments (training, `p` with S > 0) or running statistics (inference).
struct BNConstants {
  at::Tensor save_mean, save_invstd, center, scale, shift;
};

template <typename acc_t>
BNConstants bn_constants(int64_t C, const Partials& p, const at::Tensor& running_mean,
                         const at::Tensor& running_var, const at::Tensor& weight,
                         const at::Tensor& bias, const at::Tensor& conv_bias, double eps,
                         const at::TensorOptions& acc_opts) {
  BNConstants k;
  k.save_mean = at::empty({C}, acc_opts);
  k.save_invstd = at::empty({C}, acc_opts);
  k.center = at::empty({C}, acc_opts);
  k.scale = at::empty({C}, acc_opts);
  k.shift = at::empty({C}, acc_opts);
  if (C == 0) return k;
  const bool training = p.S > 0;
  bn_constants_kernel<acc_t><<<grid_for(C, kThreads), kThreads, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
      C, p.S, training ? p.mean.const_data_ptr<acc_t>() : nullptr,
      training ? p.m2.const_data_ptr<acc_t>() : nullptr,
      training ? p.n.const_data_ptr<int64_t>() : nullptr, ptr_or_null<acc_t>(running_mean),
      ptr_or_null<acc_t>(running_var), ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias),
      ptr_or_null<acc_t>(conv_bias), eps, k.save_mean.mutable_data_ptr<acc_t>(),
      k.save_invstd.mutable_data_ptr<acc_t>(), k.center.mutable_data_ptr<acc_t>(),
      k.scale.mutable_data_ptr<acc_t>(), k.shift.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return k;
}

// y = relu?((x - center) * scale + shift + residual?) with x, residual and y
// in views of the same [B, C, L] shape (y may alias x). For rows, all three
// are dense [B*L, C]; for planes each has its own strides.
template <typename scalar_t>
void launch_apply(const scalar_t* x, const ActView& xv, const scalar_t* res, const ActView& rv,
                  scalar_t* y, const ActView& yv, const acc_type<scalar_t>* center,
                  const acc_type<scalar_t>* scale, const acc_type<scalar_t>* shift, bool relu) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = yv.B, C = yv.C, L = yv.L;
  if (B * C * L == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (yv.rows) {
    TORCH_INTERNAL_ASSERT(xv.rows && (res == nullptr || rv.rows));
    if (rows_vectorizable<scalar_t>(C, {x, res, y})) {
      const int64_t vectors = B * L * C / kVec<scalar_t>;
      apply_rows_vec_kernel<scalar_t, acc_t><<<grid_for(vectors, kThreads), kThreads, 0,
                                               stream>>>(x, res, y, center, scale, shift,
                                                         vectors, C, relu);
    } else {
      const dim3 block = rows_block(C);
      apply_rows_kernel<scalar_t, acc_t><<<grid_for(B * L, block.y), block, 0, stream>>>(
          x, res, y, center, scale, shift, B * L, C, relu);
    }
  } else {
    TORCH_INTERNAL_ASSERT(!xv.rows && (res == nullptr || !rv.rows));
    const int threads = pow2_clamp(L, 64, kThreads);
    apply_planes_kernel<scalar_t, acc_t><<<grid_for(B * C, 1), threads, 0, stream>>>(
        x, xv.sB, xv.sC, res, rv.sB, rv.sC, y, yv.sB, yv.sC, center, scale, shift, B, C, L,
        relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward reduction: per-channel partial sums of gy and gy*(x - mean) over
// g / o / x (all in view v; o and x may be null). Returns ([C*S], [C*S], S).
struct SumPartials {
  at::Tensor sum, dot;
  int64_t S = 0;
};

template <typename scalar_t>
SumPartials bwd_reduce(const scalar_t* g, const scalar_t* o, const scalar_t* x,
                       const ActView& v, const acc_type<scalar_t>* mean,
                       const at::TensorOptions& opts) {
  using acc_t = acc_type<scalar_t>;
  SumPartials p;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (v.C == 0) {
    p.S = 1;
    p.sum = at::empty({0}, acc_opts);
    p.dot = at::empty({0}, acc_opts);
    return p;
  }
  if (v.rows) {
    const int64_t cblocks = ceil_div(v.C, kRowsX);
    const int64_t M = v.B * v.L;
    p.S = reduction_splits(cblocks, ceil_div(M, kRowsY));
    p.sum = at::empty({v.C * p.S}, acc_opts);
    p.dot = at::empty({v.C * p.S}, acc_opts);
    bwd_reduce_rows_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(cblocks), static_cast<unsigned>(p.S)),
           dim3(kRowsX, kRowsY), 0, stream>>>(g, o, x, M, v.C, mean,
                                              p.sum.mutable_data_ptr<acc_t>(),
                                              p.dot.mutable_data_ptr<acc_t>());
  } else {
    const dim3 block = planes_block(v.L);
    p.S = reduction_splits(v.C, ceil_div(v.B, block.y));
    p.sum = at::empty({v.C * p.S}, acc_opts);
    p.dot = at::empty({v.C * p.S}, acc_opts);
    bwd_reduce_planes_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(v.C), static_cast<unsigned>(p.S)), block, 0, stream>>>(
            g, o, x, v.sB, v.sC, v.B, v.L, mean, p.sum.mutable_data_ptr<acc_t>(),
            p.dot.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

template <typename scalar_t>
void launch_bwd_constants(int64_t C, const SumPartials& p, const at::Tensor& invstd,
                          const at::Tensor& weight, int64_t count, bool training,
                          at::Tensor& coef, const at::Tensor& grad_weight,
                          const at::Tensor& grad_bias, const at::Tensor& grad_conv_bias) {
  using acc_t = acc_type<scalar_t>;
  if (C == 0) return;
  const bool reduced = p.S > 0;
  bwd_constants_kernel<scalar_t, acc_t><<<grid_for(C, kThreads), kThreads, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
      C, p.S, reduced ? p.sum.const_data_ptr<acc_t>() : nullptr,
      reduced ? p.dot.const_data_ptr<acc_t>() : nullptr, invstd.const_data_ptr<acc_t>(),
      ptr_or_null<acc_t>(weight), count, training, coef.mutable_data_ptr<acc_t>(),
      mut_ptr_or_null<acc_t>(grad_weight), mut_ptr_or_null<acc_t>(grad_bias),
      mut_ptr_or_null<scalar_t>(grad_conv_bias));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gx (view gxv, may be null) and gr (view v, may be null) from g / o / x (view v).
template <typename scalar_t>
void launch_bwd_apply(const scalar_t* g, const scalar_t* o, const scalar_t* x, const ActView& v,
                      scalar_t* gx, const ActView& gxv, scalar_t* gr, const at::Tensor& coef,
                      const at::Tensor& mean) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = v.B, C = v.C, L = v.L;
  if (B * C * L == 0 || (gx == nullptr && gr == nullptr)) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (v.rows) {
    TORCH_INTERNAL_ASSERT(gx == nullptr || gxv.rows);
    if (rows_vectorizable<scalar_t>(C, {g, o, x, gx, gr})) {
      const int64_t vectors = B * L * C / kVec<scalar_t>;
      bwd_apply_rows_vec_kernel<scalar_t, acc_t>
          <<<grid_for(vectors, kThreads), kThreads, 0, stream>>>(
              g, o, x, gx, gr, coef.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
              vectors, C);
    } else {
      const dim3 block = rows_block(C);
      bwd_apply_rows_kernel<scalar_t, acc_t><<<grid_for(B * L, block.y), block, 0, stream>>>(
          g, o, x, gx, gr, coef.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), B * L,
          C);
    }
  } else {
    TORCH_INTERNAL_ASSERT(gx == nullptr || !gxv.rows);
    const int threads = pow2_clamp(L, 64, kThreads);
    bwd_apply_planes_kernel<scalar_t, acc_t><<<grid_for(B * C, 1), threads, 0, stream>>>(
        g, o, x, v.sB, v.sC, gx, gxv.sB, gxv.sC, gr, coef.const_data_ptr<acc_t>(),
        mean.const_data_ptr<acc_t>(), B, C, L);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace cnnops

// GPU pooling kernels: max, average and adaptive average pooling over the
// H x W planes of an [N, C, H, W] tensor, forward and backward.
//
// Layouts: the kernels read their inputs through arbitrary strides (no copy
// for any layout) and write outputs dense in the layout rule of
// cnnops::output_memory_format: NCHW-contiguous, or channels_last for a
// channels_last input. One thread per output element (forward) or input
// element (average backward), decoded in the output's memory order, so
// consecutive threads touch consecutive addresses: along W for NCHW, along C
// for NHWC.
//
// Backward ops are deterministic gathers (no atomics): each input element
// visits only the windows that can contain it, found from the window geometry,
// and sums, in a fixed order,
//  * avg / adaptive avg: their gradients divided by their divisors;
//  * max: the gradients of those whose index (from the forward) points at it.
//    An index that points anywhere else (or -1, a window without an element)
//    is never followed, so bad indices cannot write out of bounds.
//
// Semantics and rounding follow the CPU kernels (csrc/cpu/pooling.cpp), which
// follow aten: sums in at::acc_type, one division per output element; max
// pooling treats padding as -inf, lets NaN win, keeps the first of equal
// maxima, and reports index -1 for a window without any tap.
#include <torch/library.h>

#include <optional>

#include "cnnops/pool_shape.h"
#include "common.cuh"

namespace cnnops {
namespace gpu {
namespace {

// Strides of a 4-D tensor, passed to kernels by value.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// (n, c, h, w) of element `idx` of a dense [N, C, H, W] tensor in NCHW or
// NHWC memory order.
struct Pos {
  int64_t n, c, h, w;
};

template <bool NHWC>
__device__ __forceinline__ Pos decode(int64_t idx, int64_t C, int64_t H, int64_t W) {
  Pos p;
  if (NHWC) {
    p.c = idx % C;
    idx /= C;
    p.w = idx % W;
    idx /= W;
    p.h = idx % H;
    p.n = idx / H;
  } else {
    p.w = idx % W;
    idx /= W;
    p.h = idx % H;
    idx /= H;
    p.c = idx % C;
    p.n = idx / C;
  }
  return p;
}

// A window's clamped span [begin, end) along one dimension, and (for average
// pooling's count_include_pad) its length counting padding.
struct Span {
  int64_t begin, end, padded;
};

// max_pool2d: taps o*s - p + j*d (j < k) inside [0, in), as the CPU's
// max_spans: begin is the first tap >= 0, end bounds the last tap.
__device__ __forceinline__ Span max_span(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p,
                                         int64_t d) {
  int64_t begin = o * s - p;
  const int64_t end = min64(begin + (k - 1) * d + 1, in);
  if (begin < 0) begin += (-begin + d - 1) / d * d;
  return Span{begin, end, 0};
}

// avg_pool2d, aten's rule: count_include_pad counts the padding but not the
// part of a ceil_mode window past it.
__device__ __forceinline__ Span avg_span(int64_t o, int64_t in, int64_t k, int64_t s,
                                         int64_t p) {
  const int64_t begin = o * s - p;
  const int64_t end = min64(begin + k, in + p);
  return Span{max64(begin, 0), min64(end, in), end - begin};
}

// adaptive_avg_pool2d's bins [floor(o*in/out), ceil((o+1)*in/out)).
__device__ __forceinline__ Span adaptive_span(int64_t o, int64_t in, int64_t out) {
  const int64_t begin = (o * in) / out;
  const int64_t end = 1 + ((o + 1) * in - 1) / out;
  return Span{begin, end, end - begin};
}

struct PoolParams {
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  bool count_include_pad;
  int64_t divisor_override;  // 0: none
};

// ---- max pooling ----------------------------------------------------------------

template <typename scalar_t, bool NHWC>
__global__ void max_pool_kernel(const scalar_t* __restrict__ x, Strides4 xs, int64_t N,
                                int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                                PoolParams pp, scalar_t* __restrict__ y,
                                int64_t* __restrict__ indices) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = N * C * OH * OW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pos o = decode<NHWC>(idx, C, OH, OW);
    const Span hs = max_span(o.h, H, pp.KH, pp.sh, pp.ph, pp.dh);
    const Span ws = max_span(o.w, W, pp.KW, pp.sw, pp.pw, pp.dw);
    const scalar_t* plane = x + o.n * xs.n + o.c * xs.c;
    int64_t best = (hs.begin >= hs.end || ws.begin >= ws.end) ? -1 : hs.begin * W + ws.begin;
    acc_t maxval = -std::numeric_limits<acc_t>::infinity();
    for (int64_t ih = hs.begin; ih < hs.end; ih += pp.dh) {
      for (int64_t iw = ws.begin; iw < ws.end; iw += pp.dw) {
        const acc_t v = static_cast<acc_t>(plane[ih * xs.h + iw * xs.w]);
        if (v > maxval || device_isnan(v)) {
          maxval = v;
          best = ih * W + iw;
        }
      }
    }
    y[idx] = static_cast<scalar_t>(maxval);
    indices[idx] = best;
  }
}

// Gather: grad_input[n][c][ih][iw] = sum of grad_output over the windows
// (oh, ow) that contain (ih, iw) and whose max index is ih*W + iw. Tap kh of
// window oh reads row oh*sh - ph + kh*dh, so the windows holding row ih are
// oh = (ih + ph - kh*dh) / sh for each kh where that division is exact and
// 0 <= oh < OH (likewise for the columns). The taps scanned start at the
// first kh with oh < OH and stop at the last with oh >= 0, so the work per
// element is bounded by the windows, not by the kernel size. grad_output and
// indices are read through their strides; grad_input is dense in NCHW or
// NHWC order.
template <typename scalar_t, bool NHWC>
__global__ void max_pool_backward_kernel(const scalar_t* __restrict__ g, Strides4 gs,
                                         const int64_t* __restrict__ ind, Strides4 is,
                                         int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                                         int64_t OW, PoolParams pp, scalar_t* __restrict__ gi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = N * C * H * W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pos p = decode<NHWC>(idx, C, H, W);
    const int64_t target = p.h * W + p.w;
    const scalar_t* gp = g + p.n * gs.n + p.c * gs.c;
    const int64_t* ip = ind + p.n * is.n + p.c * is.c;
    // oh < OH  <=>  kh*dh >= ih + ph - (OH - 1)*sh (for exact divisions).
    const int64_t h_excess = p.h + pp.ph - (OH - 1) * pp.sh;
    const int64_t w_excess = p.w + pp.pw - (OW - 1) * pp.sw;
    const int64_t kh_first = h_excess > 0 ? (h_excess + pp.dh - 1) / pp.dh : 0;
    const int64_t kw_first = w_excess > 0 ? (w_excess + pp.dw - 1) / pp.dw : 0;
    acc_t sum = 0;
    for (int64_t kh = kh_first; kh < pp.KH; ++kh) {
      const int64_t h_off = p.h + pp.ph - kh * pp.dh;
      if (h_off < 0) break;  // decreases with kh
      if (h_off % pp.sh != 0) continue;
      const int64_t oh = h_off / pp.sh;
      for (int64_t kw = kw_first; kw < pp.KW; ++kw) {
        const int64_t w_off = p.w + pp.pw - kw * pp.dw;
        if (w_off < 0) break;
        if (w_off % pp.sw != 0) continue;
        const int64_t ow = w_off / pp.sw;
        if (ip[oh * is.h + ow * is.w] == target) {
          sum += static_cast<acc_t>(gp[oh * gs.h + ow * gs.w]);
        }
      }
    }
    gi[idx] = static_cast<scalar_t>(sum);
  }
}

// ---- average pooling ------------------------------------------------------------

template <bool ADAPTIVE>
__device__ __forceinline__ Span window(int64_t o, int64_t in, int64_t out, int64_t k, int64_t s,
                                       int64_t p) {
  return ADAPTIVE ? adaptive_span(o, in, out) : avg_span(o, in, k, s, p);
}

__device__ __forceinline__ int64_t avg_divisor(const PoolParams& pp, const Span& h,
                                               const Span& w) {
  if (pp.divisor_override != 0) return pp.divisor_override;
  return pp.count_include_pad ? h.padded * w.padded
                              : (h.end - h.begin) * (w.end - w.begin);
}

// avg_pool2d (ADAPTIVE = false) and adaptive_avg_pool2d (true; pp then has
// count_include_pad = true and no override, so the divisor is the bin size).
template <typename scalar_t, bool NHWC, bool ADAPTIVE>
__global__ void avg_pool_kernel(const scalar_t* __restrict__ x, Strides4 xs, int64_t N,
                                int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                                PoolParams pp, scalar_t* __restrict__ y) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = N * C * OH * OW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pos o = decode<NHWC>(idx, C, OH, OW);
    const Span hs = window<ADAPTIVE>(o.h, H, OH, pp.KH, pp.sh, pp.ph);
    const Span ws = window<ADAPTIVE>(o.w, W, OW, pp.KW, pp.sw, pp.pw);
    const scalar_t* plane = x + o.n * xs.n + o.c * xs.c;
    acc_t sum = 0;
    for (int64_t ih = hs.begin; ih < hs.end; ++ih) {
      for (int64_t iw = ws.begin; iw < ws.end; ++iw) {
        sum += static_cast<acc_t>(plane[ih * xs.h + iw * xs.w]);
      }
    }
    // The padding rules leave no window empty; guard the division anyway.
    y[idx] = (hs.begin >= hs.end || ws.begin >= ws.end)
                 ? scalar_t(0)
                 : static_cast<scalar_t>(sum / static_cast<acc_t>(avg_divisor(pp, hs, ws)));
  }
}

// Output positions along one dimension whose window may contain input
// position i: [lo, hi). Every candidate is re-checked against the exact
// window, so these only need to be a superset.
template <bool ADAPTIVE>
__device__ __forceinline__ void candidates(int64_t i, int64_t in, int64_t out, int64_t k,
                                           int64_t s, int64_t p, int64_t& lo, int64_t& hi) {
  if (ADAPTIVE) {
    lo = (i * out) / in;
    hi = min64(((i + 1) * out + in - 1) / in, out);
  } else {
    // o*s - p <= i < o*s - p + k  <=>  (i + p - k) / s < o <= (i + p) / s
    lo = (i + p < k) ? 0 : (i + p - k) / s + 1;
    hi = min64((i + p) / s + 1, out);
  }
}

// Gather: grad_input[n][c][ih][iw] = sum over the windows containing (ih, iw)
// of grad_output / divisor.
template <typename scalar_t, bool NHWC, bool ADAPTIVE>
__global__ void avg_pool_backward_kernel(const scalar_t* __restrict__ g, Strides4 gs, int64_t N,
                                         int64_t C, int64_t H, int64_t W, int64_t OH,
                                         int64_t OW, PoolParams pp,
                                         scalar_t* __restrict__ gi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = N * C * H * W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pos p = decode<NHWC>(idx, C, H, W);
    int64_t oh_lo, oh_hi, ow_lo, ow_hi;
    candidates<ADAPTIVE>(p.h, H, OH, pp.KH, pp.sh, pp.ph, oh_lo, oh_hi);
    candidates<ADAPTIVE>(p.w, W, OW, pp.KW, pp.sw, pp.pw, ow_lo, ow_hi);
    const scalar_t* plane = g + p.n * gs.n + p.c * gs.c;
    acc_t sum = 0;
    for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
      const Span hs = window<ADAPTIVE>(oh, H, OH, pp.KH, pp.sh, pp.ph);
      if (p.h < hs.begin || p.h >= hs.end) continue;
      for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
        const Span ws = window<ADAPTIVE>(ow, W, OW, pp.KW, pp.sw, pp.pw);
        if (p.w < ws.begin || p.w >= ws.end) continue;
        sum += static_cast<acc_t>(plane[oh * gs.h + ow * gs.w]) /
               static_cast<acc_t>(avg_divisor(pp, hs, ws));
      }
    }
    gi[idx] = static_cast<scalar_t>(sum);
  }
}

// ---- launchers ---------------------------------------------------------------------

at::Tensor avg_forward(const at::Tensor& input, int64_t OH, int64_t OW, const PoolParams& pp,
                       bool adaptive) {
  const auto fmt = output_memory_format(input);
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor y = at::empty({N, C, OH, OW}, input.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const Strides4 xs = strides_of(input);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_for(y.numel(), kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_avg_pool_cuda", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (nhwc && adaptive) {
      avg_pool_kernel<scalar_t, true, true><<<blocks, kThreads, 0, stream>>>(xp, xs, N, C, H, W, OH, OW, pp, yp);
    } else if (nhwc) {
      avg_pool_kernel<scalar_t, true, false><<<blocks, kThreads, 0, stream>>>(xp, xs, N, C, H, W, OH, OW, pp, yp);
    } else if (adaptive) {
      avg_pool_kernel<scalar_t, false, true><<<blocks, kThreads, 0, stream>>>(xp, xs, N, C, H, W, OH, OW, pp, yp);
    } else {
      avg_pool_kernel<scalar_t, false, false><<<blocks, kThreads, 0, stream>>>(xp, xs, N, C, H, W, OH, OW, pp, yp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor avg_backward(const at::Tensor& grad_output, const at::Tensor& input,
                        const PoolParams& pp, bool adaptive) {
  const auto fmt = output_memory_format(input);
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  at::Tensor gi = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  if (grad_output.numel() == 0) return gi.zero_();  // adaptive pooling to a 0-sized output
  const Strides4 gs = strides_of(grad_output);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_for(gi.numel(), kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_avg_pool_backward_cuda", [&] {
    const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gip = gi.mutable_data_ptr<scalar_t>();
    if (nhwc && adaptive) {
      avg_pool_backward_kernel<scalar_t, true, true><<<blocks, kThreads, 0, stream>>>(gp, gs, N, C, H, W, OH, OW, pp, gip);
    } else if (nhwc) {
      avg_pool_backward_kernel<scalar_t, true, false><<<blocks, kThreads, 0, stream>>>(gp, gs, N, C, H, W, OH, OW, pp, gip);
    } else if (adaptive) {
      avg_pool_backward_kernel<scalar_t, false, true><<<blocks, kThreads, 0, stream>>>(gp, gs, N, C, H, W, OH, OW, pp, gip);
    } else {
      avg_pool_backward_kernel<scalar_t, false, false><<<blocks, kThreads, 0, stream>>>(gp, gs, N, C, H, W, OH, OW, pp, gip);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

PoolParams avg_params(at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, bool count_include_pad,
                      std::optional<int64_t> divisor_override) {
  return PoolParams{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
                    1, 1, count_include_pad, divisor_override.value_or(0)};
}

// Adaptive bins: no padding, divisor = bin size.
PoolParams adaptive_params() { return PoolParams{1, 1, 1, 1, 0, 0, 1, 1, true, 0}; }

}  // namespace
}  // namespace gpu

// input [N, C, H, W] -> (output [N, C, OH, OW], indices [N, C, OH, OW] int64,
// flat offsets h*W + w into each input plane, -1 for a window with no tap).
std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  const PoolShape s = check_pool2d("max_pool2d", input, gpu::check_cuda_float, kernel_size,
                                   stride, padding, dilation, ceil_mode);
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  at::Tensor y = at::empty({s.N, s.C, s.OH, s.OW}, input.options().memory_format(fmt));
  at::Tensor indices =
      at::empty({s.N, s.C, s.OH, s.OW}, input.options().dtype(at::kLong).memory_format(fmt));
  if (y.numel() == 0) return {y, indices};
  const gpu::PoolParams pp{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                           padding[1],     dilation[0],    dilation[1], false,   0};
  const gpu::Strides4 xs = gpu::strides_of(input);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = gpu::grid_for(y.numel(), gpu::kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_max_pool2d_cuda", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      gpu::max_pool_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(
          xp, xs, s.N, s.C, s.H, s.W, s.OH, s.OW, pp, yp, ip);
    } else {
      gpu::max_pool_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(
          xp, xs, s.N, s.C, s.H, s.W, s.OH, s.OW, pp, yp, ip);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, indices};
}

// grad_input shaped like input: grad_output [N, C, OH, OW] summed at the
// offsets in indices (the max_pool2d indices), gathered per input element
// over the windows of the given geometry that contain it.
at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& indices, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  check_max_pool2d_backward(grad_output, input, indices, gpu::check_cuda_float, kernel_size,
                            stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  at::Tensor gi = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  if (grad_output.numel() == 0) return gi.zero_();
  const gpu::PoolParams pp{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                           padding[1],     dilation[0],    dilation[1], false,   0};
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  const gpu::Strides4 gs = gpu::strides_of(grad_output), is = gpu::strides_of(indices);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = gpu::grid_for(gi.numel(), gpu::kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_max_pool2d_backward_cuda", [&] {
    const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* gip = gi.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      gpu::max_pool_backward_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(
          gp, gs, ip, is, N, C, H, W, OH, OW, pp, gip);
    } else {
      gpu::max_pool_backward_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(
          gp, gs, ip, is, N, C, H, W, OH, OW, pp, gip);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

at::Tensor avg_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                           bool count_include_pad, std::optional<int64_t> divisor_override) {
  const PoolShape s = check_pool2d("avg_pool2d", input, gpu::check_cuda_float, kernel_size,
                                   stride, padding, {}, ceil_mode);
  check_divisor_override("avg_pool2d", divisor_override);
  c10::cuda::CUDAGuard guard(input.device());
  return gpu::avg_forward(
      input, s.OH, s.OW,
      gpu::avg_params(kernel_size, stride, padding, count_include_pad, divisor_override),
      /*adaptive=*/false);
}

at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, bool ceil_mode,
                                    bool count_include_pad,
                                    std::optional<int64_t> divisor_override) {
  const PoolShape s = check_pool2d("avg_pool2d_backward", input, gpu::check_cuda_float,
                                   kernel_size, stride, padding, {}, ceil_mode);
  check_divisor_override("avg_pool2d_backward", divisor_override);
  check_4d(grad_output, "grad_output");
  check_same(grad_output, input, "grad_output", "input");
  const std::vector<int64_t> expected{s.N, s.C, s.OH, s.OW};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected),
                    "avg_pool2d_backward: expected grad_output of shape ",
                    at::IntArrayRef(expected), " (the avg_pool2d output shape for input ",
                    input.sizes(), "), got ", grad_output.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  return gpu::avg_backward(
      grad_output, input,
      gpu::avg_params(kernel_size, stride, padding, count_include_pad, divisor_override),
      /*adaptive=*/false);
}

at::Tensor adaptive_avg_pool2d_cuda(const at::Tensor& input, at::IntArrayRef output_size) {
  check_adaptive_input("adaptive_avg_pool2d", input, gpu::check_cuda_float);
  check_pair(output_size, "output_size", 0);
  c10::cuda::CUDAGuard guard(input.device());
  return gpu::avg_forward(input, output_size[0], output_size[1], gpu::adaptive_params(),
                          /*adaptive=*/true);
}

at::Tensor adaptive_avg_pool2d_backward_cuda(const at::Tensor& grad_output,
                                             const at::Tensor& input) {
  check_adaptive_input("adaptive_avg_pool2d_backward", input, gpu::check_cuda_float);
  check_pool_grad_output("adaptive_avg_pool2d_backward", grad_output, input);
  c10::cuda::CUDAGuard guard(input.device());
  return gpu::avg_backward(grad_output, input, gpu::adaptive_params(), /*adaptive=*/true);
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
  m.impl("avg_pool2d", &avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cuda);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_cuda);
  m.impl("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward_cuda);
}

}  // namespace cnnops

// CPU pooling kernels: max, average and adaptive average pooling over the
// H x W planes of an [N, C, H, W] tensor, forward and backward.
//
// Layout: NCHW tensors run one H*W plane per task. Planes are independent, so
// parallelising over N*C keeps the scatter-add backward ops race-free without
// atomics. channels_last tensors run NHWC kernels, vectorised over C: the
// forward one output row per task, the backward one (image, block of channels)
// per task, which owns that slice of the input gradient. Other strided inputs
// are copied to NCHW first. Results come back in
// cnnops::output_memory_format(input).
//
// The leaf kernels (a plane, an output row, an image's channel block) are
// CNNOPS_VECTORISED: built for AVX-512, AVX2 and the baseline.
//
// Semantics and rounding follow aten's CPU kernels (MaxPoolKernel.cpp,
// AvgPoolKernel.cpp, AdaptiveAvgPoolKernel.cpp): window sums accumulate in
// at::opmath_type and are divided once per output element.

#include "cnnops/common.h"
#include "cnnops/pool_shape.h"
#include "vectorised.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace cnnops {
namespace {

// The input taps of one window along one dimension, clamped to the input:
// begin, begin + step, ... < end. Windows are separable, so a 2-D window is a
// pair of spans, computed once per output row and column rather than per
// output element.
struct Span {
  int64_t begin;
  int64_t end;
  // Window length counting padded positions: avg_pool2d's count_include_pad
  // divisor.
  int64_t padded;

  bool empty() const { return begin >= end; }
  int64_t count() const { return end - begin; }  // taps, for step 1
};

// max_pool2d: taps o*s - p + j*d for j < k. Padding holds -inf, which never
// wins, so only the taps inside the input are visited.
std::vector<Span> max_spans(int64_t in, int64_t out, int64_t k, int64_t s,
                            int64_t p, int64_t d) {
  std::vector<Span> spans(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t begin = o * s - p;
    const int64_t end = std::min(begin + (k - 1) * d + 1, in);
    if (begin < 0) begin += (-begin + d - 1) / d * d;  // first tap >= 0
    spans[o] = {begin, end, 0};
  }
  return spans;
}

// avg_pool2d, aten's rule: the count_include_pad divisor counts the padding
// but not the part of a ceil_mode window that overhangs the padding.
std::vector<Span> avg_spans(int64_t in, int64_t out, int64_t k, int64_t s,
                            int64_t p) {
  std::vector<Span> spans(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t begin = o * s - p;
    const int64_t end = std::min(begin + k, in + p);
    spans[o] = {std::max<int64_t>(begin, 0), std::min(end, in), end - begin};
  }
  return spans;
}

// adaptive_avg_pool2d, aten's bins: [floor(o*in/out), ceil((o+1)*in/out)).
// Bins overlap when out does not divide in, and repeat when out > in. The
// split form of the products avoids overflow as aten's start_index does.
std::vector<Span> adaptive_spans(int64_t in, int64_t out) {
  std::vector<Span> spans(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t begin = (o / out) * in + ((o % out) * in) / out;
    const int64_t end = 1 + ((o + 1) * in - 1) / out;
    spans[o] = {begin, end, end - begin};
  }
  return spans;
}

// The divisor of one average-pooling window. Adaptive pooling has no padding,
// so it is the count_include_pad case with padded == count.
struct AvgDivisor {
  bool count_include_pad;
  std::optional<int64_t> divisor_override;

  int64_t operator()(const Span& h, const Span& w) const {
    if (divisor_override.has_value()) return *divisor_override;
    return count_include_pad ? h.padded * w.padded : h.count() * w.count();
  }
};

// Max pooling of NCHW planes, each scanned output row by output row and,
// within a row, tap by tap: tap (ih, kw) compares one input value for every
// output column whose window holds it, a branch-free select the compiler
// vectorises (with the row's indices held as Idx, int32_t when the plane
// allows, so they share the value lanes' width). Each window still sees its
// taps in scan order (ih, then iw), so ties and NaNs resolve as in a
// window-by-window scan and in aten.
//
// `planes` consecutive planes per call (H*W inputs and rows.size()*OW outputs
// apart): on small planes (8x8 into 4x4) a call per plane cost more than the
// plane. `best` is OW Idx of scratch.
template <typename scalar_t, typename Idx>
CNNOPS_VECTORISED void max_pool_planes(const scalar_t* in, scalar_t* out, int64_t* indices,
                                       int64_t planes, int64_t H, int64_t W, int64_t OW,
                                       const std::vector<Span>& rows,
                                       const std::vector<Span>& cols, int64_t kW, int64_t sW,
                                       int64_t pW, int64_t dH, int64_t dW, Idx* best) {
  for (int64_t plane = 0; plane < planes; ++plane, in += H * W) {
    for (const Span& h : rows) {
      // Like aten, a window whose taps are all -inf reports its first tap. A
      // window with no tap at all (dilation larger than the input) gets -1,
      // the "no maximum" marker the backward skips; aten reports an offset
      // outside the plane there, and its backward writes out of bounds.
      for (int64_t ow = 0; ow < OW; ++ow) {
        out[ow] = -std::numeric_limits<scalar_t>::infinity();
        best[ow] = static_cast<Idx>((h.empty() || cols[ow].empty()) ? -1
                                                                    : h.begin * W + cols[ow].begin);
      }
      for (int64_t ih = h.begin; ih < h.end; ih += dH) {
        for (int64_t kw = 0; kw < kW; ++kw) {
          // Output columns ow in [lo, hi) read input column ow*sW + off in [0, W).
          const int64_t off = kw * dW - pW;
          const int64_t lo = std::min(OW, off >= 0 ? 0 : (-off + sW - 1) / sW);
          const int64_t hi = std::max(lo, std::min(OW, W - off <= 0 ? 0 : (W - off + sW - 1) / sW));
          const Idx base = static_cast<Idx>(ih * W + off);
          const Idx step = static_cast<Idx>(sW);
          const scalar_t* src = in + ih * W + off;
          for (int64_t ow = lo; ow < hi; ++ow) {
            const scalar_t v = src[ow * sW];
            // Strict '>' keeps the first of equal maxima; a NaN replaces
            // anything (so the last NaN wins), exactly as in aten.
            const bool take = v > out[ow] || v != v;
            out[ow] = take ? v : out[ow];
            best[ow] = take ? static_cast<Idx>(base + static_cast<Idx>(ow) * step) : best[ow];
          }
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) indices[ow] = best[ow];
      out += OW;
      indices += OW;
    }
  }
}

template <typename scalar_t>
CNNOPS_VECTORISED void avg_pool_plane(const scalar_t* in, scalar_t* out, int64_t W,
                    const std::vector<Span>& rows, const std::vector<Span>& cols,
                    const AvgDivisor& divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const Span& h : rows) {
    for (const Span& w : cols) {
      // Lanes of partial sums (omp simd): a window sum is one long dependent
      // chain otherwise. A window spanning whole rows (global pooling) is one
      // contiguous run.
      acc_t sum = 0;
      const bool whole_rows = w.begin == 0 && w.end == W;
      for (int64_t ih = h.begin; ih < h.end; ih += whole_rows ? h.count() : 1) {
        const scalar_t* run = in + ih * W + w.begin;
        const int64_t len = whole_rows ? h.count() * W : w.count();
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) sum += run[i];
      }
      // The padding rules leave no window empty; guard the division anyway.
      *out++ = (h.empty() || w.empty())
                   ? scalar_t(0)
                   : static_cast<scalar_t>(sum / static_cast<acc_t>(divisor(h, w)));
    }
  }
}

template <typename scalar_t>
CNNOPS_VECTORISED void avg_pool_backward_plane(const scalar_t* grad_out, scalar_t* grad_in,
                             int64_t W, const std::vector<Span>& rows,
                             const std::vector<Span>& cols,
                             const AvgDivisor& divisor) {
  for (const Span& h : rows) {
    for (const Span& w : cols) {
      const scalar_t g = *grad_out++;
      if (h.empty() || w.empty()) continue;
      const scalar_t delta = g / static_cast<scalar_t>(divisor(h, w));
      for (int64_t ih = h.begin; ih < h.end; ++ih) {
        for (int64_t iw = w.begin; iw < w.end; ++iw) grad_in[ih * W + iw] += delta;
      }
    }
  }
}

// NHWC kernels keep a pixel's running values (maxima and their indices,
// window sums) for C channels. Up to kGroupedChannels channels they are held in
// registers: groups of kLanes(scalar_t) channels (one AVX-512 register) of a
// compile-time width, each group over all the window's taps (for_channel_groups).
// (Kept in memory, each tap waited on the previous tap's store: the max-pool
// forward ran at 0.7x of aten's at 16 channels.) With more channels they are
// kept in memory (`wide` scratch), each tap a contiguous run of C values whose
// stores are C values away from the next tap's loads; a group at a time would
// read the window with a stride of C (global pooling of 2048 channels:
// 39 -> 68 us).
constexpr int64_t kGroupedChannels = 16;

template <typename scalar_t>
constexpr int64_t kLanes = 64 / sizeof(scalar_t);

// Runs f(c0, width) for the groups of C <= kGroupedChannels channels: whole
// groups with width a std::integral_constant, then the rest.
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE void for_channel_groups(int64_t C, const F& f) {
  int64_t c0 = 0;
  for (; c0 + kLanes<scalar_t> <= C; c0 += kLanes<scalar_t>) {
    f(c0, std::integral_constant<int64_t, kLanes<scalar_t>>{});
  }
  if (c0 < C) f(c0, C - c0);
}

// The taps of a max-pooling window in scan order (ih, then iw), as in
// max_pool_planes, so ties and NaNs resolve the same: update(src, tap) for each,
// src the tap's C values in image `in` [H, W, C].
template <typename scalar_t, typename Idx, typename F>
C10_ALWAYS_INLINE void for_each_max_tap(const scalar_t* in, int64_t W, int64_t C, const Span& h,
                                        const Span& w, int64_t dH, int64_t dW, const F& update) {
  for (int64_t ih = h.begin; ih < h.end; ih += dH) {
    for (int64_t iw = w.begin; iw < w.end; iw += dW) {
      update(in + (ih * W + iw) * C, static_cast<Idx>(ih * W + iw));
    }
  }
}

// The max-pool step of one channel: a NaN replaces anything, strict '>' keeps
// the first of equal maxima (as max_pool_planes).
template <typename scalar_t, typename Idx>
C10_ALWAYS_INLINE void max_step(scalar_t v, Idx tap, scalar_t& best, Idx& at) {
  const bool take = v > best || v != v;
  best = take ? v : best;
  at = take ? tap : at;
}

// One NHWC max-pooling output pixel: window (h, w) into the pixel's C values
// and indices, indices compared as Idx (see max_pool_planes); `wide` is C Idx
// of scratch, used when C > kGroupedChannels.
template <typename scalar_t, typename Idx>
C10_ALWAYS_INLINE void max_pool_pixel_nhwc(const scalar_t* in, scalar_t* out, int64_t* indices,
                                           int64_t W, int64_t C, const Span& h, const Span& w,
                                           int64_t dH, int64_t dW, Idx* wide) {
  const Idx first = static_cast<Idx>((h.empty() || w.empty()) ? -1 : h.begin * W + w.begin);
  constexpr scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
  if (C > kGroupedChannels) {
    std::fill(out, out + C, lowest);
    std::fill(wide, wide + C, first);
    for_each_max_tap<scalar_t, Idx>(in, W, C, h, w, dH, dW, [&](const scalar_t* src, Idx tap) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) max_step(src[c], tap, out[c], wide[c]);
    });
    std::copy(wide, wide + C, indices);
    return;
  }
  for_channel_groups<scalar_t>(C, [&](int64_t c0, auto width) {
    scalar_t best[kLanes<scalar_t>];
    Idx at[kLanes<scalar_t>];
    for (int64_t j = 0; j < width; ++j) {
      best[j] = lowest;
      at[j] = first;
    }
    for_each_max_tap<scalar_t, Idx>(in + c0, W, C, h, w, dH, dW, [&](const scalar_t* src, Idx tap) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) max_step(src[j], tap, best[j], at[j]);
    });
    for (int64_t j = 0; j < width; ++j) {
      out[c0 + j] = best[j];
      indices[c0 + j] = at[j];
    }
  });
}

// One output row of NHWC max pooling: the pixels of output row `h` (the input
// rows it spans) of one image, one per column span; `wide` as above.
template <typename scalar_t, typename Idx>
CNNOPS_VECTORISED void max_pool_row_nhwc(const scalar_t* image, scalar_t* out,
                                         int64_t* indices, int64_t W, int64_t C,
                                         const Span& h, const std::vector<Span>& cols,
                                         int64_t dH, int64_t dW, Idx* wide) {
  for (size_t ow = 0; ow < cols.size(); ++ow) {
    max_pool_pixel_nhwc<scalar_t, Idx>(image, out + ow * C, indices + ow * C, W, C, h,
                                       cols[ow], dH, dW, wide);
  }
}

// One output row of NHWC average pooling (the rows and columns as
// avg_pool_plane's), window sums in at::opmath_type; `wide` is C sums of
// scratch, used when C > kGroupedChannels.
template <typename scalar_t>
CNNOPS_VECTORISED void avg_pool_row_nhwc(const scalar_t* image, scalar_t* out, int64_t W,
                                         int64_t C, const Span& h,
                                         const std::vector<Span>& cols,
                                         const AvgDivisor& divisor,
                                         at::opmath_type<scalar_t>* wide) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto window = [&](const Span& w, int64_t c0, auto width, acc_t* sum) {
    for (int64_t ih = h.begin; ih < h.end; ++ih) {
      for (int64_t iw = w.begin; iw < w.end; ++iw) {
        const scalar_t* src = image + (ih * W + iw) * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) sum[j] += src[j];
      }
    }
  };
  for (const Span& w : cols) {
    // The padding rules leave no window empty; guard the division anyway.
    const bool empty = h.empty() || w.empty();
    const acc_t d = empty ? acc_t(1) : static_cast<acc_t>(divisor(h, w));
    const auto store = [&](int64_t c0, int64_t width, const acc_t* sum) {
      for (int64_t j = 0; j < width; ++j) {
        out[c0 + j] = empty ? scalar_t(0) : static_cast<scalar_t>(sum[j] / d);
      }
    };
    if (C > kGroupedChannels) {
      std::fill(wide, wide + C, acc_t(0));
      window(w, 0, C, wide);
      store(0, C, wide);
    } else {
      for_channel_groups<scalar_t>(C, [&](int64_t c0, auto width) {
        acc_t sum[kLanes<scalar_t>];
        for (int64_t j = 0; j < width; ++j) sum[j] = acc_t(0);
        window(w, c0, width, sum);
        store(c0, width, sum);
      });
    }
    out += C;
  }
}

// NHWC average-pooling backward of one image's channels [c0, c0 + width): its
// input-gradient slice gin (stride C between positions) is zeroed, then each
// output gradient, divided by its window's divisor, is added over its window.
template <typename scalar_t>
CNNOPS_VECTORISED void avg_pool_backward_image_nhwc(const scalar_t* g, scalar_t* gin, int64_t H,
                                                    int64_t W, int64_t C, int64_t width,
                                                    const std::vector<Span>& rows,
                                                    const std::vector<Span>& cols,
                                                    const AvgDivisor& divisor) {
  for (int64_t p = 0; p < H * W; ++p) std::fill(gin + p * C, gin + p * C + width, scalar_t(0));
  for (const Span& h : rows) {
    for (const Span& w : cols) {
      const scalar_t* gp = g;
      g += C;
      if (h.empty() || w.empty()) continue;
      const scalar_t div = static_cast<scalar_t>(divisor(h, w));
      for (int64_t ih = h.begin; ih < h.end; ++ih) {
        for (int64_t iw = w.begin; iw < w.end; ++iw) {
          scalar_t* dst = gin + (ih * W + iw) * C;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) dst[c] += gp[c] / div;
        }
      }
    }
  }
}

// Runs f(begin, end) over chunks of the planes, in parallel. `work_per_plane`
// (roughly the scalar operations in one plane) sizes the chunks so that small
// problems are not split into tasks costlier to schedule than to run.
template <typename F>
void for_plane_chunks(int64_t planes, int64_t work_per_plane, const F& f) {
  const int64_t grain = std::max<int64_t>(
      1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_plane));
  at::parallel_for(0, planes, grain, f);
}

// Runs f(plane) for every plane, in parallel (chunks as for_plane_chunks).
template <typename F>
void for_each_plane(int64_t planes, int64_t work_per_plane, const F& f) {
  for_plane_chunks(planes, work_per_plane, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) f(plane);
  });
}

at::Tensor empty_nchw(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor zeros_nchw(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::zeros(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Shared by avg_pool2d and adaptive_avg_pool2d: `input` is checked, OH/OW >= 0.
at::Tensor avg_pool_forward(const at::Tensor& input, int64_t OH, int64_t OW,
                            const std::vector<Span>& rows,
                            const std::vector<Span>& cols,
                            const AvgDivisor& divisor, int64_t window) {
  const auto fmt = output_memory_format(input);
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t H = input.size(2), W = input.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    at::Tensor output = at::empty({N, C, OH, OW}, input.options().memory_format(fmt));
    if (output.numel() == 0) return output;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnops_avg_pool_nhwc_cpu", [&] {
      const scalar_t* in_data = input.const_data_ptr<scalar_t>();
      scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(
          1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, OW * C * window));
      at::parallel_for(0, N * OH, grain, [&](int64_t begin, int64_t end) {
        std::vector<at::opmath_type<scalar_t>> wide(C);  // scratch for many channels
        for (int64_t r = begin; r < end; ++r) {
          avg_pool_row_nhwc(in_data + r / OH * H * W * C, out_data + r * OW * C, W, C,
                            rows[r % OH], cols, divisor, wide.data());
        }
      });
    });
    return output;
  }
  at::Tensor output = empty_nchw({N, C, OH, OW}, input);
  if (output.numel() == 0) return output.contiguous(fmt);
  const at::Tensor in = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "cnnops_avg_pool_cpu", [&] {
    const scalar_t* in_data = in.const_data_ptr<scalar_t>();
    scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
    for_each_plane(N * C, OH * OW * window, [&](int64_t p) {
      avg_pool_plane(in_data + p * H * W, out_data + p * OH * OW, W, rows, cols,
                     divisor);
    });
  });
  return output.contiguous(fmt);
}

// Shared by avg_pool2d_backward and adaptive_avg_pool2d_backward.
at::Tensor avg_pool_backward(const at::Tensor& grad_output, const at::Tensor& input,
                             const std::vector<Span>& rows,
                             const std::vector<Span>& cols,
                             const AvgDivisor& divisor, int64_t window) {
  const auto fmt = output_memory_format(input);
  const int64_t H = input.size(2), W = input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast && grad_output.numel() > 0) {
    at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
    const at::Tensor gout = grad_output.contiguous(fmt);
    const int64_t N = input.size(0), C = input.size(1);
    constexpr int64_t kChannels = 64;  // channels per task
    const int64_t blocks = (C + kChannels - 1) / kChannels;
    const int64_t grain = std::max<int64_t>(
        1, at::internal::GRAIN_SIZE /
               std::max<int64_t>(1, (H * W + OH * OW * window) * std::min(C, kChannels)));
    AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "cnnops_avg_pool_backward_nhwc_cpu", [&] {
      const scalar_t* g_data = gout.const_data_ptr<scalar_t>();
      scalar_t* gin_data = grad_input.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, N * blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks, c0 = task % blocks * kChannels;
          avg_pool_backward_image_nhwc(g_data + n * OH * OW * C + c0,
                                       gin_data + n * H * W * C + c0, H, W, C,
                                       std::min(kChannels, C - c0), rows, cols, divisor);
        }
      });
    });
    return grad_input;
  }
  at::Tensor grad_input = zeros_nchw(input.sizes(), input);
  if (grad_input.numel() == 0 || grad_output.numel() == 0) {
    return grad_input.contiguous(fmt);
  }
  const at::Tensor gout = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "cnnops_avg_pool_backward_cpu", [&] {
    const scalar_t* gout_data = gout.const_data_ptr<scalar_t>();
    scalar_t* gin_data = grad_input.mutable_data_ptr<scalar_t>();
    for_each_plane(input.size(0) * input.size(1), OH * OW * window, [&](int64_t p) {
      avg_pool_backward_plane(gout_data + p * OH * OW, gin_data + p * H * W, W,
                              rows, cols, divisor);
    });
  });
  return grad_input.contiguous(fmt);
}

// max_pool2d over a channels_last input into channels_last output and indices:
// one task per output row of an image (max_pool_row_nhwc).
void max_pool2d_nhwc(const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                     const PoolShape& s, const std::vector<Span>& rows,
                     const std::vector<Span>& cols, at::IntArrayRef kernel_size,
                     at::IntArrayRef dilation, bool small) {
  const int64_t C = s.C, row_work = s.OW * C * kernel_size[0] * kernel_size[1];
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_work));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnops_max_pool2d_nhwc_cpu", [&] {
    const scalar_t* in_data = input.const_data_ptr<scalar_t>();
    scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
    int64_t* idx_data = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, s.N * s.OH, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> wide32(small ? C : 0);  // scratch for many channels
      std::vector<int64_t> wide64(small ? 0 : C);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* image = in_data + r / s.OH * s.H * s.W * C;
        const int64_t at = r * s.OW * C;
        if (small) {
          max_pool_row_nhwc<scalar_t, int32_t>(image, out_data + at, idx_data + at, s.W, C,
                                               rows[r % s.OH], cols, dilation[0], dilation[1],
                                               wide32.data());
        } else {
          max_pool_row_nhwc<scalar_t, int64_t>(image, out_data + at, idx_data + at, s.W, C,
                                               rows[r % s.OH], cols, dilation[0], dilation[1],
                                               wide64.data());
        }
      }
    });
  });
}

// max_pool2d_backward for channels_last tensors: one task per (image, block of
// channels), which owns that slice of grad_input, zeroes it and scatter-adds
// into it, so no two tasks write the same element.
void max_pool2d_backward_nhwc(const at::Tensor& gout, const at::Tensor& idx,
                              at::Tensor& grad_input) {
  const int64_t N = grad_input.size(0), C = grad_input.size(1);
  const int64_t HW = grad_input.size(2) * grad_input.size(3);
  const int64_t OHW = gout.size(2) * gout.size(3);
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(
      1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, (HW + OHW) * std::min(C, kBlock)));
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "cnnops_max_pool2d_backward_nhwc_cpu", [&] {
    const scalar_t* g_data = gout.const_data_ptr<scalar_t>();
    const int64_t* idx_data = idx.const_data_ptr<int64_t>();
    scalar_t* gin_data = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, c0 = task % blocks * kBlock;
        const int64_t width = std::min(kBlock, C - c0);
        scalar_t* gin = gin_data + n * HW * C + c0;
        for (int64_t p = 0; p < HW; ++p) std::fill(gin + p * C, gin + p * C + width, scalar_t(0));
        const scalar_t* g = g_data + n * OHW * C + c0;
        const int64_t* ind = idx_data + n * OHW * C + c0;
        for (int64_t p = 0; p < OHW; ++p) {
          for (int64_t c = 0; c < width; ++c) {
            const int64_t j = ind[p * C + c];
            if (j == -1) continue;  // a window with no tap
            TORCH_CHECK_VALUE(j >= 0 && j < HW, "max_pool2d_backward: index ", j,
                              " is outside the input plane of ", grad_input.size(2), "x",
                              grad_input.size(3), " elements (expected -1 or [0, ", HW, "))");
            gin[j * C + c] += g[p * C + c];
          }
        }
      }
    });
  });
}

}  // namespace

// input [N, C, H, W] -> (output [N, C, OH, OW], indices [N, C, OH, OW] int64,
// flat offsets h*W + w into each input plane, -1 for a window with no tap).
std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const PoolShape s = check_pool2d("max_pool2d", input, check_cpu_float, kernel_size, stride,
                                   padding, dilation, ceil_mode);
  const auto fmt = output_memory_format(input);
  at::Tensor output = at::empty({s.N, s.C, s.OH, s.OW}, input.options().memory_format(fmt));
  at::Tensor indices = at::empty({s.N, s.C, s.OH, s.OW},
                                 input.options().dtype(at::kLong).memory_format(fmt));
  if (output.numel() == 0) return std::make_tuple(output, indices);
  const std::vector<Span> rows =
      max_spans(s.H, s.OH, kernel_size[0], stride[0], padding[0], dilation[0]);
  const std::vector<Span> cols =
      max_spans(s.W, s.OW, kernel_size[1], stride[1], padding[1], dilation[1]);
  const bool small = s.H * s.W <= std::numeric_limits<int32_t>::max();
  if (fmt == at::MemoryFormat::ChannelsLast) {
    max_pool2d_nhwc(input, output, indices, s, rows, cols, kernel_size, dilation, small);
    return std::make_tuple(output, indices);
  }
  const at::Tensor in = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "cnnops_max_pool2d_cpu", [&] {
    const scalar_t* in_data = in.const_data_ptr<scalar_t>();
    scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
    int64_t* idx_data = indices.mutable_data_ptr<int64_t>();
    const int64_t plane_out = s.OH * s.OW;
    const int64_t window = kernel_size[0] * kernel_size[1];
    for_plane_chunks(s.N * s.C, plane_out * window, [&](int64_t begin, int64_t end) {
      const auto run = [&](auto* best) {
        max_pool_planes(in_data + begin * s.H * s.W, out_data + begin * plane_out,
                        idx_data + begin * plane_out, end - begin, s.H, s.W, s.OW, rows, cols,
                        kernel_size[1], stride[1], padding[1], dilation[0], dilation[1], best);
      };
      if (small) {
        std::vector<int32_t> best(s.OW);
        run(best.data());
      } else {
        std::vector<int64_t> best(s.OW);
        run(best.data());
      }
    });
  });
  return std::make_tuple(output, indices);
}

// Scatter-adds grad_output [N, C, OH, OW] into a zero grad_input shaped like
// input, at the offsets in indices (the max_pool2d indices). One thread owns a
// plane, so the scatter needs no window geometry; it is checked, not used.
at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output,
                                   const at::Tensor& input,
                                   const at::Tensor& indices,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_max_pool2d_backward(grad_output, input, indices, check_cpu_float, kernel_size, stride,
                            padding, dilation);
  const auto fmt = output_memory_format(input);
  if (grad_output.numel() == 0) return zeros_nchw(input.sizes(), input).contiguous(fmt);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
    max_pool2d_backward_nhwc(grad_output.contiguous(fmt), indices.contiguous(fmt), grad_input);
    return grad_input;
  }
  // Each plane is zeroed just before its scatter, while it is in cache (a
  // separate zero fill of the whole gradient is one more pass over memory).
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(
                                                        at::MemoryFormat::Contiguous));

  const int64_t HW = input.size(2) * input.size(3);
  const int64_t plane_out = grad_output.size(2) * grad_output.size(3);
  const at::Tensor gout = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "cnnops_max_pool2d_backward_cpu", [&] {
    const scalar_t* gout_data = gout.const_data_ptr<scalar_t>();
    const int64_t* idx_data = idx.const_data_ptr<int64_t>();
    scalar_t* gin_data = grad_input.mutable_data_ptr<scalar_t>();
    for_each_plane(input.size(0) * input.size(1), plane_out, [&](int64_t p) {
      const scalar_t* g = gout_data + p * plane_out;
      const int64_t* ind = idx_data + p * plane_out;
      scalar_t* gin = gin_data + p * HW;
      std::fill(gin, gin + HW, scalar_t(0));
      for (int64_t i = 0; i < plane_out; ++i) {
        const int64_t j = ind[i];
        if (j == -1) continue;  // a window with no tap
        // Indices are user data here; a bad one must not write out of bounds.
        TORCH_CHECK_VALUE(j >= 0 && j < HW, "max_pool2d_backward: index ", j,
                          " is outside the input plane of ", input.size(2), "x",
                          input.size(3), " elements (expected -1 or [0, ", HW, "))");
        gin[j] += g[i];
      }
    });
  });
  return grad_input.contiguous(fmt);
}

at::Tensor avg_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          bool ceil_mode, bool count_include_pad,
                          std::optional<int64_t> divisor_override) {
  const PoolShape s = check_pool2d("avg_pool2d", input, check_cpu_float, kernel_size, stride,
                                   padding, {}, ceil_mode);
  check_divisor_override("avg_pool2d", divisor_override);
  return avg_pool_forward(
      input, s.OH, s.OW,
      avg_spans(s.H, s.OH, kernel_size[0], stride[0], padding[0]),
      avg_spans(s.W, s.OW, kernel_size[1], stride[1], padding[1]),
      AvgDivisor{count_include_pad, divisor_override},
      kernel_size[0] * kernel_size[1]);
}

at::Tensor avg_pool2d_backward_cpu(const at::Tensor& grad_output,
                                   const at::Tensor& input,
                                   at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   bool ceil_mode, bool count_include_pad,
                                   std::optional<int64_t> divisor_override) {
  const PoolShape s = check_pool2d("avg_pool2d_backward", input, check_cpu_float, kernel_size,
                                   stride, padding, {}, ceil_mode);
  check_divisor_override("avg_pool2d_backward", divisor_override);
  check_4d(grad_output, "grad_output");
  check_same(grad_output, input, "grad_output", "input");
  const std::vector<int64_t> expected{s.N, s.C, s.OH, s.OW};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected),
                    "avg_pool2d_backward: expected grad_output of shape ",
                    at::IntArrayRef(expected),
                    " (the avg_pool2d output shape for input ", input.sizes(),
                    "), got ", grad_output.sizes());
  return avg_pool_backward(
      grad_output, input,
      avg_spans(s.H, s.OH, kernel_size[0], stride[0], padding[0]),
      avg_spans(s.W, s.OW, kernel_size[1], stride[1], padding[1]),
      AvgDivisor{count_include_pad, divisor_override},
      kernel_size[0] * kernel_size[1]);
}

namespace {
// adaptive_avg_pool2d allows N = 0 and C = 0 but needs a non-empty plane to
// bin, as in PyTorch.
// Bins overlap by at most one element per side, so a window spans about
// ceil(H/OH) + 1 rows.
int64_t adaptive_window(int64_t H, int64_t W, int64_t OH, int64_t OW) {
  return (H / std::max<int64_t>(OH, 1) + 2) * (W / std::max<int64_t>(OW, 1) + 2);
}
}  // namespace

at::Tensor adaptive_avg_pool2d_cpu(const at::Tensor& input,
                                   at::IntArrayRef output_size) {
  check_adaptive_input("adaptive_avg_pool2d", input, check_cpu_float);
  check_pair(output_size, "output_size", 0);
  const int64_t H = input.size(2), W = input.size(3);
  const int64_t OH = output_size[0], OW = output_size[1];
  return avg_pool_forward(input, OH, OW, adaptive_spans(H, OH),
                          adaptive_spans(W, OW), AvgDivisor{true, std::nullopt},
                          adaptive_window(H, W, OH, OW));
}

at::Tensor adaptive_avg_pool2d_backward_cpu(const at::Tensor& grad_output,
                                            const at::Tensor& input) {
  check_adaptive_input("adaptive_avg_pool2d_backward", input, check_cpu_float);
  check_pool_grad_output("adaptive_avg_pool2d_backward", grad_output, input);
  const int64_t H = input.size(2), W = input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  return avg_pool_backward(grad_output, input, adaptive_spans(H, OH),
                           adaptive_spans(W, OW), AvgDivisor{true, std::nullopt},
                           adaptive_window(H, W, OH, OW));
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
  m.impl("avg_pool2d", &avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cpu);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_cpu);
  m.impl("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward_cpu);
}

}  // namespace cnnops

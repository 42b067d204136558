// CPU convolution as im2col + GEMM, with pluggable epilogues and prologues.
//
// Layout assumed: input, output and gradients NCHW-contiguous; weight
// [OC, C/groups, KH, KW] contiguous. Callers convert other layouts.
//
// Work is split into contiguous chunks of images, one chunk per thread, each
// with its own column buffer (reused across its images, so it stays in cache)
// and its own weight-gradient accumulator (summed at the end in chunk order,
// so results do not depend on scheduling). With fewer images than threads the
// single chunk runs on the calling thread and the BLAS GEMM uses all threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cnnops/conv_shape.h"

namespace cnnops {
namespace cpu {

// Number of image chunks: one per thread, never more than images.
inline int64_t num_chunks(int64_t images) {
  return std::max<int64_t>(1, std::min<int64_t>(images, at::get_num_threads()));
}

// Runs fn(chunk, image_begin, image_end) for each chunk, in parallel.
template <typename F>
void for_each_chunk(int64_t images, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      fn(c, images * c / chunks, images * (c + 1) / chunks);
    }
  });
}

// Output positions ow in [lo, hi) read input columns inside [0, W) for the tap
// at offset `off` (= k*d - p): iw = ow*s + off.
inline void valid_range(int64_t off, int64_t s, int64_t W, int64_t OW,
                        int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = W - off <= 0 ? 0 : (W - off + s - 1) / s;
  // Padding can reach past the whole output row (e.g. a 5x5 kernel, padding 2,
  // on a 1-wide input): clamp both ends to the row.
  lo = std::min(lo, OW);
  hi = std::max(lo, std::min(hi, OW));
}

// cols[(c*KH + kh)*KW + kw][oh*OW + ow] = x[c][oh*sh - ph + kh*dh][ow*sw - pw + kw*dw]
// (zero outside the input), for one image and one group: x is [Cg, H, W].
template <typename T>
void im2col(const ConvShape& s, const T* x, T* cols) {
  const int64_t L = s.L();
  for (int64_t c = 0; c < s.Cg(); ++c) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        T* row = cols + ((c * s.KH + kh) * s.KW + kw) * L;
        const int64_t woff = kw * s.dw - s.pw;
        int64_t lo, hi;
        valid_range(woff, s.sw, s.W, s.OW, lo, hi);
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          T* dst = row + oh * s.OW;
          const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
          if (ih < 0 || ih >= s.H) {
            std::fill(dst, dst + s.OW, T(0));
            continue;
          }
          const T* src = x + (c * s.H + ih) * s.W + woff;
          std::fill(dst, dst + lo, T(0));
          if (s.sw == 1) {
            std::memcpy(dst + lo, src + lo, sizeof(T) * (hi - lo));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * s.sw];
          }
          std::fill(dst + hi, dst + s.OW, T(0));
        }
      }
    }
  }
}

// The adjoint of im2col: x[c][ih][iw] += cols[...] for one image and group.
template <typename T>
void col2im(const ConvShape& s, const T* cols, T* x) {
  const int64_t L = s.L();
  for (int64_t c = 0; c < s.Cg(); ++c) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const T* row = cols + ((c * s.KH + kh) * s.KW + kw) * L;
        const int64_t woff = kw * s.dw - s.pw;
        int64_t lo, hi;
        valid_range(woff, s.sw, s.W, s.OW, lo, hi);
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
          if (ih < 0 || ih >= s.H) continue;
          const T* src = row + oh * s.OW;
          T* dst = x + (c * s.H + ih) * s.W + woff;
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow * s.sw] += src[ow];
        }
      }
    }
  }
}

// y[c][l] += bias[c] over one image's [channels, L] output (bias may be null).
template <typename T>
void add_channel_bias(T* y, const T* bias, int64_t channels, int64_t L) {
  if (!bias) return;
  for (int64_t c = 0; c < channels; ++c) {
    T* row = y + c * L;
    for (int64_t l = 0; l < L; ++l) row[l] += bias[c];
  }
}

// A [rows, cols] row-major matrix at `data`, as a tensor that aliases it.
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(data, {rows, cols}, opts);
}

// out = conv(x, w) for every image, then epilogue(n, out_n) on each image's
// [OC, L] output while it is still in cache.
//   x: [N, C, H, W], w: [OC, Cg, KH, KW], out: [N, OC, OH, OW], all contiguous.
template <typename T, typename Epilogue>
void conv_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                  at::Tensor& out, const Epilogue& epilogue) {
  // The GEMMs below are implementation details, not autograd-visible ops.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg();
  const auto opts = x.options();
  const at::Tensor w3 = w.view({s.groups, OCg, K});
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t chunks = num_chunks(s.N);
  for_each_chunk(s.N, chunks, [&](int64_t, int64_t nb, int64_t ne) {
    at::Tensor cols = s.pointwise() ? at::Tensor() : at::empty({K, L}, opts);
    for (int64_t n = nb; n < ne; ++n) {
      for (int64_t g = 0; g < s.groups; ++g) {
        const T* xg = xp + (n * s.C + g * s.Cg()) * s.H * s.W;
        at::Tensor colg;
        if (s.pointwise()) {
          colg = matrix(const_cast<T*>(xg), K, L, opts);
        } else {
          im2col(s, xg, cols.mutable_data_ptr<T>());
          colg = cols;
        }
        at::Tensor outg = matrix(op + (n * s.OC + g * OCg) * L, OCg, L, opts);
        at::mm_out(outg, w3[g], colg);
      }
      epilogue(n, op + n * s.OC * L);
    }
  });
}

// Backward of conv for every image. grad_of(n, scratch) returns the [OC, L]
// output gradient of image n: either a pointer into an existing tensor, or
// `scratch` (a per-chunk [OC, L] buffer) filled by the caller's prologue.
// Writes grad_input (zero-initialised here) and grad_weight / grad_bias when
// defined; grad_bias is accumulated in double and cast at the end.
template <typename T, typename GradOf>
void conv_backward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                   const GradOf& grad_of, at::Tensor grad_input,
                   at::Tensor grad_weight, at::Tensor grad_bias) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg();
  const auto opts = x.options();
  const bool need_gi = grad_input.defined(), need_gw = grad_weight.defined(),
             need_gb = grad_bias.defined();
  const at::Tensor w3 = w.view({s.groups, OCg, K});
  const T* xp = x.const_data_ptr<T>();
  T* gip = need_gi ? grad_input.mutable_data_ptr<T>() : nullptr;
  if (need_gi && !s.pointwise()) grad_input.zero_();

  const int64_t chunks = num_chunks(s.N);
  // Per-chunk partial sums; chunk 0 writes straight into the result.
  std::vector<at::Tensor> gw_part(chunks);
  std::vector<std::vector<double>> gb_part(chunks);
  for_each_chunk(s.N, chunks, [&](int64_t chunk, int64_t nb, int64_t ne) {
    at::Tensor scratch = at::empty({s.OC, L}, opts);
    at::Tensor cols = s.pointwise() ? at::Tensor() : at::empty({K, L}, opts);
    at::Tensor gw3;
    if (need_gw) {
      gw3 = chunk == 0 ? grad_weight.view({s.groups, OCg, K})
                       : at::empty({s.groups, OCg, K}, opts);
      gw3.zero_();
      gw_part[chunk] = gw3;
    }
    if (need_gb) gb_part[chunk].assign(s.OC, 0.0);
    for (int64_t n = nb; n < ne; ++n) {
      const T* gy = grad_of(n, scratch.mutable_data_ptr<T>());
      for (int64_t g = 0; g < s.groups; ++g) {
        at::Tensor gyg = matrix(const_cast<T*>(gy) + g * OCg * L, OCg, L, opts);
        const T* xg = xp + (n * s.C + g * s.Cg()) * s.H * s.W;
        if (need_gi) {
          T* gig = gip + (n * s.C + g * s.Cg()) * s.H * s.W;
          if (s.pointwise()) {
            at::Tensor gi_mat = matrix(gig, K, L, opts);
            at::mm_out(gi_mat, w3[g].t(), gyg);
          } else {
            at::mm_out(cols, w3[g].t(), gyg);
            col2im(s, cols.const_data_ptr<T>(), gig);
          }
        }
        if (need_gw) {
          at::Tensor colg;
          if (s.pointwise()) {
            colg = matrix(const_cast<T*>(xg), K, L, opts);
          } else {
            im2col(s, xg, cols.mutable_data_ptr<T>());
            colg = cols;
          }
          gw3[g].addmm_(gyg, colg.t());
        }
      }
      if (need_gb) {
        for (int64_t oc = 0; oc < s.OC; ++oc) {
          double acc = 0;
          const T* row = gy + oc * L;
          for (int64_t l = 0; l < L; ++l) acc += row[l];
          gb_part[chunk][oc] += acc;
        }
      }
    }
  });
  if (need_gw) {
    for (int64_t c = 1; c < chunks; ++c) gw_part[0].add_(gw_part[c]);
  }
  if (need_gb) {
    std::vector<double> total(s.OC, 0.0);
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t oc = 0; oc < s.OC; ++oc) total[oc] += gb_part[c][oc];
    }
    T* gbp = grad_bias.mutable_data_ptr<T>();
    for (int64_t oc = 0; oc < s.OC; ++oc) gbp[oc] = static_cast<T>(total[oc]);
  }
}

}  // namespace cpu
}  // namespace cnnops

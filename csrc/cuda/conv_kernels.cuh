// GPU convolution as im2col + cuBLAS GEMM (via at::mm / at::bmm), batched over
// several images per GEMM, shared by conv2d.cu and conv_bn_relu.cu.
//
// Two data paths, chosen by the layout rule of the output
// (cnnops::output_memory_format):
//
//  NCHW path (output NCHW-contiguous; the input may have any strides, im2col
//  reads it through them):
//    cols  [groups, K, B*L]   K = Cg*KH*KW ordered (c, kh, kw), the columns of
//                             B images side by side
//    out   [groups, OCg, B*L] = weight[groups, OCg, K] @ cols
//  The GEMM result is channel-major ([OC, B, L]); the epilogue kernel (bias,
//  BN scale/shift, residual, ReLU) reads it and writes the NCHW output, so the
//  permutation costs no extra pass. Backward: the output gradient of the chunk
//  is a channel-major [OC, B*L] matrix too, dcols = weight^T @ dy, col2im
//  gathers it into grad_input, and grad_weight = dy @ cols^T is one GEMM per
//  chunk (one per group).
//
//  NHWC path (channels_last input and output):
//    rows  [B*L, groups*K]    K = KH*KW*Cg ordered (kh, kw, c), so each tap
//                             copies Cg contiguous channels
//    out   [B*L, OC]          = rows @ weight'^T, where weight' is the weight
//                             permuted to [OC, KH, KW, Cg]
//  [B*L, OC] is the channels_last output itself, so the GEMM writes the output
//  in place and the epilogue runs in place. A 1x1, stride-1, unpadded conv
//  uses the input itself as `rows` (no im2row). Backward: drows = dy @ weight',
//  row2im gathers it into grad_input, grad_weight' = dy^T @ rows.
//
// Images are processed in chunks of B images whose column buffer fits a
// workspace budget (kWorkspaceBytes); a typical layer runs in one to a few
// chunks, each a single GEMM per group (groups > 1 use one batched GEMM).
// col2im / row2im are gathers (each input element sums the columns that read
// it): deterministic, no atomics. All index arithmetic is 64-bit.
#pragma once

#include "bn_kernels.cuh"
#include "cnnops/conv_shape.h"

namespace cnnops {
namespace gpu {

// Bytes of column buffer (plus, on the NCHW path, GEMM output buffer) that a
// chunk of images may use. Larger chunks mean fewer, larger GEMMs; 256 MiB is
// a few percent of a data-centre GPU and holds dozens of images of any
// ResNet layer.
constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;

// Images per chunk when each image has L output positions and needs
// `per_image` elements of workspace (0: none). B*L is a dimension of every
// GEMM, and cuBLAS takes 32-bit sizes: a chunk never has more than INT_MAX
// output positions.
inline int64_t images_per_chunk(int64_t N, int64_t L, int64_t per_image, int64_t elem_size) {
  if (N <= 0) return 1;
  int64_t fit = std::numeric_limits<int32_t>::max() / std::max<int64_t>(L, 1);
  if (per_image > 0) fit = std::min<int64_t>(fit, kWorkspaceBytes / (per_image * elem_size));
  return std::max<int64_t>(1, std::min<int64_t>(fit, N));
}

// Geometry passed to the kernels by value.
struct ConvGeom {
  int64_t C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, groups, Cg;
};

inline ConvGeom geom(const ConvShape& s) {
  return ConvGeom{s.C, s.H, s.W, s.KH, s.KW, s.OH, s.OW, s.sh, s.sw,
                  s.ph, s.pw, s.dh, s.dw, s.groups, s.Cg()};
}

// ---- kernels -------------------------------------------------------------

// cols[(c*KH + kh)*KW + kw][b*L + oh*OW + ow] = x[b][c][oh*sh - ph + kh*dh][ow*sw - pw + kw*dw]
// (zero outside the input) for the Bc images at x (strides sN, sC, sH, sW).
// One thread per (c, b, oh, ow), looping over the taps; consecutive threads
// write consecutive columns.
template <typename scalar_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, int64_t sN, int64_t sC,
                              int64_t sH, int64_t sW, int64_t Bc, ConvGeom g,
                              scalar_t* __restrict__ cols) {
  const int64_t L = g.OH * g.OW;
  const int64_t ld = Bc * L;  // row length of cols
  const int64_t total = g.C * ld;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = idx % g.OW;
    int64_t t = idx / g.OW;
    const int64_t oh = t % g.OH;
    t /= g.OH;
    const int64_t b = t % Bc;
    const int64_t c = t / Bc;
    const scalar_t* xp = x + b * sN + c * sC;
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    scalar_t* dst = cols + c * g.KH * g.KW * ld + b * L + oh * g.OW + ow;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = ih0 + kh * g.dh;
      const bool h_in = ih >= 0 && ih < g.H;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = iw0 + kw * g.dw;
        *dst = (h_in && iw >= 0 && iw < g.W) ? xp[ih * sH + iw * sW] : scalar_t(0);
        dst += ld;
      }
    }
  }
}

// The adjoint of im2col as a gather: gi[b][c][ih][iw] (NCHW-contiguous, the
// Bc images of the chunk) = the sum of the columns that read that input
// element. Tap kh reads ih from output row oh = (ih + ph - kh*dh) / sh when
// that division is exact and 0 <= oh < OH (likewise for kw).
template <typename scalar_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ cols, int64_t Bc, ConvGeom g,
                              scalar_t* __restrict__ gi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = g.OH * g.OW;
  const int64_t ld = Bc * L;
  const int64_t total = Bc * g.C * g.H * g.W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = idx % g.W;
    int64_t t = idx / g.W;
    const int64_t ih = t % g.H;
    t /= g.H;
    const int64_t c = t % g.C;
    const int64_t b = t / g.C;
    acc_t sum = 0;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t h_off = ih + g.ph - kh * g.dh;
      if (h_off < 0) break;  // decreases with kh
      if (h_off % g.sh != 0) continue;
      const int64_t oh = h_off / g.sh;
      if (oh >= g.OH) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t w_off = iw + g.pw - kw * g.dw;
        if (w_off < 0) break;
        if (w_off % g.sw != 0) continue;
        const int64_t ow = w_off / g.sw;
        if (ow >= g.OW) continue;
        sum += static_cast<acc_t>(
            cols[((c * g.KH + kh) * g.KW + kw) * ld + b * L + oh * g.OW + ow]);
      }
    }
    gi[idx] = static_cast<scalar_t>(sum);
  }
}

// rows[m][gr*K + (kh*KW + kw)*Cg + c] = x[b][gr*Cg + c][ih][iw] for the Bc
// images at x (m = b*L + oh*OW + ow). The Cg channels of one (m, group, tap)
// are a contiguous "segment" of rows, at offset seg*Cg where
// seg = ((m*groups + gr)*KH + kh)*KW + kw. threadIdx.x runs along a segment,
// threadIdx.y over segments.
template <typename scalar_t>
__global__ void im2row_kernel(const scalar_t* __restrict__ x, int64_t sN, int64_t sC,
                              int64_t sH, int64_t sW, int64_t Bc, ConvGeom g,
                              scalar_t* __restrict__ rows) {
  const int64_t L = g.OH * g.OW;
  const int64_t segments = Bc * L * g.groups * g.KH * g.KW;
  for (int64_t seg = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
       seg < segments; seg += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t kw = seg % g.KW;
    int64_t t = seg / g.KW;
    const int64_t kh = t % g.KH;
    t /= g.KH;
    const int64_t gr = t % g.groups;
    const int64_t m = t / g.groups;
    const int64_t b = m / L, l = m - b * L;
    const int64_t oh = l / g.OW, ow = l - oh * g.OW;
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
    scalar_t* dst = rows + seg * g.Cg;
    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
      const scalar_t* src = x + b * sN + ih * sH + iw * sW + gr * g.Cg * sC;
      for (int64_t c = threadIdx.x; c < g.Cg; c += blockDim.x) dst[c] = src[c * sC];
    } else {
      for (int64_t c = threadIdx.x; c < g.Cg; c += blockDim.x) dst[c] = scalar_t(0);
    }
  }
}

// The adjoint of im2row as a gather into gi (NHWC-dense, the Bc images of the
// chunk): threadIdx.y over input pixels (b, ih, iw), threadIdx.x over channels.
template <typename scalar_t>
__global__ void row2im_kernel(const scalar_t* __restrict__ rows, int64_t Bc, ConvGeom g,
                              scalar_t* __restrict__ gi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pixels = Bc * g.H * g.W;
  const int64_t K = g.KH * g.KW * g.Cg;
  const int64_t row_len = g.groups * K;
  for (int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; pix < pixels;
       pix += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t iw = pix % g.W;
    int64_t t = pix / g.W;
    const int64_t ih = t % g.H;
    const int64_t b = t / g.H;
    for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
      const int64_t gr = c / g.Cg, cg = c - gr * g.Cg;
      acc_t sum = 0;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        const int64_t h_off = ih + g.ph - kh * g.dh;
        if (h_off < 0) break;
        if (h_off % g.sh != 0) continue;
        const int64_t oh = h_off / g.sh;
        if (oh >= g.OH) continue;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int64_t w_off = iw + g.pw - kw * g.dw;
          if (w_off < 0) break;
          if (w_off % g.sw != 0) continue;
          const int64_t ow = w_off / g.sw;
          if (ow >= g.OW) continue;
          const int64_t m = (b * g.OH + oh) * g.OW + ow;
          sum += static_cast<acc_t>(rows[m * row_len + gr * K + (kh * g.KW + kw) * g.Cg + cg]);
        }
      }
      gi[pix * g.C + c] = static_cast<scalar_t>(sum);
    }
  }
}

// ---- launchers -------------------------------------------------------------------

// Block for the segment kernels: threadIdx.x along `inner` contiguous values.
inline dim3 segment_block(int64_t inner) {
  const int bx = pow2_clamp(inner, 1, kThreads);
  return dim3(bx, kThreads / bx);
}

// im2col of images [nb, nb + Bc) of x into cols (contiguous, C*KH*KW x Bc*L).
inline void launch_im2col(const ConvShape& s, const at::Tensor& x, int64_t nb, int64_t Bc,
                          const at::Tensor& cols) {
  const int64_t total = s.C * Bc * s.L();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnops_im2col", [&] {
    im2col_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>() + nb * x.stride(0), x.stride(0), x.stride(1), x.stride(2),
        x.stride(3), Bc, geom(s), cols.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// col2im of cols (contiguous, C*KH*KW x Bc*L) into images [nb, nb + Bc) of
// gi (NCHW-contiguous).
inline void launch_col2im(const ConvShape& s, const at::Tensor& cols, int64_t nb, int64_t Bc,
                          const at::Tensor& gi) {
  const int64_t total = Bc * s.C * s.H * s.W;
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "cnnops_col2im", [&] {
    col2im_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        cols.const_data_ptr<scalar_t>(), Bc, geom(s),
        gi.mutable_data_ptr<scalar_t>() + nb * s.C * s.H * s.W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// im2row of images [nb, nb + Bc) of x into rows (contiguous, Bc*L x C*KH*KW).
inline void launch_im2row(const ConvShape& s, const at::Tensor& x, int64_t nb, int64_t Bc,
                          const at::Tensor& rows) {
  const int64_t segments = Bc * s.L() * s.groups * s.KH * s.KW;
  if (segments == 0 || s.Cg() == 0) return;
  const dim3 block = segment_block(s.Cg());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnops_im2row", [&] {
    im2row_kernel<scalar_t><<<grid_for(segments, block.y), block, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>() + nb * x.stride(0), x.stride(0), x.stride(1), x.stride(2),
        x.stride(3), Bc, geom(s), rows.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// row2im of rows (contiguous, Bc*L x C*KH*KW) into images [nb, nb + Bc) of
// gi (dense channels_last).
inline void launch_row2im(const ConvShape& s, const at::Tensor& rows, int64_t nb, int64_t Bc,
                          const at::Tensor& gi) {
  const int64_t pixels = Bc * s.H * s.W;
  if (pixels == 0 || s.C == 0) return;
  const dim3 block = segment_block(s.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "cnnops_row2im", [&] {
    row2im_kernel<scalar_t><<<grid_for(pixels, block.y), block, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        rows.const_data_ptr<scalar_t>(), Bc, geom(s),
        gi.mutable_data_ptr<scalar_t>() + nb * s.H * s.W * s.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// out[g] = a[g] @ b[g] for 3-D operands [groups, ., .] of any strides
// (one at::mm when groups == 1, else one at::bmm). `out` may be a strided
// view: ATen writes through it (copying via a temporary if cuBLAS cannot
// address it directly).
inline void group_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.size(0) == 1) {
    at::Tensor o = out.select(0, 0);
    at::mm_out(o, a.select(0, 0), b.select(0, 0));
  } else {
    at::Tensor o = out;
    at::bmm_out(o, a, b);
  }
}

inline at::Tensor group_gemm(const at::Tensor& a, const at::Tensor& b) {
  return a.size(0) == 1 ? at::mm(a.select(0, 0), b.select(0, 0)).unsqueeze(0) : at::bmm(a, b);
}

// Accumulates per-chunk weight gradients [groups, OCg, K]: the first chunk is
// written straight into `result`; with several chunks the sum is kept in the
// accumulation dtype (float for half/bfloat16) and written at the end.
class WeightGradSum {
 public:
  WeightGradSum(at::Tensor result, int64_t chunks) : result_(std::move(result)) {
    if (result_.defined() && chunks > 1) {
      acc_ = at::zeros(result_.sizes(), result_.options().dtype(acc_dtype(result_.scalar_type())));
    }
  }
  bool wanted() const { return result_.defined(); }
  void add(const at::Tensor& a, const at::Tensor& b) {
    if (!acc_.defined()) {
      group_gemm(result_, a, b);
    } else {
      acc_.add_(group_gemm(a, b));
    }
  }
  void finish() {
    if (acc_.defined()) result_.copy_(acc_);
  }

 private:
  at::Tensor result_, acc_;
};

// ---- forward -----------------------------------------------------------------

// Runs conv(x, w) chunk by chunk on the NCHW path. For each chunk of Bc images
// starting at nb, epilogue(nb, Bc, buf) receives the raw GEMM result
// buf = [OC, Bc*L] (contiguous, channel-major). x: [N, C, H, W] any strides;
// w: [OC, Cg, KH, KW] contiguous.
template <typename Epilogue>
void conv_forward_nchw(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                       const Epilogue& epilogue) {
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg(), CKK = s.C * s.KH * s.KW;
  const int64_t chunk = images_per_chunk(s.N, L, (CKK + s.OC) * L, x.element_size());
  at::Tensor ws_cols = at::empty({CKK * chunk * L}, x.options());
  at::Tensor ws_out = at::empty({s.OC * chunk * L}, x.options());
  const at::Tensor w3 = w.view({s.groups, OCg, K});
  for (int64_t nb = 0; nb < s.N; nb += chunk) {
    const int64_t Bc = std::min(chunk, s.N - nb), BL = Bc * L;
    at::Tensor cols = ws_cols.narrow(0, 0, CKK * BL).view({s.groups, K, BL});
    at::Tensor buf = ws_out.narrow(0, 0, s.OC * BL).view({s.groups, OCg, BL});
    launch_im2col(s, x, nb, Bc, cols);
    group_gemm(buf, w3, cols);
    epilogue(nb, Bc, buf.view({s.OC, BL}));
  }
}

// Runs conv(x, w) chunk by chunk on the NHWC path, writing the raw GEMM result
// into out2d = [N*L, OC] (the channels_last output viewed as rows), then
// calling epilogue(nb, Bc, out_chunk) on the chunk's [Bc*L, OC] rows.
// x: [N, C, H, W] channels_last; w2: [OC, KH, KW, Cg] contiguous.
template <typename Epilogue>
void conv_forward_nhwc(const ConvShape& s, const at::Tensor& x, const at::Tensor& w2,
                       const at::Tensor& out2d, const Epilogue& epilogue) {
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg(), CKK = s.C * s.KH * s.KW;
  const bool direct = s.pointwise();
  const int64_t chunk = images_per_chunk(s.N, L, direct ? 0 : CKK * L, x.element_size());
  at::Tensor ws_rows = direct ? at::Tensor() : at::empty({chunk * L * CKK}, x.options());
  const at::Tensor x2d = direct ? x.permute({0, 2, 3, 1}).reshape({s.N * s.H * s.W, s.C})
                                : at::Tensor();
  // weight'^T per group: [groups, K, OCg]
  const at::Tensor wt = w2.view({s.groups, OCg, K}).transpose(1, 2);
  for (int64_t nb = 0; nb < s.N; nb += chunk) {
    const int64_t Bc = std::min(chunk, s.N - nb), BL = Bc * L;
    at::Tensor rows;
    if (direct) {
      rows = x2d.narrow(0, nb * L, BL);
    } else {
      rows = ws_rows.narrow(0, 0, BL * CKK).view({BL, CKK});
      launch_im2row(s, x, nb, Bc, rows);
    }
    at::Tensor out_chunk = out2d.narrow(0, nb * L, BL);
    group_gemm(out_chunk.view({BL, s.groups, OCg}).transpose(0, 1),
               rows.view({BL, s.groups, K}).transpose(0, 1), wt);
    epilogue(nb, Bc, out_chunk);
  }
}

// The weight in the NHWC path's tap order: [OC, KH, KW, Cg] contiguous.
inline at::Tensor weight_nhwc(const at::Tensor& w) {
  return w.permute({0, 2, 3, 1}).contiguous();
}

// conv(x, w) with a fused epilogue
//   y = relu?((conv - center) * scale + shift + residual?)
// written into `out` ([N, OC, OH, OW]: dense channels_last when `nhwc`, else
// NCHW-contiguous). center / scale / shift are acc-dtype [OC] tensors or
// undefined (a conv bias is a shift); residual is undefined or has out's shape
// and layout.
inline void conv_forward_fused(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                               bool nhwc, const at::Tensor& out, const at::Tensor& center,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& residual, bool relu) {
  if (s.N == 0) return;
  const int64_t L = s.L(), OC = s.OC;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cnnops_conv_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* ce = ptr_or_null<acc_t>(center);
    const acc_t* sc = ptr_or_null<acc_t>(scale);
    const acc_t* sh = ptr_or_null<acc_t>(shift);
    const scalar_t* rp = ptr_or_null<scalar_t>(residual);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool any = ce != nullptr || sc != nullptr || sh != nullptr || rp != nullptr || relu;
    if (nhwc) {
      conv_forward_nhwc(s, x, weight_nhwc(w), as_rows(out),
                        [&](int64_t nb, int64_t Bc, const at::Tensor&) {
                          if (!any) return;
                          scalar_t* yp = op + nb * L * OC;
                          const ActView v = rows_view(Bc, OC, L);
                          launch_apply<scalar_t>(yp, v, rp ? rp + nb * L * OC : nullptr, v, yp, v,
                                                 ce, sc, sh, relu);
                        });
    } else {
      conv_forward_nchw(s, x, w, [&](int64_t nb, int64_t Bc, const at::Tensor& buf) {
        // channel-major [OC, Bc, L] -> NCHW [Bc, OC, L]
        const ActView src = planes_view(Bc, OC, L, L, Bc * L);
        const ActView dst = nchw_view(Bc, OC, L);
        launch_apply<scalar_t>(buf.const_data_ptr<scalar_t>(), src,
                               rp ? rp + nb * OC * L : nullptr, dst, op + nb * OC * L, dst, ce,
                               sc, sh, relu);
      });
    }
  });
}

// ---- backward -------------------------------------------------------------------

// Backward of conv on the NCHW path. dy_of(nb, Bc) returns the output
// gradient of images [nb, nb + Bc) as a channel-major [OC, Bc*L] matrix (any
// row stride). Writes gi (NCHW-contiguous [N, C, H, W]) and gw ([OC, Cg, KH,
// KW] contiguous) when defined.
template <typename DyOf>
void conv_backward_nchw(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                        const DyOf& dy_of, const at::Tensor& gi, const at::Tensor& gw) {
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg(), CKK = s.C * s.KH * s.KW;
  const int64_t chunk = images_per_chunk(s.N, L, (CKK + s.OC) * L, x.element_size());
  const int64_t chunks = ceil_div(s.N, chunk);
  at::Tensor ws_cols = at::empty({CKK * chunk * L}, x.options());
  const at::Tensor w3 = w.view({s.groups, OCg, K});
  WeightGradSum gw_sum(gw.defined() ? gw.view({s.groups, OCg, K}) : at::Tensor(), chunks);
  for (int64_t nb = 0; nb < s.N; nb += chunk) {
    const int64_t Bc = std::min(chunk, s.N - nb), BL = Bc * L;
    const at::Tensor dy3 = dy_of(nb, Bc).view({s.groups, OCg, BL});
    at::Tensor cols = ws_cols.narrow(0, 0, CKK * BL).view({s.groups, K, BL});
    if (gi.defined()) {
      group_gemm(cols, w3.transpose(1, 2), dy3);  // dcols = w^T @ dy
      launch_col2im(s, cols, nb, Bc, gi);
    }
    if (gw_sum.wanted()) {
      launch_im2col(s, x, nb, Bc, cols);
      gw_sum.add(dy3, cols.transpose(1, 2));  // gw += dy @ cols^T
    }
  }
  gw_sum.finish();
}

// Backward of conv on the NHWC path. dy2d: [N*L, OC] contiguous (the
// channels_last output gradient as rows). Writes gi (dense channels_last) and
// gw2 ([OC, KH, KW, Cg] contiguous) when defined.
inline void conv_backward_nhwc(const ConvShape& s, const at::Tensor& x, const at::Tensor& w2,
                               const at::Tensor& dy2d, const at::Tensor& gi,
                               const at::Tensor& gw2) {
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg(), CKK = s.C * s.KH * s.KW;
  const bool direct = s.pointwise();
  const int64_t chunk = images_per_chunk(s.N, L, direct ? 0 : CKK * L, x.element_size());
  const int64_t chunks = ceil_div(s.N, chunk);
  at::Tensor ws_rows = direct ? at::Tensor() : at::empty({chunk * L * CKK}, x.options());
  const at::Tensor x2d = (direct && gw2.defined())
                             ? x.permute({0, 2, 3, 1}).reshape({s.N * s.H * s.W, s.C})
                             : at::Tensor();
  const at::Tensor gi2d = (direct && gi.defined()) ? as_rows(gi) : at::Tensor();
  const at::Tensor w3 = w2.view({s.groups, OCg, K});
  WeightGradSum gw_sum(gw2.defined() ? gw2.view({s.groups, OCg, K}) : at::Tensor(), chunks);
  for (int64_t nb = 0; nb < s.N; nb += chunk) {
    const int64_t Bc = std::min(chunk, s.N - nb), BL = Bc * L;
    const at::Tensor dy = dy2d.narrow(0, nb * L, BL);
    const at::Tensor dy3 = dy.view({BL, s.groups, OCg}).transpose(0, 1);  // [groups, BL, OCg]
    if (gi.defined()) {
      at::Tensor drows = direct ? gi2d.narrow(0, nb * L, BL)
                                : ws_rows.narrow(0, 0, BL * CKK).view({BL, CKK});
      group_gemm(drows.view({BL, s.groups, K}).transpose(0, 1), dy3, w3);  // dy @ w'
      if (!direct) launch_row2im(s, drows, nb, Bc, gi);
    }
    if (gw_sum.wanted()) {
      at::Tensor rows;
      if (direct) {
        rows = x2d.narrow(0, nb * L, BL);
      } else {
        rows = ws_rows.narrow(0, 0, BL * CKK).view({BL, CKK});
        launch_im2row(s, x, nb, Bc, rows);
      }
      gw_sum.add(dy3.transpose(1, 2), rows.view({BL, s.groups, K}).transpose(0, 1));
    }
  }
  gw_sum.finish();
}

// Whether a conv whose input is `input` runs on the NHWC path.
inline bool uses_nhwc(const at::Tensor& input) {
  return output_memory_format(input) == at::MemoryFormat::ChannelsLast;
}

// A residual / output-gradient tensor of the conv output's shape, in the
// layout `fmt` (an explicit copy only when it is in another layout).
inline at::Tensor in_layout(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.defined() ? t.contiguous(fmt) : t;
}

// The optional residual of a fused conv: checked like the CPU kernels'
// (cnnops::conv_residual) and brought to the output layout.
inline at::Tensor conv_residual_cuda(const c10::optional<at::Tensor>& residual,
                                     const at::Tensor& input, const ConvShape& s,
                                     at::MemoryFormat fmt) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  check_same(*residual, input, "residual", "input");
  const int64_t shape[] = {s.N, s.OC, s.OH, s.OW};
  TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(shape),
                    "expected residual of the conv output's shape ", at::IntArrayRef(shape),
                    ", got ", residual->sizes());
  return residual->contiguous(fmt);
}

// Runs the conv backward for an output gradient held in `dy`:
//  NCHW path: dy is channel-major [OC, N*L] (contiguous);
//  NHWC path: dy is [N*L, OC] (contiguous rows).
// Writes gi (in the input's output layout) and gw (contiguous, [OC, Cg, KH,
// KW]) when defined.
inline void conv_backward_from_buffer(const ConvShape& s, const at::Tensor& x,
                                      const at::Tensor& w, const at::Tensor& dy, bool nhwc,
                                      const at::Tensor& gi, const at::Tensor& gw) {
  if (s.N == 0) {
    if (gw.defined()) gw.zero_();
    return;
  }
  if (nhwc) {
    at::Tensor gw2 = gw.defined() ? at::empty({s.OC, s.KH, s.KW, s.Cg()}, w.options())
                                  : at::Tensor();
    conv_backward_nhwc(s, x, weight_nhwc(w), dy, gi, gw2);
    if (gw.defined()) gw.copy_(gw2.permute({0, 3, 1, 2}));
  } else {
    const int64_t L = s.L();
    conv_backward_nchw(
        s, x, w, [&](int64_t nb, int64_t Bc) { return dy.narrow(1, nb * L, Bc * L); }, gi, gw);
  }
}

}  // namespace gpu
}  // namespace cnnops

// Winograd F(2x2, 3x3): a 3x3, stride-1 convolution with 2.25x fewer
// multiplications than the direct one (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2015).
//
// The output is cut into 2x2 tiles; tile (th, tw) of an output plane reads the
// 4x4 input patch d whose top-left corner is input (2*th - ph, 2*tw - pw)
// (zeros past the edges). With
//
//   B^T = | 1  0 -1  0 |     G = | 1    0    0   |     A^T = | 1  1  1  0 |
//         | 0  1  1  0 |         | 1/2  1/2  1/2 |           | 0  1 -1 -1 |
//         | 0 -1  1  0 |         | 1/2 -1/2  1/2 |
//         | 0  1  0 -1 |         | 0    0    1   |
//
// each input patch becomes V = B^T d B and each 3x3 filter g becomes
// U = G g G^T (4x4 each); then for each of the 16 entries e of a 4x4 tile,
// M[e] = U[e] (K x C) @ V[e] (C x tiles): 16 GEMMs that do the convolution's
// channel sums; and each output tile is A^T M A (2x2). B and A hold only 0 and
// +-1, so the transforms are additions; G's halves are exact in binary. In
// float32 the result is as close to the exact one as the direct convolution's
// (tests/test_winograd.py checks the index math in Python against torch, and
// the kernels against torch's convolution).
//
// The loops over tiles or channels are marked `#pragma GCC ivdep`: they read
// and write through many pointers into distinct buffers, and GCC's runtime
// alias checks between so many leave them scalar otherwise (channels_last
// input transform, 64 channels at 32x32: 2x faster with it).
//
// Layouts: a tile's 16 entries e = 4*i + j (row i, column j of the 4x4 tile);
// V [C][16][P] and M [K][16][P] over tile columns p = (n*TH + th)*TW + tw
// (GEMM e reads V[:, e, :] as a matrix of row stride 16*P); the transformed
// weight U [16][K][C]. The row kernels below run on one tile row
// (th) of one channel plane, vectorised across the row's TW tiles: the 4 input
// rows are split into even and odd columns, so every step is a contiguous run.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "bn_kernels.h"
#include "vectorised.h"

namespace cnnops {
namespace cpu {

// Tiles of an output of OH x OW: ceil(OH/2) x ceil(OW/2).
inline int64_t winograd_tiles(int64_t out) { return (out + 1) / 2; }

// U = G g G^T: u [16][R][S] for R filters g(r, s) of S channels each, the
// rows r in [rb, re). From w [K, C, 3, 3] contiguous: g(r, s) = w[r][s] (R =
// K, S = C), or with rotated, w[s][r] rotated by 180 degrees (R = C, S = K:
// the filters of the input gradient, winograd_conv_input_grad). Each row's S
// filters are first copied tap by tap into buf (9 * S values), so that the
// transform runs vectorised across them.
template <typename T>
CNNOPS_VECTORISED void winograd_weight(const T* w, int64_t K, int64_t C, bool rotated,
                                       int64_t rb, int64_t re, T* u, T* buf) {
  const int64_t R = rotated ? C : K, S = rotated ? K : C, plane = R * S;
  const T h = T(0.5);
  for (int64_t r = rb; r < re; ++r) {
    for (int64_t s = 0; s < S; ++s) {  // buf[t * S + s]: tap t (3 * row + column) of g(r, s)
      const T* g = w + (rotated ? s * C + r : r * C + s) * 9;
      for (int64_t t = 0; t < 9; ++t) buf[t * S + s] = g[rotated ? 8 - t : t];
    }
    T* dst = u + r * S;
#pragma GCC ivdep
    for (int64_t s = 0; s < S; ++s) {
      T gg[4][3];  // G g: rows of g combined
      for (int64_t j = 0; j < 3; ++j) {
        const T g0 = buf[j * S + s], g1 = buf[(3 + j) * S + s], g2 = buf[(6 + j) * S + s];
        gg[0][j] = g0;
        gg[1][j] = h * (g0 + g1 + g2);
        gg[2][j] = h * (g0 - g1 + g2);
        gg[3][j] = g2;
      }
      for (int64_t i = 0; i < 4; ++i) {  // (G g) G^T: columns combined
        const T* q = gg[i];
        dst[(4 * i) * plane + s] = q[0];
        dst[(4 * i + 1) * plane + s] = h * (q[0] + q[1] + q[2]);
        dst[(4 * i + 2) * plane + s] = h * (q[0] - q[1] + q[2]);
        dst[(4 * i + 3) * plane + s] = q[2];
      }
    }
  }
}

// V for tile row th of one input plane x [H, W]: entry e of tile tw goes to
// v[e * ldv + tw]. buf: scratch of 10 * (TW + 1) + 2 values.
template <typename T>
CNNOPS_VECTORISED void winograd_input_row(const T* x, int64_t H, int64_t W, int64_t ph,
                                          int64_t pw, int64_t th, int64_t TW, T* v,
                                          int64_t ldv, T* buf) {
  const int64_t n = TW + 1;       // even (and odd) columns of a padded row: 2*TW + 2 values
  T* row = buf;                   // one padded input row, 2 * n values
  T* ev = buf + 2 * n;            // ev[i], od[i]: the even and odd columns of row i
  T* od = ev + 4 * n;
  for (int64_t i = 0; i < 4; ++i) {
    const int64_t ih = 2 * th - ph + i;
    T* e = ev + i * n;
    T* o = od + i * n;
    if (ih < 0 || ih >= H) {
      std::fill(e, e + n, T(0));
      std::fill(o, o + n, T(0));
      continue;
    }
    // padded column q holds input column q - pw
    const int64_t lo = std::min<int64_t>(pw, 2 * n), hi = std::min<int64_t>(pw + W, 2 * n);
    std::fill(row, row + lo, T(0));
    if (hi > lo) std::memcpy(row + lo, x + ih * W + (lo - pw), (hi - lo) * sizeof(T));
    std::fill(row + std::max(lo, hi), row + 2 * n, T(0));
#pragma GCC ivdep
    for (int64_t q = 0; q < n; ++q) {
      e[q] = row[2 * q];
      o[q] = row[2 * q + 1];
    }
  }
  // B^T d: the 4 rows combined, on the even and on the odd columns; in place,
  // row by row (t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3).
  for (T* a : {ev, od}) {
    T *d0 = a, *d1 = a + n, *d2 = a + 2 * n, *d3 = a + 3 * n;
#pragma GCC ivdep
    for (int64_t q = 0; q < n; ++q) {
      const T r0 = d0[q], r1 = d1[q], r2 = d2[q], r3 = d3[q];
      d0[q] = r0 - r2;
      d1[q] = r1 + r2;
      d2[q] = r2 - r1;
      d3[q] = r1 - r3;
    }
  }
  // (B^T d) B: tile tw's columns 2tw .. 2tw+3 are e[tw], o[tw], e[tw+1], o[tw+1].
  for (int64_t i = 0; i < 4; ++i) {
    const T* e = ev + i * n;
    const T* o = od + i * n;
    T* v0 = v + (4 * i) * ldv;
    T* v1 = v0 + ldv;
    T* v2 = v1 + ldv;
    T* v3 = v2 + ldv;
#pragma GCC ivdep
    for (int64_t t = 0; t < TW; ++t) {
      v0[t] = e[t] - e[t + 1];
      v1[t] = o[t] + e[t + 1];
      v2[t] = e[t + 1] - o[t];
      v3[t] = o[t] - o[t + 1];
    }
  }
}

// Output tile row th of one output plane y [OH, OW] from M (entry e of tile tw
// at m[e * ldm + tw]): y = relu?(A^T M A + bias + residual?), residual (may be
// null) a plane like y; it may be y itself (each element is read before it is
// written). buf: scratch of 4 * TW values.
template <typename T>
CNNOPS_VECTORISED void winograd_output_row(const T* m, int64_t ldm, int64_t th, int64_t TW,
                                           int64_t OH, int64_t OW, T bias,
                                           const T* residual, T* y, bool relu, T* buf) {
  T* r0 = buf;            // output rows 2th and 2th+1, 2*TW columns each
  T* r1 = buf + 2 * TW;
#pragma GCC ivdep
  for (int64_t t = 0; t < TW; ++t) {
    T s0[4], s1[4];  // A^T M: the tile's 4 rows combined, per column j
    for (int64_t j = 0; j < 4; ++j) {
      const T m0 = m[j * ldm + t], m1 = m[(4 + j) * ldm + t], m2 = m[(8 + j) * ldm + t],
              m3 = m[(12 + j) * ldm + t];
      s0[j] = m0 + m1 + m2;
      s1[j] = m1 - m2 - m3;
    }
    r0[2 * t] = s0[0] + s0[1] + s0[2];
    r0[2 * t + 1] = s0[1] - s0[2] - s0[3];
    r1[2 * t] = s1[0] + s1[1] + s1[2];
    r1[2 * t + 1] = s1[1] - s1[2] - s1[3];
  }
  for (int64_t a = 0; a < 2 && 2 * th + a < OH; ++a) {
    const int64_t off = (2 * th + a) * OW;
    bn_forward_run(a == 0 ? r0 : r1, residual ? residual + off : nullptr, y + off, OW, T(1),
                   bias, relu);
  }
}

// ---- channels_last ------------------------------------------------------------
//
// In NHWC a tile's 16 entries are 16 runs of C channels, so these kernels are
// vectorised across channels: V [16][P][C] and M [16][P][K] (GEMM e is
// V[e] @ U[e]^T, every matrix row-major), one tile row of one image a call.

// V for tile row th of image x [H, W, C]: entry e of tile tw goes to
// v[e * ldv + tw * C + c]. zeros: C zeros, read for patch cells past the edges.
template <typename T>
CNNOPS_VECTORISED void winograd_input_row_nhwc(const T* x, int64_t H, int64_t W, int64_t C,
                                               int64_t ph, int64_t pw, int64_t th, int64_t TW,
                                               T* v, int64_t ldv, const T* zeros) {
  for (int64_t t = 0; t < TW; ++t) {
    const T* d[4][4];
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t ih = 2 * th - ph + i;
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t iw = 2 * t - pw + j;
        d[i][j] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + (ih * W + iw) * C : zeros;
      }
    }
    T* out = v + t * C;
    // (16 loads and 16 stores through pointers: without this, GCC's runtime
    // alias checks between them are too many, and the loop stays scalar)
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      T b[4][4];  // B^T d: rows combined, per column j
      for (int64_t j = 0; j < 4; ++j) {
        const T d0 = d[0][j][c], d1 = d[1][j][c], d2 = d[2][j][c], d3 = d[3][j][c];
        b[0][j] = d0 - d2;
        b[1][j] = d1 + d2;
        b[2][j] = d2 - d1;
        b[3][j] = d1 - d3;
      }
      for (int64_t i = 0; i < 4; ++i) {  // (B^T d) B: columns combined
        out[(4 * i) * ldv + c] = b[i][0] - b[i][2];
        out[(4 * i + 1) * ldv + c] = b[i][1] + b[i][2];
        out[(4 * i + 2) * ldv + c] = b[i][2] - b[i][1];
        out[(4 * i + 3) * ldv + c] = b[i][1] - b[i][3];
      }
    }
  }
}

// Output tile row th of image y [OH, OW, K] from M (entry e of tile tw at
// m[e * ldm + tw * K + k]): y = relu?(A^T M A + bias + residual?), residual
// (may be null, may be y) an image like y; bias and ones: K values each (the
// bias, and the scale 1 of the shared BN forward loop). buf: 4 * K values.
template <typename T>
CNNOPS_VECTORISED void winograd_output_row_nhwc(const T* m, int64_t ldm, int64_t th,
                                                int64_t TW, int64_t OH, int64_t OW, int64_t K,
                                                const T* ones, const T* bias,
                                                const T* residual, T* y, bool relu, T* buf) {
  for (int64_t t = 0; t < TW; ++t) {
    const T* mt = m + t * K;
#pragma GCC ivdep
    for (int64_t k = 0; k < K; ++k) {
      T s0[4], s1[4];  // A^T M: the tile's rows combined, per column j
      for (int64_t j = 0; j < 4; ++j) {
        const T m0 = mt[j * ldm + k], m1 = mt[(4 + j) * ldm + k], m2 = mt[(8 + j) * ldm + k],
                m3 = mt[(12 + j) * ldm + k];
        s0[j] = m0 + m1 + m2;
        s1[j] = m1 - m2 - m3;
      }
      buf[k] = s0[0] + s0[1] + s0[2];
      buf[K + k] = s0[1] - s0[2] - s0[3];
      buf[2 * K + k] = s1[0] + s1[1] + s1[2];
      buf[3 * K + k] = s1[1] - s1[2] - s1[3];
    }
    for (int64_t a = 0; a < 2; ++a) {
      for (int64_t b = 0; b < 2; ++b) {
        const int64_t oh = 2 * th + a, ow = 2 * t + b;
        if (oh >= OH || ow >= OW) continue;
        const int64_t off = (oh * OW + ow) * K;
        bn_forward_run(buf + (2 * a + b) * K, residual ? residual + off : nullptr, y + off, K,
                       ones, bias, relu);
      }
    }
  }
}

// ---- the channels_last GEMMs (float32) ----------------------------------------
//
// M[e] = V[e] (P x C) @ U[e]^T (C x K), every matrix row-major, by a register-
// blocked kernel rather than a BLAS call per entry: BLAS packs both operands on
// every call, and at these sizes (K and C of 64 to 512; P of 32 to 2048 tiles
// in a chunk) that packing is a large part of the work. Here U^T is packed once
// with the transformed weight, in panels of 16 columns (panels_of in
// winograd.cpp), and V is read where the input transform wrote it. Measured on
// this project's 2-core AVX2 machine at ResNet-50's four Winograd shapes (the
// 16 GEMMs of a chunk, 2 threads): 1.3x the speed of one at::mm per entry,
// 0.9x-1.7x over four passes.
//
// The kernel keeps a 6 x 16 block of M in twelve 8-float registers (the
// classic 6x16 AVX2 shape: 12 accumulators, 2 panel loads and 6 broadcasts per
// channel, which leaves the two FMA units the bottleneck). It is written with
// GCC's vector extensions, so each clone of CNNOPS_VECTORISED compiles it for
// its own level (two 4-wide halves at the baseline).

// Columns of a U^T panel, and rows of V that one kernel call takes.
constexpr int64_t kPanelCols = 16, kKernelRows = 6;

// Rows of V that one task of the GEMM phase takes at most (with C up to 512
// channels, 192 KB: within L2 while the panels pass over them); whole kernel
// calls, so blocks of rows rounded up to 6 stay within it.
constexpr int64_t kGemmRows = 96;
static_assert(kGemmRows % kKernelRows == 0, "GEMM row blocks are whole kernel calls");

#if defined(__GNUC__)
#define CNNOPS_WINOGRAD_GEMM_KERNEL 1

// m[r * ldm + j] = sum_c a[r * lda + c] * panel[c * 16 + j] for r < R, j < n
// (n <= 16: a last panel's zero columns are not stored).
template <int R>
__attribute__((always_inline)) inline void winograd_gemm_block(const float* a, int64_t lda,
                                                               const float* panel, int64_t C,
                                                               float* m, int64_t ldm,
                                                               int64_t n) {
  typedef float f8 __attribute__((vector_size(32)));
  f8 acc[R][2] = {};
  for (int64_t c = 0; c < C; ++c) {
    f8 b0, b1;
    std::memcpy(&b0, panel + kPanelCols * c, sizeof(f8));
    std::memcpy(&b1, panel + kPanelCols * c + 8, sizeof(f8));
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + c];
      const f8 x = {s, s, s, s, s, s, s, s};
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (n == kPanelCols) {
      std::memcpy(m + r * ldm, &acc[r][0], sizeof(f8));
      std::memcpy(m + r * ldm + 8, &acc[r][1], sizeof(f8));
    } else {
      float row[kPanelCols];
      std::memcpy(row, &acc[r][0], sizeof(f8));
      std::memcpy(row + 8, &acc[r][1], sizeof(f8));
      std::memcpy(m + r * ldm, row, n * sizeof(float));
    }
  }
}

// Rows [0, rows) of M[e] = V[e] @ U[e]^T: v [rows][C], m [rows][K] (row-major,
// row strides C and K), panels [ceil(K/16)][C][16] (panels_of in winograd.cpp).
// Panel by panel, each over all the rows: one panel (C x 16) stays in L1 while
// the rows' V (at most 96 x C, kGemmRows) stays in L2.
CNNOPS_VECTORISED inline void winograd_gemm_rows(const float* v, int64_t rows, int64_t C,
                                                 const float* panels, int64_t K, float* m) {
  for (int64_t k0 = 0; k0 < K; k0 += kPanelCols) {
    const float* panel = panels + k0 * C;
    const int64_t n = std::min(kPanelCols, K - k0);
    int64_t p = 0;
    for (; p + kKernelRows <= rows; p += kKernelRows) {
      winograd_gemm_block<6>(v + p * C, C, panel, C, m + p * K + k0, K, n);
    }
    const float* a = v + p * C;
    float* out = m + p * K + k0;
    switch (rows - p) {
      case 5: winograd_gemm_block<5>(a, C, panel, C, out, K, n); break;
      case 4: winograd_gemm_block<4>(a, C, panel, C, out, K, n); break;
      case 3: winograd_gemm_block<3>(a, C, panel, C, out, K, n); break;
      case 2: winograd_gemm_block<2>(a, C, panel, C, out, K, n); break;
      case 1: winograd_gemm_block<1>(a, C, panel, C, out, K, n); break;
      default: break;
    }
  }
}
#endif

}  // namespace cpu
}  // namespace cnnops

// Winograd convolutions: a 3x3 convolution at stride 1 with 2.25x fewer
// multiplications than the direct one (F(2x2, 3x3): Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2015), and at stride 2 with
// 1.44x fewer.
//
// Both cut the output into 2x2 tiles and nest a 1D algorithm that computes 2
// outputs from the n inputs they read with n products (F(2, 3) at stride S):
//
//  stride 1, n = 4: the textbook F(2, 3),
//
//   B^T = | 1  0 -1  0 |     G = | 1    0    0   |     A^T = | 1  1  1  0 |
//         | 0  1  1  0 |         | 1/2  1/2  1/2 |           | 0  1 -1 -1 |
//         | 0 -1  1  0 |         | 1/2 -1/2  1/2 |
//         | 0  1  0 -1 |         | 0    0    1   |
//
//  stride 2, n = 5: outputs y0 = d0 g0 + d1 g1 + d2 g2, y1 = d2 g0 + d3 g1 +
//  d4 g2 as F(2, 2) on the even inputs d0, d2, d4 with taps g0, g2 (three
//  products) plus the odd inputs d1, d3 times g1 (two),
//
//   B^T = | 1  0 -1  0  0 |     G = | 1  0  0 |     A^T = | 1  1  0  1  0 |
//         | 0  0  1  0  0 |         | 1  0  1 |           | 0  1  1  0  1 |
//         | 0  0 -1  0  1 |         | 0  0  1 |
//         | 0  1  0  0  0 |         | 0  1  0 |
//         | 0  0  0  1  0 |         | 0  1  0 |
//
// Output tile (th, tw) of a plane reads the n x n input patch d whose top-left
// corner is input (2S*th - ph, 2S*tw - pw) (zeros past the edges); it becomes
// V = B^T d B and each 3x3 filter g becomes U = G g G^T (n x n each); then for
// each of the E = n*n entries e of a tile, M[e] = U[e] (K x C) @ V[e] (C x
// tiles): E GEMMs that do the convolution's channel sums (16 products a tile
// where the direct convolution takes 36 at stride 1, 25 at stride 2); and each
// output tile is A^T M A (2x2). B and A hold only 0 and +-1, so the transforms
// are additions; G's halves are exact in binary. In float32 the result is as
// close to the exact one as the direct convolution's (tests/test_winograd.py
// checks the index math in Python against torch, and the kernels against
// torch's convolution).
//
// The loops over tiles or channels are marked `#pragma GCC ivdep`: they read
// and write through many pointers into distinct buffers, and GCC's runtime
// alias checks between so many leave them scalar otherwise (channels_last
// input transform, 64 channels at 32x32: 2x faster with it).
//
// Layouts: a tile's entries e = n*i + j (row i, column j of the n x n tile);
// V [C][E][P] and M [K][E][P] over tile columns p = (n*TH + th)*TW + tw
// (GEMM e reads V[:, e, :] as a matrix of row stride E*P); the transformed
// weight U [E][K][C]. The row kernels below run on one tile row
// (th) of one channel plane, vectorised across the row's TW tiles: the n input
// rows are split into 2S column phases (tile tw's column j is phase j % 2S,
// index tw + j / 2S), so every step is a contiguous run.
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

// The 1D algorithm at stride S (the matrices above): n inputs and products;
// input: v = B^T d; filter: u = G (g0, g1, g2); output: y = A^T m (2 values).
template <int S>
struct WinogradTile;

template <>
struct WinogradTile<1> {
  static constexpr int n = 4;
  template <typename T>
  static inline void input(const T* d, T* v) {
    v[0] = d[0] - d[2];
    v[1] = d[1] + d[2];
    v[2] = d[2] - d[1];
    v[3] = d[1] - d[3];
  }
  template <typename T>
  static inline void filter(T g0, T g1, T g2, T* u) {
    const T h = T(0.5);
    u[0] = g0;
    u[1] = h * (g0 + g1 + g2);
    u[2] = h * (g0 - g1 + g2);
    u[3] = g2;
  }
  template <typename T>
  static inline void output(const T* m, T* y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
};

template <>
struct WinogradTile<2> {
  static constexpr int n = 5;
  template <typename T>
  static inline void input(const T* d, T* v) {
    v[0] = d[0] - d[2];
    v[1] = d[2];
    v[2] = d[4] - d[2];
    v[3] = d[1];
    v[4] = d[3];
  }
  template <typename T>
  static inline void filter(T g0, T g1, T g2, T* u) {
    u[0] = g0;
    u[1] = g0 + g2;
    u[2] = g2;
    u[3] = g1;
    u[4] = g1;
  }
  template <typename T>
  static inline void output(const T* m, T* y) {
    y[0] = m[0] + m[1] + m[3];
    y[1] = m[1] + m[2] + m[4];
  }
};

// Entries of a tile at stride S.
template <int S>
constexpr int64_t winograd_entries() {
  return WinogradTile<S>::n * WinogradTile<S>::n;
}

// Columns of a U^T panel of the channels_last GEMM kernel (winograd_gemm_rows
// below), and rows of V that one kernel call takes.
constexpr int64_t kPanelCols = 16, kKernelRows = 6;

// Rows R rounded up to whole panels.
inline int64_t winograd_panel_rows(int64_t R) {
  return (R + kPanelCols - 1) / kPanelCols * kPanelCols;
}

// U = G g G^T for R filters g(r, s) of S channels each, the rows r in [rb,
// re): u [E][R][S], or with panels U^T in the GEMM kernel's panels, [E][Rp /
// 16][S][16] (Rp = winograd_panel_rows(R); rb a multiple of 16, and the rows
// past R written as zeros). From w [K, C, 3, 3] contiguous: g(r, s) = w[r][s]
// (R = K, S = C), or with rotated, w[s][r] rotated by 180 degrees (R = C, S =
// K: the filters of the input gradient, winograd_conv_input_grad). The
// transform runs vectorised across the filters that are contiguous in u: a
// row's S channels (their taps first copied into buf, 9 * S values), or in
// panels a panel's 16 rows (in panels a row's values are 16 apart, and stored
// row by row the transform of a 512 x 512 weight measured several times as
// long).
template <int Stride, typename T>
CNNOPS_VECTORISED void winograd_weight(const T* w, int64_t K, int64_t C, bool rotated,
                                       bool panels, int64_t rb, int64_t re, T* u, T* buf) {
  using Tile = WinogradTile<Stride>;
  constexpr int n = Tile::n;
  const int64_t R = rotated ? C : K, S = rotated ? K : C;
  // tap t (3 * row + column) of filter g(r, s)
  const auto tap = [&](int64_t r, int64_t s, int64_t t) {
    return w[(rotated ? s * C + r : r * C + s) * 9 + (rotated ? 8 - t : t)];
  };
  // u at dst[e * plane + l * step] from the taps of L filters at buf[t * L + l]
  const auto transform = [&](const T* taps, int64_t L, T* dst, int64_t plane, int64_t step) {
#pragma GCC ivdep
    for (int64_t l = 0; l < L; ++l) {
      T gg[3][n];  // G g, transposed: gg[j] = G applied to column j of g
      for (int64_t j = 0; j < 3; ++j) {
        Tile::filter(taps[j * L + l], taps[(3 + j) * L + l], taps[(6 + j) * L + l], gg[j]);
      }
      for (int64_t i = 0; i < n; ++i) {  // (G g) G^T: row i of G g, its columns combined
        T q[n];
        Tile::filter(gg[0][i], gg[1][i], gg[2][i], q);
        for (int64_t j = 0; j < n; ++j) dst[(n * i + j) * plane + l * step] = q[j];
      }
    }
  };
  if (!panels) {
    for (int64_t r = rb; r < re; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t t = 0; t < 9; ++t) buf[t * S + s] = tap(r, s, t);
      }
      transform(buf, S, u + r * S, R * S, 1);
    }
    return;
  }
  const int64_t plane = winograd_panel_rows(R) * S;
  for (int64_t r0 = rb; r0 < re; r0 += kPanelCols) {
    const int64_t rows = std::min(kPanelCols, R - r0);
    for (int64_t s = 0; s < S; ++s) {
      T taps[9 * kPanelCols];
      for (int64_t t = 0; t < 9; ++t) {
        for (int64_t l = 0; l < kPanelCols; ++l) {
          taps[t * kPanelCols + l] = l < rows ? tap(r0 + l, s, t) : T(0);
        }
      }
      transform(taps, kPanelCols, u + r0 * S + s * kPanelCols, plane, 1);
    }
  }
}

// Scratch values winograd_input_row takes at stride S.
template <int S>
constexpr int64_t winograd_input_row_scratch(int64_t TW) {
  return (WinogradTile<S>::n + 1) * 2 * S * (TW + 1);
}

// V for tile row th of one input plane x [H, W]: entry e of tile tw goes to
// v[e * ldv + tw]. buf: winograd_input_row_scratch values.
template <int S, typename T>
CNNOPS_VECTORISED void winograd_input_row(const T* x, int64_t H, int64_t W, int64_t ph,
                                          int64_t pw, int64_t th, int64_t TW, T* v,
                                          int64_t ldv, T* buf) {
  using Tile = WinogradTile<S>;
  constexpr int n = Tile::n, P = 2 * S;  // P column phases
  const int64_t q = TW + 1;              // values a phase: a padded row has P * q columns
  T* row = buf;                          // one padded input row
  T* d = buf + P * q;                    // d[(i * P + p) * q + k]: row i's column P*k + p
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ih = 2 * S * th - ph + i;
    T* di = d + i * P * q;
    if (ih < 0 || ih >= H) {
      std::fill(di, di + P * q, T(0));
      continue;
    }
    // padded column c holds input column c - pw
    const int64_t lo = std::min<int64_t>(pw, P * q), hi = std::min<int64_t>(pw + W, P * q);
    std::fill(row, row + lo, T(0));
    if (hi > lo) std::memcpy(row + lo, x + ih * W + (lo - pw), (hi - lo) * sizeof(T));
    std::fill(row + std::max(lo, hi), row + P * q, T(0));
    for (int64_t p = 0; p < P; ++p) {
#pragma GCC ivdep
      for (int64_t k = 0; k < q; ++k) di[p * q + k] = row[P * k + p];
    }
  }
  // B^T d: the n rows combined, in place, at every column of every phase.
#pragma GCC ivdep
  for (int64_t k = 0; k < P * q; ++k) {
    T a[n], b[n];
    for (int64_t i = 0; i < n; ++i) a[i] = d[i * P * q + k];
    Tile::input(a, b);
    for (int64_t i = 0; i < n; ++i) d[i * P * q + k] = b[i];
  }
  // (B^T d) B: each row's columns combined, tile by tile.
  for (int64_t i = 0; i < n; ++i) {
    const T* di = d + i * P * q;
    T* vi = v + n * i * ldv;
#pragma GCC ivdep
    for (int64_t t = 0; t < TW; ++t) {
      T a[n], b[n];
      for (int64_t j = 0; j < n; ++j) a[j] = di[(j % P) * q + t + j / P];
      Tile::input(a, b);
      for (int64_t j = 0; j < n; ++j) vi[j * ldv + t] = b[j];
    }
  }
}

// y = A^T M A for one tile at stride S: entry e of M at m[e * ld].
template <int S, typename T>
inline void winograd_output_tile(const T* m, int64_t ld, T (&y)[2][2]) {
  using Tile = WinogradTile<S>;
  constexpr int n = Tile::n;
  T s0[n], s1[n];  // A^T M: the tile's rows combined, per column j
  for (int64_t j = 0; j < n; ++j) {
    T a[n], b[2];
    for (int64_t i = 0; i < n; ++i) a[i] = m[(n * i + j) * ld];
    Tile::output(a, b);
    s0[j] = b[0];
    s1[j] = b[1];
  }
  Tile::output(s0, y[0]);
  Tile::output(s1, y[1]);
}

// Output tile row th of one output plane y [OH, OW] from M (entry e of tile tw
// at m[e * ldm + tw]): y = relu?(A^T M A + bias + residual?), residual (may be
// null) a plane like y; it may be y itself (each element is read before it is
// written). buf: scratch of 4 * TW values.
template <int S, typename T>
CNNOPS_VECTORISED void winograd_output_row(const T* m, int64_t ldm, int64_t th, int64_t TW,
                                           int64_t OH, int64_t OW, T bias,
                                           const T* residual, T* y, bool relu, T* buf) {
  T* r0 = buf;  // output rows 2th and 2th+1, 2*TW columns each
  T* r1 = buf + 2 * TW;
#pragma GCC ivdep
  for (int64_t t = 0; t < TW; ++t) {
    T yt[2][2];
    winograd_output_tile<S>(m + t, ldm, yt);
    r0[2 * t] = yt[0][0];
    r0[2 * t + 1] = yt[0][1];
    r1[2 * t] = yt[1][0];
    r1[2 * t + 1] = yt[1][1];
  }
  for (int64_t a = 0; a < 2 && 2 * th + a < OH; ++a) {
    const int64_t off = (2 * th + a) * OW;
    bn_forward_run(a == 0 ? r0 : r1, residual ? residual + off : nullptr, y + off, OW, T(1),
                   bias, relu);
  }
}

// ---- channels_last ------------------------------------------------------------
//
// In NHWC a tile's entries are E runs of C channels, so these kernels are
// vectorised across channels: V [E][P][C] and M [E][P][K] (GEMM e is
// V[e] @ U[e]^T, every matrix row-major), one tile row of one image a call.

// V for tile row th of image x [H, W, C]: entry e of tile tw goes to
// v[e * ldv + tw * C + c]. zeros: C zeros, read for patch cells past the edges.
template <int S, typename T>
CNNOPS_VECTORISED void winograd_input_row_nhwc(const T* x, int64_t H, int64_t W, int64_t C,
                                               int64_t ph, int64_t pw, int64_t th, int64_t TW,
                                               T* v, int64_t ldv, const T* zeros) {
  using Tile = WinogradTile<S>;
  constexpr int n = Tile::n;
  for (int64_t t = 0; t < TW; ++t) {
    const T* d[n][n];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ih = 2 * S * th - ph + i;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t iw = 2 * S * t - pw + j;
        d[i][j] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + (ih * W + iw) * C : zeros;
      }
    }
    T* out = v + t * C;
    // (n*n loads and stores through pointers: without this, GCC's runtime
    // alias checks between them are too many, and the loop stays scalar)
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      T b[n][n];  // B^T d: rows combined, per column j (b[j][i]: row i of column j)
      for (int64_t j = 0; j < n; ++j) {
        T a[n];
        for (int64_t i = 0; i < n; ++i) a[i] = d[i][j][c];
        Tile::input(a, b[j]);
      }
      for (int64_t i = 0; i < n; ++i) {  // (B^T d) B: columns combined
        T a[n], r[n];
        for (int64_t j = 0; j < n; ++j) a[j] = b[j][i];
        Tile::input(a, r);
        for (int64_t j = 0; j < n; ++j) out[(n * i + j) * ldv + c] = r[j];
      }
    }
  }
}

// Output tile row th of image y [OH, OW, K] from M (entry e of tile tw at
// m[e * ldm + tw * K + k]): y = relu?(A^T M A + bias + residual?), residual
// (may be null, may be y) an image like y; bias and ones: K values each (the
// bias, and the scale 1 of the shared BN forward loop). buf: 4 * K values.
template <int S, typename T>
CNNOPS_VECTORISED void winograd_output_row_nhwc(const T* m, int64_t ldm, int64_t th,
                                                int64_t TW, int64_t OH, int64_t OW, int64_t K,
                                                const T* ones, const T* bias,
                                                const T* residual, T* y, bool relu, T* buf) {
  for (int64_t t = 0; t < TW; ++t) {
    const T* mt = m + t * K;
#pragma GCC ivdep
    for (int64_t k = 0; k < K; ++k) {
      T yt[2][2];
      winograd_output_tile<S>(mt + k, ldm, yt);
      buf[k] = yt[0][0];
      buf[K + k] = yt[0][1];
      buf[2 * K + k] = yt[1][0];
      buf[3 * K + k] = yt[1][1];
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

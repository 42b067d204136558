// CPU convolution as im2col + GEMM on tiles of output positions, with
// pluggable epilogues and prologues.
//
// Layout assumed: input, output and gradients NCHW-contiguous; weight
// [OC, C/groups, KH, KW] contiguous. Callers convert other layouts.
//
// The batch is split into contiguous chunks of images, one per thread. Each
// chunk's output positions are cut into tiles (see Tile) of about P positions,
// where P keeps the [K, P] column buffer near the size of a core's L2 cache but
// gives the GEMM at least 512 columns: a large image is cut into several tiles,
// and small images (7x7, 14x14) are grouped several to a tile so a GEMM of many
// output channels is not starved. Per tile: im2col into the thread's column buffer, one GEMM per group
// into the thread's [OC, P] output tile, then the caller's epilogue while that
// tile is still in cache. The backward runs the same tiles in reverse: the
// caller's prologue writes the [OC, P] output-gradient tile, which feeds the
// weight-gradient GEMM and the input-gradient GEMM + col2im.
//
// Each chunk has its own buffers and weight-gradient accumulator (summed at the
// end in chunk order), so results do not depend on scheduling. With fewer
// images than threads the single chunk runs on the calling thread and the BLAS
// GEMM uses all threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "bn_kernels.h"
#include "cnnops/conv_shape.h"

namespace cnnops {
namespace cpu {

// n uninitialised values: scratch that is always written before it is read
// (a std::vector would zero it first, a pass over memory for nothing).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// A GEMM over fewer output positions than this is thin: see tile_mm.
constexpr int64_t kThinTile = 16;

// Number of image chunks: one per thread, never more than images. (Even for
// batches of small images, one single-threaded GEMM a thread beats one
// multi-threaded GEMM over the batch.) Images of fewer than kThinTile positions
// (2x2, 3x3) make one chunk: per thread, such an image is a thin GEMM that
// streams the whole weight for a few columns; in one chunk the images share
// their tiles (max_tile_images) and BLAS threads the GEMM (ResNet-50's last
// stage at 64x64, batch 2: a 2048 x 1024 weight read once instead of twice).
inline int64_t num_chunks(const ConvShape& s) {
  if (s.L() < kThinTile) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(s.N, at::get_num_threads()));
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

// A tile: output positions [la, lb) of each of `images` consecutive images
// from n0 (images > 1 only with la = 0, lb = L). Its columns are image-major:
// column i * seg() + j is position la + j of image n0 + i.
struct Tile {
  int64_t n0, images, la, lb;
  int64_t seg() const { return lb - la; }
  int64_t width() const { return images * seg(); }
};

// Target tile width P for a shape: a [K, P] column buffer of about 512 KiB,
// between 512 and 2048 positions.
inline int64_t tile_width(const ConvShape& s, int64_t elem_size) {
  constexpr int64_t kColBytes = 512 * 1024;
  return std::clamp<int64_t>(kColBytes / (elem_size * s.K()), 512, 2048);
}

// The most images one tile holds: floor(P / L) when an image is smaller than a
// tile and the GEMM has at least 64 output channels (a group's). With fewer, the
// GEMM streams its column buffer rather than computing on it, so a wider tile
// buys nothing, and one image's smaller buffer stays in the faster caches
// (measured on 12x12 and 8x8 layers of 16-32 channels: grouping was 20% slower).
// Images of fewer than 64 positions (4x4, 7x7) are grouped whatever the
// channels: one such image is too narrow a GEMM for BLAS (32 channels at 4x4:
// grouped, forward 415 -> 360 us and forward+backward 1313 -> 1045 us, batch 32).
inline int64_t max_tile_images(const ConvShape& s, int64_t P) {
  return s.L() >= P || (s.OCg() < 64 && s.L() >= 64) ? 1 : std::max<int64_t>(1, P / s.L());
}

// The widest tile of a shape (what the tile buffers need).
inline int64_t max_tile_width(const ConvShape& s, int64_t P) {
  const int64_t L = s.L();
  if (L < P) return max_tile_images(s, P) * L;
  const int64_t parts = (L + P - 1) / P;  // as for_each_tile cuts an image
  return (L + parts - 1) / parts;
}

// Calls fn(tile) for the tiles of images [nb, ne), in order: each image cut into
// ceil(L / P) near-equal ranges when L >= P, else max_tile_images whole images
// a tile.
template <typename F>
void for_each_tile(const ConvShape& s, int64_t P, int64_t nb, int64_t ne, const F& fn) {
  const int64_t L = s.L();
  if (L >= P) {
    const int64_t parts = (L + P - 1) / P;
    for (int64_t n = nb; n < ne; ++n) {
      for (int64_t t = 0; t < parts; ++t) fn(Tile{n, 1, L * t / parts, L * (t + 1) / parts});
    }
  } else {
    const int64_t per = max_tile_images(s, P);
    for (int64_t n = nb; n < ne; n += per) fn(Tile{n, std::min(per, ne - n), 0, L});
  }
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

// A strided conv reads every sh-th row and sw-th column of its input. Split
// into its sh*sw stride phases, phase (py, px) holding x[c][i*sh + py][j*sw + px]
// at row i, column j of a [Hp, Wp] plane, each tap reads contiguous runs of one
// phase: im2col copies instead of gathering. The split is one gather over the
// input, worth it when the kernel has more taps than the stride has phases
// (3x3 or 7x7 stride 2, not 1x1 stride 2).
struct Phases {
  int64_t sh, sw, Hp, Wp;
  explicit Phases(const ConvShape& s)
      : sh(s.sh), sw(s.sw), Hp((s.H + s.sh - 1) / s.sh), Wp((s.W + s.sw - 1) / s.sw) {}
  static bool worth_it(const ConvShape& s) {
    return (s.sh > 1 || s.sw > 1) && s.KH * s.KW > s.sh * s.sw;
  }
  int64_t plane() const { return Hp * Wp; }
  int64_t channel() const { return sh * sw * plane(); }
  // The plane of channel c, phase (py, px).
  template <typename T>
  T* at(T* base, int64_t c, int64_t py, int64_t px) const {
    return base + ((c * sh + py) * sw + px) * plane();
  }
};

// Splits one image's channels x ([C, H, W]) into phases (C * ph.channel()
// values). Entries past the input's edge are left unset: im2col copies them at
// most into padding columns, which it then zeroes.
template <typename T>
void split_phases(const ConvShape& s, const Phases& ph, const T* x, int64_t C, T* out) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t py = 0; py < ph.sh; ++py) {
      for (int64_t i = 0; i * ph.sh + py < s.H; ++i) {
        const T* row = x + (c * s.H + i * ph.sh + py) * s.W;
        if (ph.sw == 2) {
          // Both phases in one pass over the row (a vectorised de-interleave).
          T* d0 = ph.at(out, c, py, 0) + i * ph.Wp;
          T* d1 = ph.at(out, c, py, 1) + i * ph.Wp;
          const int64_t pairs = s.W / 2;
          for (int64_t j = 0; j < pairs; ++j) {
            d0[j] = row[2 * j];
            d1[j] = row[2 * j + 1];
          }
          if (s.W % 2) d0[pairs] = row[s.W - 1];
          continue;
        }
        for (int64_t px = 0; px < ph.sw; ++px) {
          T* dst = ph.at(out, c, py, px) + i * ph.Wp;
          for (int64_t j = 0; j * ph.sw + px < s.W; ++j) dst[j] = row[j * ph.sw + px];
        }
      }
    }
  }
}

// a mod b in [0, b) for b > 0.
inline int64_t pmod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

// Calls fn(row, ow0, ow1, ih) for each output row segment covering positions
// [la, lb) for kernel row kh: positions oh*OW + [ow0, ow1), with `row` the
// offset of position oh*OW relative to la (so column (l - la) = row + ow), and
// ih the input row the tap reads (possibly outside [0, H)).
template <typename F>
inline void for_each_row_segment(const ConvShape& s, int64_t la, int64_t lb, int64_t kh,
                                 const F& fn) {
  for (int64_t l = la; l < lb;) {
    const int64_t oh = l / s.OW, ow0 = l - oh * s.OW;
    const int64_t ow1 = std::min(s.OW, ow0 + (lb - l));
    fn(l - la - ow0, ow0, ow1, oh * s.sh - s.ph + kh * s.dh);
    l += ow1 - ow0;
  }
}

// ceil(a / b) for b > 0 and any a.
inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Segments of at most this many positions an image (images of 4x4 outputs or
// fewer) go through a TapTable in im2col and col2im.
constexpr int64_t kSmallSegment = 16;

// For the positions [la, lb) of a small segment: the offset in a channel's
// H x W plane that tap t = kh*KW + kw of each position reads, or -1 where it
// reads padding. im2col and col2im copy through it instead of through row
// segments, whose per-row index arithmetic and calls cost 30-40 ns a (channel,
// tap) row: most of a 2x2 or 4x4 layer's im2col (1x1 conv of [2, 1000, 2, 2]
// to 128 channels, training forward: 167 -> 55 us).
struct TapTable {
  int64_t positions, taps;
  std::vector<int64_t> offset;  // [taps, positions]

  TapTable(const ConvShape& s, int64_t la, int64_t lb)
      : positions(lb - la), taps(s.KH * s.KW), offset(taps * positions) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        int64_t* row = offset.data() + (kh * s.KW + kw) * positions;
        for (int64_t l = la; l < lb; ++l) {
          const int64_t ih = l / s.OW * s.sh - s.ph + kh * s.dh;
          const int64_t iw = l % s.OW * s.sw - s.pw + kw * s.dw;
          const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
          row[l - la] = inside ? ih * s.W + iw : -1;
        }
      }
    }
  }

  // fn(c, row, off) for each channel c < channels and tap t: row = c * taps + t
  // (its row of the column matrix), off the tap's offsets for the positions.
  template <typename F>
  void for_each_row(int64_t channels, const F& fn) const {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t t = 0; t < taps; ++t) fn(c, c * taps + t, offset.data() + t * positions);
    }
  }
};

// cols[(c*KH + kh)*KW + kw][l - la] = x[c][oh*sh - ph + kh*dh][ow*sw - pw + kw*dw]
// for positions l = oh*OW + ow in [la, lb) (zero outside the input), for one
// image and one group: x is [Cg, H, W]; cols has row stride ld. With `phases`
// (the image's group split by split_phases), runs are copied from those.
//
// When consecutive output rows read source rows exactly OW apart (stride 1 with
// "same" padding, or a stride phase of the same width: ResNet's 3x3 convs), the
// tile's whole rows of one tap are a single run of the source: one copy, then
// the padding columns are zeroed. Otherwise (and for partial rows) each output
// row is copied on its own.
template <typename T>
void im2col(const ConvShape& s, const T* x, int64_t la, int64_t lb, T* cols, int64_t ld,
            const T* phases = nullptr) {
  if (lb - la <= kSmallSegment) {
    const TapTable table(s, la, lb);
    table.for_each_row(s.Cg(), [&](int64_t c, int64_t row, const int64_t* off) {
      const T* plane = x + c * s.H * s.W;
      T* crow = cols + row * ld;
      for (int64_t j = 0; j < table.positions; ++j) crow[j] = off[j] >= 0 ? plane[off[j]] : T(0);
    });
    return;
  }
  const Phases ph(s);
  const int64_t OW = s.OW;
  // With contiguous sources (stride 1 along W, or phases), output row oh of tap
  // (kh, kw) copies src[ow] for ow in [lo, hi) from one input (or phase) row.
  const bool contiguous = phases || s.sw == 1;
  const int64_t src_stride = phases ? ph.Wp : s.sh * s.W;
  // Whole rows [ohA, ohB) of the tile whose input rows are inside [0, H) form
  // one run of the source when rows are exactly OW apart in both ("runs");
  // otherwise a tile of whole rows copies them one by one without per-row
  // index arithmetic ("whole_rows": valid 5x5 convs of 8-wide outputs copy
  // thousands of 8-value rows per image).
  const int64_t ohA = ceil_div(la, OW), ohB = lb / OW;
  const bool runs = contiguous && src_stride == OW && ohA < ohB;
  const bool whole_rows = !runs && contiguous && la % OW == 0 && lb % OW == 0;
  // What each kernel row and column needs, computed once rather than per tap
  // and channel: on small images the integer divisions would dominate.
  struct RowTap {
    int64_t hoff, py, vA, vB;  // rows [vA, vB) of [ohA, ohB) read inside [0, H)
  };
  struct ColTap {
    int64_t woff, px, lo, hi, phase_col;
  };
  std::vector<RowTap> rows(s.KH);
  std::vector<ColTap> taps(s.KW);
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    RowTap& r = rows[kh];
    r.hoff = kh * s.dh - s.ph;
    r.py = pmod(r.hoff, s.sh);
    r.vA = r.vB = 0;
    if ((runs || whole_rows) && ohA <= ohB) {
      r.vA = std::clamp(ceil_div(-r.hoff, s.sh), ohA, ohB);
      r.vB = std::clamp(ceil_div(s.H - r.hoff, s.sh), r.vA, ohB);
    }
  }
  for (int64_t kw = 0; kw < s.KW; ++kw) {
    ColTap& q = taps[kw];
    q.woff = kw * s.dw - s.pw;
    q.px = pmod(q.woff, s.sw);
    valid_range(q.woff, s.sw, s.W, OW, q.lo, q.hi);
    q.phase_col = (q.woff - q.px) / s.sw;
  }
  for (int64_t c = 0; c < s.Cg(); ++c) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t hoff = rows[kh].hoff, py = rows[kh].py;
      const int64_t vA = rows[kh].vA, vB = rows[kh].vB;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        T* crow = cols + ((c * s.KH + kh) * s.KW + kw) * ld;
        const int64_t woff = taps[kw].woff, lo = taps[kw].lo, hi = taps[kw].hi;
        // The source of input row ih in [0, H), indexed by ow (stride sw, or 1 from
        // phases: input column ow*sw + woff is column ow + (woff - px)/sw of phase px).
        const T* plane = phases ? ph.at(phases, c, py, taps[kw].px) : nullptr;
        const auto row_src = [&](int64_t ih) {
          return phases ? plane + (ih - py) / s.sh * ph.Wp + taps[kw].phase_col
                        : x + (c * s.H + ih) * s.W + woff;
        };
        if (whole_rows) {
          // Rows outside [vA, vB) read outside [0, H): zero. The others copy
          // [lo, hi) and zero the rest.
          std::fill(crow, crow + (vA - ohA) * OW, T(0));
          std::fill(crow + (vB - ohA) * OW, crow + (ohB - ohA) * OW, T(0));
          const T* src = vB > vA ? row_src(vA * s.sh + hoff) : nullptr;
          T* dst = crow + (vA - ohA) * OW;
          for (int64_t r = vA; r < vB; ++r, src += src_stride, dst += OW) {
            for (int64_t ow = 0; ow < lo; ++ow) dst[ow] = T(0);
#pragma omp simd
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow];
            for (int64_t ow = hi; ow < OW; ++ow) dst[ow] = T(0);
          }
          continue;
        }
        for (int64_t l = la; l < lb;) {
          const int64_t oh = l / OW, ow0 = l - oh * OW;
          if (vA < vB && oh == vA && ow0 == 0) {  // the run
            T* dst = crow + (l - la);
            if (hi > lo) {
              std::memcpy(dst + lo, row_src(oh * s.sh + hoff) + lo,
                          sizeof(T) * ((vB - vA - 1) * OW + hi - lo));
            }
            if (lo > 0 || hi < OW) {  // (a column or two: loops, not memset calls)
              for (int64_t r = 0; r < vB - vA; ++r) {
                for (int64_t ow = 0; ow < lo; ++ow) dst[r * OW + ow] = T(0);
                for (int64_t ow = hi; ow < OW; ++ow) dst[r * OW + ow] = T(0);
              }
            }
            l += (vB - vA) * OW;
            continue;
          }
          const int64_t ow1 = std::min(OW, ow0 + (lb - l));
          T* dst = crow + (l - la - ow0);  // dst[ow] is position oh*OW + ow
          const int64_t ih = oh * s.sh + hoff;
          l += ow1 - ow0;
          if (ih < 0 || ih >= s.H) {
            std::fill(dst + ow0, dst + ow1, T(0));
            continue;
          }
          const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
          std::fill(dst + ow0, dst + a, T(0));
          const T* src = row_src(ih);
          if (contiguous) {
            for (int64_t ow = a; ow < b; ++ow) dst[ow] = src[ow];
          } else {
            for (int64_t ow = a; ow < b; ++ow) dst[ow] = src[ow * s.sw];
          }
          std::fill(dst + b, dst + ow1, T(0));
        }
      }
    }
  }
}

// The adjoint of im2col: x[c][ih][iw] += cols[...] for one image and group.
template <typename T>
void col2im(const ConvShape& s, const T* cols, int64_t ld, int64_t la, int64_t lb, T* x) {
  if (lb - la <= kSmallSegment) {  // (the same sums, in the same order)
    const TapTable table(s, la, lb);
    table.for_each_row(s.Cg(), [&](int64_t c, int64_t row, const int64_t* off) {
      T* plane = x + c * s.H * s.W;
      const T* crow = cols + row * ld;
      for (int64_t j = 0; j < table.positions; ++j) {
        if (off[j] >= 0) plane[off[j]] += crow[j];
      }
    });
    return;
  }
  const int64_t OW = s.OW;
  const bool whole_rows = la % OW == 0 && lb % OW == 0;
  for (int64_t c = 0; c < s.Cg(); ++c) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t hoff = kh * s.dh - s.ph;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const T* crow = cols + ((c * s.KH + kh) * s.KW + kw) * ld;
        const int64_t woff = kw * s.dw - s.pw;
        int64_t lo, hi;
        valid_range(woff, s.sw, s.W, OW, lo, hi);
        if (whole_rows) {
          // Output rows [rA, rB) read input rows inside [0, H): step through
          // them without per-row index arithmetic.
          const int64_t r0 = la / OW, r1 = lb / OW;
          const int64_t rA = std::clamp(ceil_div(-hoff, s.sh), r0, r1);
          const int64_t rB = std::clamp(ceil_div(s.H - hoff, s.sh), rA, r1);
          const T* src = crow + (rA - r0) * OW;
          T* dst = rB > rA ? x + (c * s.H + rA * s.sh + hoff) * s.W + woff : nullptr;
          for (int64_t r = rA; r < rB; ++r, src += OW, dst += s.sh * s.W) {
#pragma omp simd
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow * s.sw] += src[ow];
          }
          continue;
        }
        for_each_row_segment(s, la, lb, kh, [&](int64_t row, int64_t ow0, int64_t ow1,
                                                int64_t ih) {
          if (ih < 0 || ih >= s.H) return;
          const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
          const T* src = crow + row;
          T* dst = x + (c * s.H + ih) * s.W + woff;
          for (int64_t ow = a; ow < b; ++ow) dst[ow * s.sw] += src[ow];
        });
      }
    }
  }
}

// out[c][j] = y[c][j] + bias[c] for `channels` rows of `len` values; y has row
// stride ld, out row stride out_ld (bias may be null).
template <typename T>
void copy_channel_bias(const T* y, int64_t ld, T* out, int64_t out_ld, const T* bias,
                       int64_t channels, int64_t len) {
  for (int64_t c = 0; c < channels; ++c) {
    const T b = bias ? bias[c] : T(0);
    const T* src = y + c * ld;
    T* dst = out + c * out_ld;
    for (int64_t j = 0; j < len; ++j) dst[j] = src[j] + b;
  }
}

// A [rows, cols] matrix at `data` with row stride ld, as a tensor that aliases it.
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols, int64_t ld,
                  const at::TensorOptions& opts) {
  return at::from_blob(data, {rows, cols}, {ld, 1}, opts);
}

// The stride phases of the images a chunk works on (see Phases): split when
// a tile starts a new image, reused by that image's later tiles.
template <typename T>
class PhaseBuffer {
 public:
  PhaseBuffer(const ConvShape& s, int64_t max_images)
      : s_(s), ph_(s), on_(Phases::worth_it(s)),
        data_(scratch<T>(on_ ? max_images * s.C * ph_.channel() : 0)) {}

  // Splits the tile's images when it starts them (la == 0).
  void prepare(const T* x, const Tile& t) {
    if (!on_ || t.la != 0) return;
    for (int64_t i = 0; i < t.images; ++i) {
      split_phases(s_, ph_, x + (t.n0 + i) * s_.C * s_.H * s_.W, s_.C,
                   data_.get() + i * s_.C * ph_.channel());
    }
  }
  // The phases of the tile's i-th image, group g (null when not split).
  const T* get(int64_t i, int64_t g) const {
    return on_ ? data_.get() + (i * s_.C + g * s_.Cg()) * ph_.channel() : nullptr;
  }

 private:
  const ConvShape& s_;
  Phases ph_;
  bool on_;
  std::unique_ptr<T[]> data_;
};

// Per-group [rows, width] matrices over a scratch buffer (group g at
// data + g*rows*width), re-made only when the tile width
// changes: making a tensor costs about a microsecond, and a small layer runs
// thousands of tiles. With `width_major` each group is stored [width, rows]
// instead.
template <typename T>
class GroupMatrices {
 public:
  GroupMatrices(T* data, int64_t groups, int64_t rows, const at::TensorOptions& opts,
                bool width_major = false)
      : data_(data), rows_(rows), width_major_(width_major), opts_(opts), views_(groups) {}

  const at::Tensor& get(int64_t g, int64_t width) {
    update(width);
    return views_[g];
  }
  T* data() const { return data_; }

 private:
  void update(int64_t width) {
    if (width == width_) return;
    for (size_t g = 0; g < views_.size(); ++g) {
      T* data = data_ + g * rows_ * width;
      views_[g] = width_major_ ? matrix(data, width, rows_, rows_, opts_)
                               : matrix(data, rows_, width, width, opts_);
    }
    width_ = width;
  }
  T* data_;
  int64_t rows_, width_ = -1;
  bool width_major_;
  at::TensorOptions opts_;
  std::vector<at::Tensor> views_;
};

// The GEMM operand holding a tile's input columns for group g, as a [K, width]
// matrix: a view of the input itself for a 1x1 stride-1 unpadded conv over one
// image, else the tile's im2col in `cols`.
template <typename T>
at::Tensor tile_columns(const ConvShape& s, const T* x, const Tile& t, int64_t g,
                        GroupMatrices<T>& cols, const PhaseBuffer<T>& phases,
                        const at::TensorOptions& opts) {
  const int64_t L = s.L(), seg = t.seg(), width = t.width();
  const T* image0 = x + (t.n0 * s.C + g * s.Cg()) * s.H * s.W;
  if (s.pointwise() && t.images == 1) {
    return matrix(const_cast<T*>(image0) + t.la, s.K(), seg, L, opts);
  }
  for (int64_t i = 0; i < t.images; ++i) {
    im2col(s, image0 + i * s.C * s.H * s.W, t.la, t.lb, cols.data() + i * seg, width,
           phases.get(i, g));
  }
  return cols.get(0, width);
}

// dst[j * rows + i] = src[i * cols + j]: a [rows, cols] matrix transposed, in
// 16 x 16 blocks so that reads and writes both stay within cached lines.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t i1 = std::min(rows, i0 + kBlock), j1 = std::min(cols, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
      }
    }
  }
}

// out = a @ b for a tile's GEMM, out [rows, width] contiguous. MKL runs a
// product whose output has fewer than kThinTile columns 2-6x slower than the
// same product transposed (measured here for widths 4 and 8 with rows and K of
// 256-4608; from 16 columns on the plain product is as fast or faster), so a
// thin one is computed as out^T = b^T @ a^T into `scratch` ([width, rows]) and
// transposed into out.
template <typename T>
void tile_mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, T* scratch) {
  const int64_t rows = out.size(0), width = out.size(1);
  if (width >= kThinTile) {
    at::mm_out(out, a, b);
    return;
  }
  TORCH_INTERNAL_ASSERT(out.stride(0) == width && out.stride(1) == 1);
  at::Tensor out_t = matrix(scratch, width, rows, rows, out.options());
  at::mm_out(out_t, b.t(), a.t());
  transpose(scratch, width, rows, out.mutable_data_ptr<T>());
}

// The per-group weight matrices [OCg, K] of w ([OC, Cg, KH, KW], contiguous).
inline std::vector<at::Tensor> group_weights(const ConvShape& s, const at::Tensor& w) {
  const at::Tensor w3 = w.view({s.groups, s.OCg(), s.K()});
  std::vector<at::Tensor> out(s.groups);
  for (int64_t g = 0; g < s.groups; ++g) out[g] = w3[g];
  return out;
}

// out = conv(x, w) tile by tile; epilogue(n, la, lb, y, ld) receives the
// conv output of image n at positions [la, lb), channel c at y[c*ld + j], in
// a cache-resident tile it must consume (y is overwritten by the next tile).
//   x: [N, C, H, W], w: [OC, Cg, KH, KW], both contiguous.
template <typename T, typename Epilogue>
void conv_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                  const Epilogue& epilogue) {
  // The GEMMs below are implementation details, not autograd-visible ops.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t K = s.K(), OCg = s.OCg();
  const int64_t P = tile_width(s, sizeof(T));
  const auto opts = x.options();
  const std::vector<at::Tensor> wg = group_weights(s, w);
  const T* xp = x.const_data_ptr<T>();
  for_each_chunk(s.N, num_chunks(s), [&](int64_t, int64_t nb, int64_t ne) {
    const int64_t max_width = max_tile_width(s, P);
    const auto cols_buf = scratch<T>(s.pointwise() && s.L() >= P ? 0 : K * max_width);
    const auto y_buf = scratch<T>(s.OC * max_width);
    const auto thin_buf = scratch<T>(OCg * kThinTile);  // for tile_mm (any tile may be thin)
    GroupMatrices<T> cols(cols_buf.get(), 1, K, opts), y(y_buf.get(), s.groups, OCg, opts);
    PhaseBuffer<T> phases(s, max_tile_images(s, P));
    for_each_tile(s, P, nb, ne, [&](const Tile& t) {
      const int64_t width = t.width();
      phases.prepare(xp, t);
      for (int64_t g = 0; g < s.groups; ++g) {
        tile_mm(y.get(g, width), wg[g], tile_columns(s, xp, t, g, cols, phases, opts),
                thin_buf.get());
      }
      for (int64_t i = 0; i < t.images; ++i) {
        epilogue(t.n0 + i, t.la, t.lb, y.data() + i * t.seg(), width);
      }
    });
  });
}

// Backward of conv, tile by tile. grad_of(n, la, lb, dst, ld) writes the
// output gradient of image n at positions [la, lb), channel c to
// dst[c*ld + j]. Writes grad_input and grad_weight / grad_bias when defined;
// grad_bias is accumulated in double and cast at the end.
template <typename T, typename GradOf>
void conv_backward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                   const GradOf& grad_of, at::Tensor grad_input,
                   at::Tensor grad_weight, at::Tensor grad_bias) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t K = s.K(), L = s.L(), OCg = s.OCg();
  const int64_t P = tile_width(s, sizeof(T));
  const auto opts = x.options();
  const bool need_gi = grad_input.defined(), need_gw = grad_weight.defined(),
             need_gb = grad_bias.defined();
  std::vector<at::Tensor> wgt = group_weights(s, w);  // transposed below: [K, OCg]
  for (at::Tensor& m : wgt) m = m.t();
  const T* xp = x.const_data_ptr<T>();
  T* gip = need_gi ? grad_input.mutable_data_ptr<T>() : nullptr;
  const int64_t image = s.C * s.H * s.W;

  const int64_t chunks = num_chunks(s);
  // Each tile adds gw_g [OCg, K] += gy_g [OCg, P] @ cols^T. MKL runs that GEMM
  // (a transposed operand contracted over its long side) 2-4x slower than the
  // same product as gw_g^T [K, OCg] += cols [K, P] @ gy_g^T [P, OCg] for the
  // narrow GEMMs of small layers and of the stem (16x25x576: 40 -> 11 us;
  // 64x147x2048: 750 -> 367 us). There, gw^T is summed from a transposed copy
  // of the gradient tile; for wider GEMMs the copy costs what it saves.
  const bool sum_transposed = need_gw && OCg <= 64 && K <= 512;
  // Per-chunk partial sums ([groups, OCg, K], or [groups, K, OCg] summed
  // transposed), added in chunk order at the end; chunk 0's untransposed sum is
  // the result itself.
  std::vector<at::Tensor> gw_part(chunks);
  std::vector<std::vector<double>> gb_part(chunks);
  for_each_chunk(s.N, chunks, [&](int64_t chunk, int64_t nb, int64_t ne) {
    const int64_t max_width = max_tile_width(s, P);
    const auto cols_buf = scratch<T>(K * max_width), gy_buf = scratch<T>(s.OC * max_width);
    const auto gyt_buf = scratch<T>(sum_transposed ? s.OC * max_width : 0);
    const auto thin_buf = scratch<T>(need_gi ? K * kThinTile : 0);
    GroupMatrices<T> cols(cols_buf.get(), 1, K, opts), gy(gy_buf.get(), s.groups, OCg, opts);
    GroupMatrices<T> gyt(gyt_buf.get(), s.groups, OCg, opts, /*width_major=*/true);
    PhaseBuffer<T> phases(s, need_gw ? max_tile_images(s, P) : 0);
    std::vector<at::Tensor> gwg;
    if (need_gw) {
      if (sum_transposed) {
        gw_part[chunk] = at::zeros({s.groups, K, OCg}, opts);
      } else {
        gw_part[chunk] = chunk == 0 ? grad_weight.view({s.groups, OCg, K})
                                    : at::empty({s.groups, OCg, K}, opts);
        gw_part[chunk].zero_();
      }
      for (int64_t g = 0; g < s.groups; ++g) gwg.push_back(gw_part[chunk][g]);
    }
    if (need_gb) gb_part[chunk].assign(s.OC, 0.0);
    for_each_tile(s, P, nb, ne, [&](const Tile& t) {
      const int64_t seg = t.seg(), width = t.width();
      if (need_gw) phases.prepare(xp, t);
      for (int64_t i = 0; i < t.images; ++i) {
        grad_of(t.n0 + i, t.la, t.lb, gy.data() + i * seg, width);
      }
      if (need_gb) {
        for (int64_t oc = 0; oc < s.OC; ++oc) {
          const T* row = gy.data() + oc * width;
          gb_part[chunk][oc] +=
              blocked_sums<T>(width, [&](int64_t j) { return std::pair<T, T>(row[j], T(0)); })
                  .first;
        }
      }
      const bool direct = s.pointwise() && t.images == 1;
      if (need_gi && !direct && t.la == 0) {
        std::fill(gip + t.n0 * image, gip + (t.n0 + t.images) * image, T(0));
      }
      for (int64_t g = 0; g < s.groups; ++g) {
        const at::Tensor& gyg = gy.get(g, width);
        if (need_gw) {
          const at::Tensor c = tile_columns(s, xp, t, g, cols, phases, opts);
          if (sum_transposed) {
            transpose(gy.data() + g * OCg * width, OCg, width, gyt.data() + g * OCg * width);
            gwg[g].addmm_(c, gyt.get(g, width));
          } else {
            gwg[g].addmm_(gyg, c.t());
          }
        }
        if (!need_gi) continue;
        T* gi0 = gip + t.n0 * image + g * s.Cg() * s.H * s.W;
        if (direct) {
          tile_mm(matrix(gi0 + t.la, K, seg, L, opts), wgt[g], gyg, thin_buf.get());
        } else {
          tile_mm(cols.get(0, width), wgt[g], gyg, thin_buf.get());
          for (int64_t i = 0; i < t.images; ++i) {
            col2im(s, cols.data() + i * seg, width, t.la, t.lb, gi0 + i * image);
          }
        }
      }
    });
  });
  if (need_gw) {
    for (int64_t c = 1; c < chunks; ++c) gw_part[0].add_(gw_part[c]);
    if (sum_transposed) grad_weight.view({s.groups, OCg, K}).copy_(gw_part[0].transpose(1, 2));
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

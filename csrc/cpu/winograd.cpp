// The Winograd core: relu?(conv(x, w) + bias + residual?) for 3x3 undilated,
// ungrouped convolutions at stride 1 or 2, with the kernels of winograd.h
// around a GEMM per tile entry (16 at stride 1, 25 at stride 2; winograd.h's
// kernel in channels_last float32, at::mm otherwise).
#include "conv_core.h"
#include "conv_kernels.h"
#include "winograd.h"

#include <ATen/Parallel.h>

#include <type_traits>

namespace cnnops {
namespace cpu {
namespace {

// U [E, K, C] for w [K, C, 3, 3] at stride 1 or 2; rotated (stride 1): [16, C,
// K] for w's filters rotated by 180 degrees with their in and out channels
// swapped. With panels, U^T in the GEMM kernel's panels (winograd_gemm_rows):
// [E][ceil(R/16)][S][16], the columns past R zero.
at::Tensor transformed_weight(const at::Tensor& w, int64_t stride, bool rotated, bool panels) {
  const at::Tensor wc = w.contiguous();
  const int64_t K = w.size(0), C = w.size(1), R = rotated ? C : K, S = rotated ? K : C;
  const int64_t E = stride == 2 ? winograd_entries<2>() : winograd_entries<1>();
  at::Tensor u = at::empty({E, panels ? winograd_panel_rows(R) : R, S}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_weight", [&] {
    const scalar_t* src = wc.const_data_ptr<scalar_t>();
    scalar_t* dst = u.mutable_data_ptr<scalar_t>();
    // (rows split in whole panels of 16)
    at::parallel_for(0, (R + kPanelCols - 1) / kPanelCols, 1, [&](int64_t b, int64_t e) {
      const int64_t rb = b * kPanelCols, re = std::min(R, e * kPanelCols);
      const auto buf = scratch<scalar_t>(panels ? 0 : 9 * S);
      if (stride == 2) {
        winograd_weight<2>(src, K, C, rotated, panels, rb, re, dst, buf.get());
      } else {
        winograd_weight<1>(src, K, C, rotated, panels, rb, re, dst, buf.get());
      }
    });
  });
  return u;
}

// Whether a call's GEMMs run on winograd_gemm_rows (float32, channels_last)
// rather than at::mm, with U^T in panels.
bool gemm_kernel_runs(at::ScalarType t, bool nhwc) {
#ifdef CNNOPS_WINOGRAD_GEMM_KERNEL
  return nhwc && t == at::kFloat;
#else
  return false;
#endif
}

// The transformed weight (in panels, or U), kept while w lives unchanged (as
// oneDNN's packed weights are: packed_weight_cache), else made for this call.
// input_grad: that of the filters the input gradient convolves with instead
// (winograd_conv_input_grad): w [K, C, 3, 3] as [C, K, 3, 3], each filter
// rotated by 180 degrees (stride 1).
at::Tensor winograd_weight_of(const at::Tensor& w, int64_t stride, bool panels,
                              bool input_grad) {
  static DerivedTensors plain(/*settled_only=*/true), paneled(/*settled_only=*/true),
      plain_grad(/*settled_only=*/true), paneled_grad(/*settled_only=*/true);
  DerivedTensors& cache =
      input_grad ? (panels ? paneled_grad : plain_grad) : (panels ? paneled : plain);
  const auto make = [&] {
    return std::vector<at::Tensor>{transformed_weight(w, stride, /*rotated=*/input_grad, panels)};
  };
  if (winograd_weight_uncached()) return make()[0];
  const std::vector<at::Tensor> u = cache.get({w}, 0.0, make, /*tag=*/{stride});
  return u.empty() ? make()[0] : u[0];
}

// n values of scratch for the calling thread, kept between calls: V and M
// take megabytes, and a block that size freshly allocated on every call is
// fresh pages, each faulted in on first touch (that measured as 2-3 ms of a
// 10 ms layer). The largest chunk seen stays allocated.
template <typename T>
T* workspace(int64_t n) {
  thread_local std::unique_ptr<char[]> buf;
  thread_local size_t size = 0;
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  if (bytes > size) {
    buf.reset();
    buf.reset(new char[bytes]);
    size = bytes;
  }
  return reinterpret_cast<T*>(buf.get());
}

// One NCHW chunk at stride S: the tile rows [r0, r0 + R) of the batch (a tile
// row: 2 output rows of one image). Input transforms into v over (channel,
// tile row), the E GEMMs into m as one batched GEMM (BLAS threads it), then
// the output transforms over (output channel, tile row). v is [E][C][R*TW] and
// m [E][K][R*TW].
template <int S, typename T>
void run_chunk(const ConvShape& s, const T* x, const T* u, const T* bias, const T* residual,
               T* y, bool relu, int64_t r0, int64_t R, T* v, T* m) {
  const int64_t C = s.C, K = s.OC, TH = winograd_tiles(s.OH), TW = winograd_tiles(s.OW);
  const int64_t Pc = R * TW, E = winograd_entries<S>();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::parallel_for(0, C * R, 1, [&](int64_t b, int64_t e) {
    const auto buf = scratch<T>(winograd_input_row_scratch<S>(TW));
    for (int64_t i = b; i < e; ++i) {
      const int64_t c = i / R, r = r0 + i % R, n = r / TH, th = r % TH;
      winograd_input_row<S>(x + (n * C + c) * s.H * s.W, s.H, s.W, s.ph, s.pw, th, TW,
                            v + c * Pc + (r - r0) * TW, C * Pc, buf.get());
    }
  });
  at::Tensor mb = at::from_blob(m, {E, K, Pc}, opts);
  at::bmm_out(mb, at::from_blob(const_cast<T*>(u), {E, K, C}, opts),
              at::from_blob(v, {E, C, Pc}, opts));
  at::parallel_for(0, K * R, 1, [&](int64_t b, int64_t e) {
    const auto buf = scratch<T>(4 * TW);
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = i / R, r = r0 + i % R, n = r / TH, th = r % TH;
      const int64_t plane = (n * K + k) * s.OH * s.OW;
      winograd_output_row<S>(m + k * Pc + (r - r0) * TW, K * Pc, th, TW, s.OH, s.OW,
                             bias ? bias[k] : T(0), residual ? residual + plane : nullptr,
                             y + plane, relu, buf.get());
    }
  });
}

// M[e] = V[e] @ U[e]^T for the E entries e: v [E][P][C] and m [E][P][K]
// row-major; u in panels where gemm_kernel_runs, else U [E][K][C]. The kernel's
// tasks are (entry, block of rows), split across threads: blocks of at most
// kGemmRows rows, as even as 6-row steps allow.
template <typename T>
void gemm_nhwc(T* v, const T* u, T* m, int64_t E, int64_t P, int64_t C, int64_t K) {
#ifdef CNNOPS_WINOGRAD_GEMM_KERNEL
  if constexpr (std::is_same_v<T, float>) {
    const int64_t blocks = (P + kGemmRows - 1) / kGemmRows;
    const int64_t Kp = winograd_panel_rows(K);
    const int64_t per_block = (P + blocks - 1) / blocks;
    // (at most kGemmRows, so every block starts inside P)
    const int64_t rows = (per_block + kKernelRows - 1) / kKernelRows * kKernelRows;
    at::parallel_for(0, E * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t j = i / blocks, p0 = (i % blocks) * rows;
        winograd_gemm_rows(v + (j * P + p0) * C, std::min(rows, P - p0), C, u + j * Kp * C, K,
                           m + (j * P + p0) * K);
      }
    });
    return;
  }
#endif
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::parallel_for(0, E, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      at::Tensor mj = matrix(m + j * P * K, P, K, K, opts);
      at::mm_out(mj, matrix(v + j * P * C, P, C, C, opts),
                 matrix(const_cast<T*>(u) + j * K * C, K, C, C, opts).t());
    }
  });
}

// The same for channels_last x, y and residual: v [E][R*TW][C] and m
// [E][R*TW][K], each transform phase split over tile rows. bias, ones and
// zeros: K, K and C values.
template <int S, typename T>
void run_chunk_nhwc(const ConvShape& s, const T* x, const T* u, const T* bias, const T* ones,
                    const T* zeros, const T* residual, T* y, bool relu, int64_t r0, int64_t R,
                    T* v, T* m) {
  const int64_t C = s.C, K = s.OC, TH = winograd_tiles(s.OH), TW = winograd_tiles(s.OW);
  const int64_t Pc = R * TW;
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = r0 + i;
      winograd_input_row_nhwc<S>(x + (r / TH) * s.H * s.W * C, s.H, s.W, C, s.ph, s.pw,
                                 r % TH, TW, v + i * TW * C, Pc * C, zeros);
    }
  });
  gemm_nhwc(v, u, m, winograd_entries<S>(), Pc, C, K);
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    const auto buf = scratch<T>(4 * K);
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = r0 + i, image = (r / TH) * s.OH * s.OW * K;
      winograd_output_row_nhwc<S>(m + i * TW * K, Pc * K, r % TH, TW, s.OH, s.OW, K, ones,
                                  bias, residual ? residual + image : nullptr, y + image, relu,
                                  buf.get());
    }
  });
}

// The batch is cut into chunks of whole tile rows whose V and M together take
// about kChunkBytes, or U's size if that is more (every chunk's GEMMs read all
// of U, [E][K][C]: 16 MB at 512 channels and stride 1; so U is read no more
// often than V and M are written). Measured on this project's 2-core machine at batch 8
// (64-channel 56x56 layers to 512-channel 7x7 ones), chunks of 16 MB ran
// faster than 4 or 8 MB (the GEMMs run wider), and faster than the whole batch
// at once for the 56x56 layer (whose V and M take 51 MB). Chunks stop growing
// at kMaxChunkBytes (U of more than 1024 x 1024 channels). The workspace keeps
// the largest chunk seen.
constexpr int64_t kChunkBytes = 16 << 20, kMaxChunkBytes = 64 << 20;

// Where the GEMMs run on the kernel (channels_last float32) and U is small
// (its panels at most kTaskBytes; 128 x 128 channels take 1 MB), the chunks
// are tasks instead: each thread takes whole groups of tile rows, V and M at
// most about kTaskBytes, through all three phases alone (the inner
// parallel_for calls run inline), so V and M stay in this core's caches
// between the phases and no thread waits for the others. Measured against the
// chunks above, alternated at batch 8: 0.67x-0.80x the time at 64 channels
// 32x32, 0.70x-0.87x at 128 channels 16x16. With more channels every task would read all of U (the
// chunks split U's entries between threads), and tasks measured slower
// (1.07x at 512 channels 4x4).
constexpr int64_t kTaskBytes = 2 << 20;

template <int S, typename T>
void forward(const ConvShape& s, const T* x, const at::Tensor& u, const T* bias,
             const T* residual, T* y, bool relu, bool nhwc) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the GEMMs are not autograd ops
  const int64_t C = s.C, K = s.OC, TW = winograd_tiles(s.OW), E = winograd_entries<S>();
  const int64_t rows = s.N * winograd_tiles(s.OH);  // tile rows of the whole batch
  const int64_t row_values = E * (C + K) * TW, sz = static_cast<int64_t>(sizeof(T));
  const int64_t rc = std::clamp<int64_t>(
      std::clamp<int64_t>(E * K * C * sz, kChunkBytes, kMaxChunkBytes) / (row_values * sz), 1,
      rows);
  if (nhwc) {
    // (the NHWC output loop reads the bias, and a scale of 1, per channel)
    std::vector<T> ones(K, T(1)), zeros(std::max(C, K), T(0));
    // (as many tasks as fit kTaskBytes, rounded up to a multiple of the threads)
    const int64_t threads = at::get_num_threads();
    const int64_t tasks =
        ((rows * row_values * sz + kTaskBytes - 1) / kTaskBytes + threads - 1) / threads * threads;
    const int64_t task_rows = (rows + tasks - 1) / tasks;
    if (gemm_kernel_runs(c10::CppTypeToScalarType<T>::value, true) &&
        E * K * C * sz <= kTaskBytes && rows >= tasks) {
      at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
        T* const v = workspace<T>(row_values * task_rows);
        T* const m = v + E * C * task_rows * TW;
        for (int64_t r0 = b * task_rows; r0 < std::min(rows, e * task_rows); r0 += task_rows) {
          run_chunk_nhwc<S>(s, x, u.const_data_ptr<T>(), bias ? bias : zeros.data(), ones.data(),
                         zeros.data(), residual, y, relu, r0, std::min(task_rows, rows - r0), v,
                         m);
        }
      });
      return;
    }
    T* const v = workspace<T>(row_values * rc);
    T* const m = v + E * C * rc * TW;
    for (int64_t r0 = 0; r0 < rows; r0 += rc) {
      run_chunk_nhwc<S>(s, x, u.const_data_ptr<T>(), bias ? bias : zeros.data(), ones.data(),
                     zeros.data(), residual, y, relu, r0, std::min(rc, rows - r0), v, m);
    }
    return;
  }
  T* const v = workspace<T>(row_values * rc);
  T* const m = v + E * C * rc * TW;
  for (int64_t r0 = 0; r0 < rows; r0 += rc) {
    run_chunk<S>(s, x, u.const_data_ptr<T>(), bias, residual, y, relu, r0,
              std::min(rc, rows - r0), v, m);
  }
}

// The layout the core computes a call of layout fmt in: channels_last wherever
// the GEMM kernel runs there (float32), since the kernel and the transforms
// vectorised across channels outrun the NCHW path (BLAS GEMMs, transforms
// vectorised along short rows) by more than the two copies between the layouts
// cost; except at stride 1 with at most 64 x 64 channels, where the copies
// (large images, few channels) cost more. Measured alternated on this
// project's 2-core machine at batch 8 (ResNet's 3x3 layers, NCHW float32, the
// conversions counted; two runs), channels_last against NCHW: 1.02x-1.22x the
// speed at stride 1 from 128 to 512 channels, 1.07x-1.30x at stride 2; 0.72x
// at 64 channels 56x56, stride 1. NCHW otherwise (float64).
at::MemoryFormat working_layout(const ConvShape& s, at::ScalarType t, at::MemoryFormat fmt) {
  const bool copies_cost_more = s.sh == 1 && s.C * s.OC <= 64 * 64;
  return gemm_kernel_runs(t, /*nhwc=*/true) && !copies_cost_more ? at::MemoryFormat::ChannelsLast
                                                                  : fmt;
}

// relu?(conv(x, w) + bias + residual?) in layout fmt, computed in layout work
// (working_layout) with u = winograd_weight_of(w, ...) for it.
at::Tensor run(const ConvShape& s, const at::Tensor& x, const at::Tensor& u,
               const at::Tensor& bias, const at::Tensor& residual, bool relu,
               at::MemoryFormat fmt, at::MemoryFormat work, const at::Tensor& into) {
  const bool nhwc = work == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(work);
  const at::Tensor rc = residual.defined() ? residual.contiguous(work) : residual;
  // (into, when given, is the residual: each output element is written after
  // the residual element it adds is read)
  const bool in_place =
      into.defined() && into.is_contiguous(fmt) && into.scalar_type() == x.scalar_type();
  at::Tensor out = in_place && work == fmt
                       ? into
                       : at::empty({s.N, s.OC, s.OH, s.OW}, x.options().memory_format(work));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv_relu", [&] {
    const auto fwd = s.sh == 2 ? forward<2, scalar_t> : forward<1, scalar_t>;
    fwd(s, xc.const_data_ptr<scalar_t>(), u,
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), relu, nhwc);
  });
  if (work == fmt) return out;
  return in_place ? into.copy_(out) : out.contiguous(fmt);
}

}  // namespace

bool& winograd_weight_uncached() {
  thread_local bool uncached = false;
  return uncached;
}

bool winograd_runs(const ConvShape& s) {
  return s.KH == 3 && s.KW == 3 && s.sh == s.sw && (s.sh == 1 || s.sh == 2) && s.dh == 1 &&
         s.dw == 1 && s.groups == 1;
}

at::Tensor winograd_conv_relu(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& bias, const at::Tensor& residual, bool relu,
                              at::MemoryFormat fmt, const at::Tensor& into) {
  TORCH_INTERNAL_ASSERT(winograd_runs(s) && winograd_supports(x.scalar_type()));
  const at::MemoryFormat work = working_layout(s, x.scalar_type(), fmt);
  const bool panels = gemm_kernel_runs(x.scalar_type(), work == at::MemoryFormat::ChannelsLast);
  return run(s, x, winograd_weight_of(w, s.sh, panels, /*input_grad=*/false), bias, residual,
             relu, fmt, work, into);
}

bool winograd_runs_input_grad(const ConvShape& s) {
  return winograd_runs(s) && s.sh == 1 && s.ph <= 2 && s.pw <= 2;
}

at::Tensor winograd_conv_input_grad(const ConvShape& s, const at::Tensor& grad,
                                    const at::Tensor& w, at::MemoryFormat fmt) {
  TORCH_INTERNAL_ASSERT(winograd_runs_input_grad(s) && winograd_supports(grad.scalar_type()));
  // The transposed convolution as a convolution: the gradient [N, K, OH, OW]
  // padded by 2 - p convolved with the rotated, transposed filters gives
  // [N, C, OH + 2 (2 - p) - 2, ...] = [N, C, H, W].
  ConvShape t = s;
  t.C = s.OC;
  t.H = s.OH;
  t.W = s.OW;
  t.OC = s.C;
  t.OH = s.H;
  t.OW = s.W;
  t.ph = 2 - s.ph;
  t.pw = 2 - s.pw;
  const at::MemoryFormat work = working_layout(t, grad.scalar_type(), fmt);
  const bool panels =
      gemm_kernel_runs(grad.scalar_type(), work == at::MemoryFormat::ChannelsLast);
  return run(t, grad, winograd_weight_of(w, 1, panels, /*input_grad=*/true), at::Tensor(),
             at::Tensor(), /*relu=*/false, fmt, work, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> winograd_conv_backward(
    const ConvShape& s, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
    const ConvArgs& a, at::MemoryFormat fmt, std::array<bool, 3> mask) {
  TORCH_INTERNAL_ASSERT(mask[0]);
  auto [unused, gw, gb] = aten_conv_backward(grad, x, w, a, fmt, {false, mask[1], mask[2]});
  return {winograd_conv_input_grad(s, grad, w, fmt), gw, gb};
}

}  // namespace cpu
}  // namespace cnnops

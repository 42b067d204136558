// Helpers shared by the CUDA kernels: dtype checks, launch geometry and the
// device-side arithmetic every op uses.
//
// Conventions of the CUDA files:
//  * every entry point checks its inputs (cnnops/common.h and below), guards
//    the input's device, launches on the current stream, returns early on
//    empty tensors and checks every launch;
//  * kernels use grid-stride loops with 64-bit indices, so any tensor whose
//    elements are addressable works, whatever the grid size;
//  * values are accumulated in at::acc_type: float for float16/bfloat16 and
//    float32, double for float64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "cnnops/common.h"

namespace cnnops {
namespace gpu {

template <typename scalar_t>
using acc_type = at::acc_type<scalar_t, /*is_cuda=*/true>;

// Shared with the CPU kernels (cnnops/common.h).
using cnnops::acc_dtype;
using cnnops::bn_channel_param;
using cnnops::is_reduced;

// The CUDA kernels are written for float32, float64, float16 and bfloat16.
inline void check_cuda_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.is_cuda(), "expected ", name, " on a CUDA device, got a tensor on ",
                    t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf ||
                       st == at::kBFloat16,
                   "the cnnops CUDA kernels support float32, float64, float16 and bfloat16; ",
                   name, " has dtype ", st);
}

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= n, clamped to [lo, hi].
inline int pow2_clamp(int64_t n, int lo, int hi) {
  int p = lo;
  while (p < hi && p < n) p *= 2;
  return p;
}

inline int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Blocks for a grid-stride loop over `items` work items of `per_block` each:
// enough to fill the device several times over, never more than needed, and
// within the 2^31 - 1 limit of gridDim.x.
inline unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t needed = ceil_div(std::max<int64_t>(items, 1), per_block);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

// Splits of a per-channel reduction: with `channel_blocks` blocks along the
// channels, use enough splits along the reduced axis to give the device about
// four blocks per SM, each split getting at least one step of `rows` (the
// number of row-steps there are).
inline int reduction_splits(int64_t channel_blocks, int64_t rows) {
  const int64_t target = static_cast<int64_t>(sm_count()) * 4;
  int64_t s = ceil_div(target, std::max<int64_t>(channel_blocks, 1));
  s = std::min<int64_t>(s, std::max<int64_t>(rows, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s, 1024)));
}

// ---- vectorised access ----------------------------------------------------

// kVec<scalar_t> values moved as one 16-byte access (8 float16 / bfloat16, 4
// float32, 2 float64): memory-bound kernels reach the bandwidth with these,
// not with 2-byte loads.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
struct alignas(16) Vec16 {
  scalar_t v[kVec<scalar_t>];
};

template <typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> load16(const scalar_t* p) {
  return *reinterpret_cast<const Vec16<scalar_t>*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ void store16(scalar_t* p, const Vec16<scalar_t>& v) {
  *reinterpret_cast<Vec16<scalar_t>*>(p) = v;
}

// Whether every pointer (null ones aside) is 16-byte aligned.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Whether dense [M, C] rows (NHWC) can be walked 16 bytes at a time: C a
// multiple of kVec (so a vector never straddles two rows), pointers aligned.
template <typename scalar_t>
inline bool rows_vectorizable(int64_t C, std::initializer_list<const void*> ptrs) {
  return C % kVec<scalar_t> == 0 && aligned16(ptrs);
}

// ---- device arithmetic ---------------------------------------------------

// 64-bit min / max, spelled out so that no overload of CUDA's min/max for
// other types (float, int) can be picked by accident.
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float device_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double device_sqrt(double x) { return sqrt(x); }

template <typename acc_t>
__device__ __forceinline__ bool device_isnan(acc_t v) {
  return v != v;
}

// relu that keeps NaN, as the CPU kernels (and torch.relu) do.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_keep_nan(acc_t v) {
  return (v > acc_t(0) || device_isnan(v)) ? v : acc_t(0);
}

}  // namespace gpu
}  // namespace cnnops

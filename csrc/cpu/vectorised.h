// CNNOPS_VECTORISED marks a hot CPU loop kernel to be compiled once per x86-64
// level, the widest the running CPU supports picked when the library loads:
//
//   x86-64-v4  AVX-512
//   x86-64-v3  AVX2 + FMA
//   default    the baseline the rest of the library is built for (SSE2)
//
// The build targets the baseline so that the wheel runs on any x86-64 CPU, and
// ATen's own kernels are dispatched the same way (ATEN_CPU_CAPABILITY); loops
// left at the baseline run 4 floats wide where torch runs 8 or 16. This is
// GCC's function multiversioning (target_clones): each marked function gets a
// clone per level and an ifunc resolver that picks one at load time. `flatten`
// inlines everything the kernel calls into each clone, so the loops inside are
// compiled for its level too.
//
// Mark leaf kernels only (a plane, a row block: loops, no allocation, no
// at::parallel_for), each called per task; a call costs an indirect jump.
// Results may differ in the last bits between levels (vector width changes the
// order of a sum; FMA contracts a * b + c), as torch's own kernels do.
//
// Elsewhere (other compilers, other systems) the macro is empty and the
// kernels are built for the baseline only.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define CNNOPS_HAS_CLONES 1
#define CNNOPS_VECTORISED \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define CNNOPS_VECTORISED
#endif

namespace cnnops {
namespace cpu {

// The level the CNNOPS_VECTORISED kernels run at on this CPU (the clone the
// resolvers pick): "AVX-512 (x86-64-v4)", "AVX2 (x86-64-v3)" or "baseline".
inline const char* vector_level() {
#ifdef CNNOPS_HAS_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "AVX-512 (x86-64-v4)";
  if (__builtin_cpu_supports("x86-64-v3")) return "AVX2 (x86-64-v3)";
#endif
  return "baseline";
}

}  // namespace cpu
}  // namespace cnnops

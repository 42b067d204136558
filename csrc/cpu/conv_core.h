// The CPU convolution core, chosen per call between two:
//
//  * im2col: cnnops' own im2col + BLAS GEMM (conv_kernels.h). Its fused
//    epilogues consume each output tile while it is in cache (BN statistics,
//    BN + residual + ReLU), and it is the readable reference of the seeds'
//    cross-correlation. float32 and float64.
//  * onednn: ATen's CPU convolution, which runs oneDNN's direct and JIT
//    kernels (the convolution eager PyTorch runs), with cnnops' fusions around
//    it: inference conv -> BN (-> + residual) -> ReLU is one oneDNN primitive
//    with BN folded into the weight and bias and ReLU (and the residual add) as
//    post-ops (mkldnn::_convolution_pointwise, what torch.compile's CPU
//    freezing emits); training puts cnnops' BN statistics, apply and backward
//    passes between oneDNN's forward and backward. float32 and bfloat16 (the
//    only core for bfloat16).
//
// Which one runs is set by cnnops.set_cpu_conv / CNNOPS_CPU_CONV:
//   im2col | onednn   that core for every call (an error for a dtype it lacks);
//   auto (default)    the faster one for this call, measured the first time a
//                     configuration is seen (op, shapes, dtype, flags, threads)
//                     by running the call with each core and keeping the
//                     faster; later calls reuse that choice, so it is fixed
//                     within a process. A dtype only one core runs takes it.
// Every choice is recorded (cnnops.cpu_conv_choices(), cnnops.explain()).
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "cnnops/conv_shape.h"

namespace cnnops {
namespace cpu {

enum class Core { Im2col, OneDNN };
enum class CoreMode { Auto, Im2col, OneDNN };

CoreMode core_mode();
void set_core_mode(CoreMode mode);
const char* core_name(Core core);

// Whether a core runs this dtype (oneDNN also needs torch.backends.mkldnn on).
bool im2col_supports(at::ScalarType t);
bool onednn_supports(at::ScalarType t);

// One configuration of a conv op: which op, its shapes and flags, the dtype
// and the thread count (a core that wins on 2 threads may lose on 16).
using CoreFlags = std::initializer_list<std::pair<const char*, bool>>;
struct CoreKey {
  std::vector<int64_t> values;
  const char* op;
  const ConvShape& shape;
  at::ScalarType dtype;
  std::vector<std::pair<const char*, bool>> flags;

  CoreKey(const char* op, const ConvShape& s, at::ScalarType dtype, CoreFlags flags);
  // Human-readable, for the record (made only when one is kept: a call's
  // overhead budget is a few microseconds).
  std::string text() const;
};

struct CoreChoice {
  Core core;
  std::string reason;  // "forced", "only core for bfloat16", "measured: ..."
};

// The recorded choice for `key`, or null the first time it is seen in auto
// mode (or when the mode forces a core: forced choices are made per call).
const CoreChoice* lookup_choice(const CoreKey& key);
// The choice for `key` when it needs no measurement (forced, or one core).
// Raises when the forced core cannot run the dtype.
bool fixed_choice(const CoreKey& key, at::ScalarType dtype, CoreChoice& out);
// Records a measured choice (the first one recorded for a key wins).
const CoreChoice& record_choice(const CoreKey& key, double im2col_ms, double onednn_ms);
// Notes that a call ran `choice` (kept while a trace is on: cnnops.explain).
void trace_call(const CoreKey& key, const CoreChoice& choice);

// Every recorded auto choice, and the calls traced since the trace was turned on.
struct ChoiceRecord {
  std::string key, core, reason;
};
std::vector<ChoiceRecord> recorded_choices();
void set_trace(bool on);
std::vector<ChoiceRecord> take_trace();

// run(core) with the core for this call (see the top of this file). When the
// choice is measured, each core first runs once as a warm-up (allocations,
// oneDNN's JIT), then the two alternate for at least 3 rounds and until each
// has run about 20 ms (at most 20 rounds: small calls are noisy); the faster
// of each core's runs counts. The result returned is the chosen core's last.
template <typename Run>
auto with_core(const CoreKey& key, at::ScalarType dtype, const Run& run)
    -> decltype(run(Core::Im2col)) {
  CoreChoice fixed;
  if (fixed_choice(key, dtype, fixed)) {
    trace_call(key, fixed);
    return run(fixed.core);
  }
  if (const CoreChoice* known = lookup_choice(key)) {
    trace_call(key, *known);
    return run(known->core);
  }
  using Clock = std::chrono::steady_clock;
  decltype(run(Core::Im2col)) results[2];
  double best[2] = {1e300, 1e300}, total[2] = {0.0, 0.0};
  for (int round = 0; round <= 20; ++round) {
    for (const int c : {0, 1}) {
      const auto start = Clock::now();
      results[c] = run(c == 0 ? Core::Im2col : Core::OneDNN);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      if (round > 0) {
        best[c] = std::min(best[c], ms);
        total[c] += ms;
      }
    }
    if (round >= 3 && total[0] >= 20.0 && total[1] >= 20.0) break;
  }
  const CoreChoice& chosen = record_choice(key, best[0], best[1]);
  trace_call(key, chosen);
  return std::move(results[static_cast<int>(chosen.core)]);
}

// ---- the oneDNN core: ATen's convolution ------------------------------------

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

// conv(x, w) + bias (bias undefined or of x's dtype), in layout fmt.
at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                       const ConvArgs& a, at::MemoryFormat fmt);

// relu?(conv(x, w) + bias + residual?) in layout fmt as one oneDNN primitive
// (float32), or ATen's convolution and one pass (bfloat16: the epilogue runs
// in float). bias: undefined or x's dtype; residual: undefined or the output's
// shape.
at::Tensor onednn_conv_relu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& residual, bool relu, const ConvArgs& a,
                            at::MemoryFormat fmt);

// (grad_input in fmt, grad_weight contiguous, grad_bias) of conv(x, w) + bias
// for the output gradient dy; undefined where not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> onednn_conv_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const ConvArgs& a,
    at::MemoryFormat fmt, std::array<bool, 3> mask);

}  // namespace cpu
}  // namespace cnnops

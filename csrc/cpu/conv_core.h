// The CPU convolution core, chosen per call among three:
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
//  * winograd: Winograd convolutions (winograd.h) of 3x3, undilated, ungrouped
//    convolutions: F(2x2, 3x3) at stride 1 (2.25x fewer multiplications) and
//    its stride-2 counterpart (1.44x fewer), as a GEMM per tile entry
//    (winograd.h's register-blocked kernel in channels_last float32, BLAS
//    otherwise; float32 NCHW calls are computed in channels_last, except small
//    stride-1 ones: working_layout in winograd.cpp) between an input and an
//    output transform; the output transform applies the bias (BN folded in, as
//    for oneDNN), residual and ReLU. It runs the forward of every conv op
//    (conv_bn_relu in inference the whole block; in training the convolution,
//    with cnnops' BN passes around it as on oneDNN) and, at stride 1, in the
//    backward the input gradient (itself a stride-1 3x3 convolution), while
//    oneDNN computes the weight gradient. float32 and float64, NCHW and
//    channels_last.
//
// Which one runs is set by cnnops.set_cpu_conv / CNNOPS_CPU_CONV:
//   im2col | onednn   that core for every call (an error for a dtype it lacks);
//   winograd          that core for the calls it runs; the others run on
//                     im2col (on oneDNN for bfloat16), and the choice says so;
//   auto (default)    the fastest core for this call, measured the first time
//                     a configuration is seen (op, shapes, dtype, flags,
//                     threads) by running the call with each core that can
//                     run it and keeping the fastest; later calls reuse that
//                     choice, so it is fixed within a process. A call only one
//                     core runs takes it.
// Every choice is recorded (cnnops.cpu_conv_choices(), cnnops.explain()).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cnnops/aten_conv.h"
#include "cnnops/common.h"
#include "cnnops/conv_shape.h"

namespace cnnops {
namespace cpu {

enum class Core { Im2col, OneDNN, Winograd };
enum class CoreMode { Auto, Im2col, OneDNN, Winograd };
constexpr int kCores = 3;

CoreMode core_mode();
void set_core_mode(CoreMode mode);
const char* core_name(Core core);

// Whether a core runs this dtype (oneDNN also needs torch.backends.mkldnn on).
bool im2col_supports(at::ScalarType t);
bool onednn_supports(at::ScalarType t);
bool winograd_supports(at::ScalarType t);
// Whether the Winograd core computes this convolution: 3x3, stride 1 or 2 (the
// same both ways), no dilation, no groups (any padding).
bool winograd_runs(const ConvShape& s);

// One configuration of a conv op: which op, its shapes and flags, the input's
// dtype, the call's layout (conv_memory_format: oneDNN runs channels_last
// natively, im2col converts it), and the thread count (a core that wins on 2
// threads may lose on 16). winograd: whether the op has a Winograd path for
// this call (winograd_runs, and the op runs it: a forward, or a backward that
// takes the input gradient).
using CoreFlags = std::initializer_list<std::pair<const char*, bool>>;
struct CoreKey {
  std::vector<int64_t> values;
  const char* op;
  const ConvShape& shape;
  at::ScalarType dtype;
  bool channels_last;
  std::vector<std::pair<const char*, bool>> flags;
  bool winograd;

  CoreKey(const char* op, const ConvShape& s, const at::Tensor& input, at::MemoryFormat fmt,
          CoreFlags flags, bool winograd = false);
  // Human-readable, for the record (made only when one is kept: a call's
  // overhead budget is a few microseconds).
  std::string text() const;
  // Whether the call is part of a training step, whose weights change every
  // step: a backward, or a forward with the "train" flag (asked only when a
  // choice is measured, not on every call).
  bool training() const;
};

struct CoreChoice {
  Core core;
  std::string reason;  // "forced", "only core for bfloat16", "measured: ..."
};

// The cores auto mode measures for `key`, in order (at least two: with one,
// settled_choice has fixed it).
std::vector<Core> candidate_cores(const CoreKey& key);
// Records a measured choice (the first one recorded for a key wins): each
// candidate's best time in ms, indexed by Core; with onednn_error, that oneDNN
// failed (and is not chosen).
const CoreChoice& record_choice(const CoreKey& key, const std::vector<Core>& candidates,
                                const double (&ms)[kCores], const std::string& onednn_error = "");
// The choice for `key` when it needs no measurement: `fixed` filled in when
// the mode forces a core or only one core runs the dtype (raises when the
// forced core cannot run it), else the choice recorded for `key`; null the
// first time auto mode sees it. (A pointer, not a copy: this runs on every
// convolution call.)
const CoreChoice* settled_choice(const CoreKey& key, CoreChoice& fixed);
// Notes that a call ran `choice` (kept while a trace is on: cnnops.explain).
void trace_call(const CoreKey& key, const CoreChoice& choice);

// Every recorded auto choice, and the calls traced since the trace was turned on.
struct ChoiceRecord {
  std::string key, core, reason;
};
std::vector<ChoiceRecord> recorded_choices();
void set_trace(bool on);
std::vector<ChoiceRecord> take_trace();

// While set on this thread, the Winograd core makes its transformed weight
// instead of reusing a kept one (winograd_weight_of).
bool& winograd_weight_uncached();

// Auto's measurement of a training call on the Winograd core makes the
// transformed weight on every run, as every training step will (its weight
// has changed since the last): measured with the weight transformed once,
// Winograd took training calls with few tiles, which that transform, 16 x K x
// C values, costs more than the GEMMs it saves (ResNet-50's 512-channel 2x2
// layers at batch 2).
class UncachedWinogradWeights {
 public:
  explicit UncachedWinogradWeights(bool on) : on_(on) {
    if (on_) winograd_weight_uncached() = true;
  }
  ~UncachedWinogradWeights() {
    if (on_) winograd_weight_uncached() = false;
  }

 private:
  const bool on_;
};

// run(core) with the core for this call (see the top of this file). When the
// choice is measured, each core in turn runs once as a warm-up (allocations,
// oneDNN's JIT and weight reorder), then in rounds, each core once a round in
// turn, at least 3 rounds and until one core has run about 10 ms (at most 20
// rounds: small calls are noisy); each core's fastest run counts. Rounds
// rather than each core's runs back to back: a slow spell of this shared
// machine (another process's burst) then slows a run of every core, not all
// of one core's (one quick benchmark run had auto at 1.01x of eager on a layer
// where the im2col core forced measured 1.32x). No run keeps its result
// alive, as in a model's steady state: a live output of tens of MB from the
// run before made every run's output fresh pages (page faults measured
// instead of the core; a 25 MB output ran at half speed). The chosen core then
// runs the call once more for the result.
template <typename Run>
auto with_core(const CoreKey& key, const Run& run) -> decltype(run(Core::Im2col)) {
  CoreChoice fixed;
  if (const CoreChoice* settled = settled_choice(key, fixed)) {
    trace_call(key, *settled);
    return run(settled->core);
  }
  using Clock = std::chrono::steady_clock;
  double best[kCores] = {1e300, 1e300, 1e300}, total[kCores] = {0.0, 0.0, 0.0};
  std::string onednn_error;
  const std::vector<Core> candidates = candidate_cores(key);
  std::vector<Core> timed = candidates;  // (less oneDNN where it refuses the call)
  for (int round = 0; round <= 20; ++round) {  // (round 0: the warm-up)
    for (auto it = timed.begin(); it != timed.end();) {
      const Core core = *it;
      const int c = static_cast<int>(core);
      const auto start = Clock::now();
      if (core == Core::OneDNN) {
        // A configuration oneDNN (or ATen around it) refuses is recorded as
        // such and runs on another core (im2col takes every valid call).
        try {
          run(core);
        } catch (const c10::Error& e) {
          onednn_error = e.what_without_backtrace();
          it = timed.erase(it);
          continue;
        }
      } else {
        const UncachedWinogradWeights uncached(core == Core::Winograd && key.training());
        run(core);
      }
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      if (round > 0) {
        best[c] = std::min(best[c], ms);
        total[c] += ms;
      }
      ++it;
    }
    if (round >= 3 && *std::max_element(total, total + kCores) >= 10.0) break;
  }
  const CoreChoice& chosen = record_choice(key, candidates, best, onednn_error);
  trace_call(key, chosen);
  return run(chosen.core);
}

// ---- tensors derived from parameters, kept while the parameters stay -----------

// Inference conv -> BN on the oneDNN core folds BN into the conv weight. Doing
// that every call costs more than the fold: oneDNN keeps a reordered copy of a
// weight it has seen, and a fresh weight tensor each call misses it (64-channel
// 3x3 layer, batch 8: 8.5 -> 11.4 ms). So the folded tensors are kept per
// (weight, BN tensors, eps) and reused while every source tensor is alive and
// unchanged (same data pointer and version counter), as torch.compile's
// freezing keeps its folded weights. Inference-mode tensors have no version
// counter and are never cached. The cache holds at most kMaxEntries sets.
class DerivedTensors {
 public:
  static constexpr size_t kMaxEntries = 1024;
  // settled_only: once a set's sources have changed in place, make it again
  // only when a call finds them unchanged since the previous call; until then
  // get returns {} (see packed_weight_cache).
  explicit DerivedTensors(bool settled_only = false) : settled_only_(settled_only) {}
  // sources[0] must be defined; the others may be undefined. scalar and tag are
  // the non-tensor inputs of make (eps; the input's sizes and layout). Returns
  // what make returns, or {} where a settled_only cache declines to make it.
  std::vector<at::Tensor> get(const std::vector<at::Tensor>& sources, double scalar,
                              const std::function<std::vector<at::Tensor>()>& make,
                              const std::vector<int64_t>& tag = {});
  // Whether get keeps what make returns: inference-mode tensors have no
  // version counter to tell a change, so sets with one are made every call.
  static bool cacheable(const std::vector<at::Tensor>& sources);

 private:
  struct Source {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> impl;
    const void* data;
    uint32_t version;
  };
  struct Entry {
    std::vector<Source> sources;
    double scalar;
    std::vector<int64_t> tag;
    std::vector<at::Tensor> derived;  // empty: seen, not made (settled_only)
  };
  // Whether e was made from these tensors (alive, same data), and_versions: as
  // they are now.
  static bool same_tensors(const Entry& e, const std::vector<at::Tensor>& sources,
                           bool and_versions);
  const bool settled_only_;
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

DerivedTensors& folded_bn_cache();

// oneDNN's convolutions want the weight in a blocked layout of their own; given
// a plain one, each call reorders it (on the channels_last path that costs up
// to a third of a 512-channel layer: 2048x7x7 1x1, 5.8 -> 3.7 ms). So
// onednn_conv_relu runs channels_last float32 inputs with a weight packed once
// per (weight, input sizes) by mkldnn::_reorder_convolution_weight and kept in
// this cache, as torch.compile's CPU freezing packs its weights. (For NCHW
// inputs oneDNN reorders the activations too, and a packed weight measured no
// faster: they keep the plain weight.) The cache holds one packed copy of each
// weight seen, while that weight lives and is unchanged.
//
// A weight that training updates in place every step would be packed on every
// call, and the forward of a training step runs with grad mode off (inside the
// autograd Function), so grad mode cannot tell. The cache is settled_only
// instead: a weight packed once and then found at a new version is run as it
// is until a call finds it unchanged since the previous one (evaluation after
// training). Repacking every step cost 5 reorders and 15 weight copies per
// training step of the main job's network in channels_last.
DerivedTensors& packed_weight_cache();

// ---- the oneDNN core: ATen's convolution ------------------------------------
// (aten_conv / aten_conv_backward, cnnops/aten_conv.h, and the fused call below)

// relu?(conv(x, w) + bias + residual?) in layout fmt as one oneDNN primitive
// (float32), or ATen's convolution and one pass (bfloat16: the epilogue runs
// in float). bias: undefined or x's dtype; residual: undefined or the output's
// shape.
at::Tensor onednn_conv_relu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& residual, bool relu, const ConvArgs& a,
                            at::MemoryFormat fmt);

// The same with the result written into residual (float32, contiguous in fmt)
// instead of a new tensor: in channels_last one oneDNN primitive accumulating
// into it (mkldnn::_convolution_pointwise_.binary, as torch.compile's CPU
// freezing reuses a residual that nothing reads afterwards), in NCHW the
// convolution and one pass that writes the sum and ReLU over the residual.
void onednn_conv_relu_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& bias, bool relu, const ConvArgs& a,
                           at::MemoryFormat fmt);

// ---- the Winograd core (winograd.cpp) ---------------------------------------

// relu?(conv(x, w) + bias + residual?) for a call winograd_runs, in layout fmt
// (NCHW or channels_last; float32, float64). The transformed weight is kept
// while w lives unchanged. into: undefined, or the residual, which the output
// then overwrites when it is contiguous in fmt (the result is `into` itself).
at::Tensor winograd_conv_relu(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& bias, const at::Tensor& residual, bool relu,
                              at::MemoryFormat fmt, const at::Tensor& into = at::Tensor());

// Whether winograd_conv_input_grad computes this convolution's input gradient:
// winograd_runs at stride 1, and padding at most 2 (the gradient's convolution
// is padded by 2 - padding).
bool winograd_runs_input_grad(const ConvShape& s);

// The input gradient [N, C, H, W] of conv(x, w) for a call
// winograd_runs_input_grad, from the output gradient grad [N, K, OH, OW] in
// layout fmt: for a stride-1 convolution it is itself a convolution, of grad
// padded by 2 - padding with w's filters rotated by 180 degrees and their in
// and out channels swapped (transformed once and kept, like the forward's).
at::Tensor winograd_conv_input_grad(const ConvShape& s, const at::Tensor& grad,
                                    const at::Tensor& w, at::MemoryFormat fmt);

// A convolution's backward on the Winograd core, which the ops choose only
// where the input gradient is asked for: (input gradient from
// winograd_conv_input_grad, weight and bias gradients from ATen's, that is
// oneDNN's, convolution backward), each undefined where the mask leaves it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> winograd_conv_backward(
    const ConvShape& s, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
    const ConvArgs& a, at::MemoryFormat fmt, std::array<bool, 3> mask);

}  // namespace cpu
}  // namespace cnnops

// The CPU convolution core's choice (see conv_core.h) and the oneDNN core.
#include "conv_core.h"

#include "bn_kernels.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string_view>

namespace cnnops {
namespace cpu {
namespace {

CoreMode mode_from_env() {
  const char* env = std::getenv("CNNOPS_CPU_CONV");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return CoreMode::Auto;
  if (std::strcmp(env, "im2col") == 0) return CoreMode::Im2col;
  if (std::strcmp(env, "onednn") == 0) return CoreMode::OneDNN;
  if (std::strcmp(env, "winograd") == 0) return CoreMode::Winograd;
  // cnnops/backends.py validates the variable at import with a clear error;
  // this is reached only when the library is loaded some other way.
  std::fprintf(stderr, "cnnops: ignoring CNNOPS_CPU_CONV=%s (expected auto, im2col, onednn or "
               "winograd)\n", env);
  return CoreMode::Auto;
}

struct State {
  std::mutex mutex;
  // Read on every conv call: atomics, so a call takes the lock only to look up
  // or record a choice, or while a trace is on.
  std::atomic<CoreMode> mode{mode_from_env()};
  std::map<std::vector<int64_t>, std::pair<std::string, CoreChoice>> choices;
  std::atomic<bool> tracing{false};
  std::vector<ChoiceRecord> trace;
};

State& state() {
  static State s;
  return s;
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

}  // namespace

CoreMode core_mode() { return state().mode.load(); }

void set_core_mode(CoreMode mode) { state().mode.store(mode); }

const char* core_name(Core core) {
  switch (core) {
    case Core::Im2col: return "im2col";
    case Core::OneDNN: return "onednn";
    case Core::Winograd: return "winograd";
  }
  return "?";
}

bool im2col_supports(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

bool winograd_supports(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

bool onednn_supports(at::ScalarType t) {
  return (t == at::kFloat || t == at::kBFloat16) && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn();
}

CoreKey::CoreKey(const char* op_, const ConvShape& s, const at::Tensor& input,
                 at::MemoryFormat fmt, CoreFlags flags_, bool winograd_)
    : op(op_),
      shape(s),
      dtype(input.scalar_type()),
      channels_last(fmt == at::MemoryFormat::ChannelsLast),
      flags(flags_.begin(), flags_.end()),
      winograd(winograd_ && winograd_runs(s) && winograd_supports(dtype)) {
  values = {s.N, s.C, s.H, s.W, s.OC, s.KH, s.KW, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw,
            s.groups, static_cast<int64_t>(dtype), channels_last, at::get_num_threads(),
            static_cast<int64_t>(std::hash<std::string_view>()(op))};
  int64_t bits = 0;
  for (const auto& flag : flags) bits = bits * 2 + flag.second;
  values.push_back(bits);
}

bool CoreKey::training() const {
  return std::strstr(op, "backward") != nullptr ||
         std::any_of(flags.begin(), flags.end(), [](const auto& f) {
           return f.second && std::strcmp(f.first, "train") == 0;
         });
}

std::string CoreKey::text() const {
  const ConvShape& s = shape;
  std::ostringstream t;
  t << op << " " << dtype_name(dtype) << " [" << s.N << ", " << s.C << ", " << s.H << ", "
    << s.W << "] k" << s.KH << "x" << s.KW << " s" << s.sh << "x" << s.sw << " p" << s.ph
    << "x" << s.pw;
  if (s.dh != 1 || s.dw != 1) t << " d" << s.dh << "x" << s.dw;
  if (s.groups != 1) t << " g" << s.groups;
  t << " -> " << s.OC;
  if (channels_last) t << " channels_last";
  for (const auto& [name, on] : flags) {
    if (on) t << " " << name;
  }
  t << " (" << at::get_num_threads() << " threads)";
  return t.str();
}

namespace {

// The choice for `key` when it needs no measurement (forced, or one core).
// Raises when the forced core cannot run its dtype.
bool fixed_choice(const CoreKey& key, CoreChoice& out) {
  const at::ScalarType dtype = key.dtype;
  const CoreMode mode = core_mode();
  const bool im2col = im2col_supports(dtype), onednn = onednn_supports(dtype);
  if (mode == CoreMode::Im2col) {
    TORCH_CHECK_TYPE(im2col, "the im2col CPU convolution core supports float32 and float64, got ",
                     dtype_name(dtype), " (cnnops.set_cpu_conv('im2col') / CNNOPS_CPU_CONV); "
                     "use 'onednn' or 'auto'");
    out = {Core::Im2col, "forced (set_cpu_conv / CNNOPS_CPU_CONV)"};
    return true;
  }
  if (mode == CoreMode::OneDNN) {
    TORCH_CHECK_TYPE(onednn, "the onednn CPU convolution core supports float32 and bfloat16 "
                     "with torch.backends.mkldnn enabled, got ", dtype_name(dtype),
                     " (cnnops.set_cpu_conv('onednn') / CNNOPS_CPU_CONV); use 'im2col' or 'auto'");
    out = {Core::OneDNN, "forced (set_cpu_conv / CNNOPS_CPU_CONV)"};
    return true;
  }
  TORCH_CHECK_TYPE(im2col || onednn, "the cnnops CPU convolutions support float32, float64 and "
                   "bfloat16 (bfloat16 with torch.backends.mkldnn enabled), got ",
                   dtype_name(dtype));
  if (mode == CoreMode::Winograd) {
    if (key.winograd) {
      out = {Core::Winograd, "forced (set_cpu_conv / CNNOPS_CPU_CONV)"};
    } else {
      out = {im2col ? Core::Im2col : Core::OneDNN,
             std::string("forced winograd, which does not run this call (it runs 3x3 ungrouped "
                         "undilated float32/float64 convolutions at stride 1 or 2, and input "
                         "gradients at stride 1): ") +
                 (im2col ? "im2col" : "onednn")};
    }
    return true;
  }
  if (int(im2col) + int(onednn) + int(key.winograd) > 1) return false;  // (candidate_cores)
  out = {im2col ? Core::Im2col : Core::OneDNN,
         std::string("the only core for ") + dtype_name(dtype) +
             (im2col ? "" : " (oneDNN)")};
  if (dtype == at::kFloat && !onednn) out.reason = "oneDNN is disabled or not built";
  return true;
}

// The recorded choice for `key`, or null the first time it is seen in auto
// mode (or when the mode forces a core: forced choices are made per call).
const CoreChoice* lookup_choice(const CoreKey& key) {
  std::lock_guard<std::mutex> lock(state().mutex);
  const auto it = state().choices.find(key.values);
  return it == state().choices.end() ? nullptr : &it->second.second;
}

}  // namespace

std::vector<Core> candidate_cores(const CoreKey& key) {
  std::vector<Core> out;
  if (im2col_supports(key.dtype)) out.push_back(Core::Im2col);
  if (onednn_supports(key.dtype)) out.push_back(Core::OneDNN);
  if (key.winograd) out.push_back(Core::Winograd);
  return out;
}

const CoreChoice& record_choice(const CoreKey& key, const std::vector<Core>& candidates,
                                const double (&ms)[kCores], const std::string& onednn_error) {
  std::ostringstream why;
  why.precision(3);
  why << "measured: ";
  Core best = candidates.front();
  for (const Core core : candidates) {
    const int c = static_cast<int>(core);
    if (core != candidates.front()) why << ", ";
    if (core == Core::OneDNN && !onednn_error.empty()) {
      why << "onednn failed (" << onednn_error << ")";
      continue;
    }
    why << core_name(core) << " " << ms[c] << " ms";
    if (ms[c] < ms[static_cast<int>(best)]) best = core;
  }
  CoreChoice choice{best, why.str()};
  std::lock_guard<std::mutex> lock(state().mutex);
  return state().choices.emplace(key.values, std::make_pair(key.text(), choice)).first->second.second;
}

const CoreChoice* settled_choice(const CoreKey& key, CoreChoice& fixed) {
  return fixed_choice(key, fixed) ? &fixed : lookup_choice(key);
}

void trace_call(const CoreKey& key, const CoreChoice& choice) {
  if (!state().tracing.load()) return;
  std::lock_guard<std::mutex> lock(state().mutex);
  if (state().tracing) state().trace.push_back({key.text(), core_name(choice.core), choice.reason});
}

std::vector<ChoiceRecord> recorded_choices() {
  std::lock_guard<std::mutex> lock(state().mutex);
  std::vector<ChoiceRecord> out;
  for (const auto& [values, entry] : state().choices) {
    out.push_back({entry.first, core_name(entry.second.core), entry.second.reason});
  }
  return out;
}

void set_trace(bool on) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().tracing = on;
  state().trace.clear();
}

std::vector<ChoiceRecord> take_trace() {
  std::lock_guard<std::mutex> lock(state().mutex);
  return std::move(state().trace);
}

// ---- derived tensors ----------------------------------------------------------------

bool DerivedTensors::cacheable(const std::vector<at::Tensor>& sources) {
  for (const at::Tensor& t : sources) {
    if (t.defined() && t.is_inference()) return false;
  }
  return true;
}

bool DerivedTensors::same_tensors(const Entry& e, const std::vector<at::Tensor>& sources,
                                  bool and_versions) {
  if (e.sources.size() != sources.size()) return false;
  for (size_t i = 0; i < sources.size(); ++i) {
    const Source& s = e.sources[i];
    const at::Tensor& t = sources[i];
    if (!t.defined()) {
      if (s.impl) return false;
      continue;
    }
    // lock() (not a pointer compare): a dead tensor's address may be reused.
    if (!s.impl || s.impl->lock().get() != t.unsafeGetTensorImpl() || s.data != t.const_data_ptr() ||
        (and_versions && s.version != static_cast<uint32_t>(t._version()))) {
      return false;
    }
  }
  return true;
}

std::vector<at::Tensor> DerivedTensors::get(const std::vector<at::Tensor>& sources, double scalar,
                                            const std::function<std::vector<at::Tensor>()>& make,
                                            const std::vector<int64_t>& tag) {
  if (!cacheable(sources)) return make();
  const c10::TensorImpl* key = sources[0].unsafeGetTensorImpl();
  bool make_now = true;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it != entries_.end() && same_tensors(it->second, sources, /*and_versions=*/false)) {
      const Entry& e = it->second;
      if (!same_tensors(e, sources, /*and_versions=*/true)) {
        // changed in place since the previous call (training): a settled_only
        // cache waits for a call that finds them as this one leaves them
        make_now = !settled_only_;
      } else if (e.scalar == scalar && e.tag == tag && !e.derived.empty()) {
        return e.derived;
      }
    }
  }
  std::vector<at::Tensor> derived;
  if (make_now) {
    // (made as normal tensors even under torch.inference_mode, so that what is
    // derived from them in turn can be kept: the packed copy of a folded weight)
    c10::InferenceMode normal_tensors(false);
    derived = make();
  }
  Entry e{{}, scalar, tag, std::move(derived)};
  for (const at::Tensor& t : sources) {
    Source src{std::nullopt, nullptr, 0};
    if (t.defined()) {
      src.impl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
          t.getIntrusivePtr());
      src.data = t.const_data_ptr();
      src.version = static_cast<uint32_t>(t._version());
    }
    e.sources.push_back(std::move(src));
  }
  std::vector<at::Tensor> out = e.derived;
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = entries_.find(key);
  if (it != entries_.end()) {
    it->second = std::move(e);
    return out;
  }
  // Before a new entry, sets whose weight is gone go (a new entry is made once
  // per weight, so this sweep is rare); if all are live and the cache is full,
  // it starts over.
  for (auto it = entries_.begin(); it != entries_.end();) {
    it = it->second.sources[0].impl->expired() ? entries_.erase(it) : std::next(it);
  }
  if (entries_.size() >= kMaxEntries) entries_.clear();
  entries_.emplace(key, std::move(e));
  return out;
}

DerivedTensors& folded_bn_cache() {
  static DerivedTensors cache;
  return cache;
}

DerivedTensors& packed_weight_cache() {
  static DerivedTensors cache(/*settled_only=*/true);
  return cache;
}

// ---- the oneDNN core ------------------------------------------------------------

namespace {

// mkldnn::_convolution_pointwise (conv + bias + unary post-op), its .binary
// overload (conv + bias + binary post-op with `other`, then a unary one) and
// the in-place _convolution_pointwise_.binary (the result written into
// `other`): registered by ATen's oneDNN build, with no C++ header of their own.
using PointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                               c10::List<std::optional<at::Scalar>>,
                               std::optional<c10::string_view>);
using PointwiseBinaryFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t,
                                     c10::string_view, std::optional<at::Scalar>,
                                     std::optional<c10::string_view>,
                                     c10::List<std::optional<at::Scalar>>,
                                     std::optional<c10::string_view>);
using InplaceBinaryFn = at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                                    std::optional<at::Scalar>, std::optional<c10::string_view>,
                                    c10::List<std::optional<at::Scalar>>,
                                    std::optional<c10::string_view>);

// conv(x, w) + b, then the unary post-op `attr` ("none" or "relu"), float32.
at::Tensor op_unary(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                    const ConvArgs& a, c10::string_view attr) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                             .typed<PointwiseFn>();
  return op.call(x, w, b, a.padding, a.stride, a.dilation, a.groups, attr,
                 c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// w in oneDNN's own layout for inputs of x's sizes (see packed_weight_cache).
at::Tensor packed_weight(const at::Tensor& w, const at::Tensor& x, const ConvArgs& a) {
  using ReorderFn = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                               at::IntArrayRef, int64_t, at::OptionalIntArrayRef);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "")
                             .typed<ReorderFn>();
  // A weight remade every call would be packed every call: those run as they
  // are, and so does one that training changes (packed_weight_cache).
  if (DerivedTensors::cacheable({w})) {
    const std::vector<int64_t> tag(x.sizes().begin(), x.sizes().end());
    const std::vector<at::Tensor> packed = packed_weight_cache().get({w}, 0.0, [&] {
      return std::vector<at::Tensor>{op.call(w.contiguous(), a.padding, a.stride, a.dilation,
                                             a.groups, x.sizes())};
    }, tag);
    if (!packed.empty()) return packed[0];
  }
  return w.contiguous(at::MemoryFormat::ChannelsLast);
}

// The float32 operands of a oneDNN call in layout fmt: x contiguous in it, the
// weight packed once for channels_last inputs (packed_weight_cache) and plain
// for NCHW ones.
struct OneDNNOperands {
  at::Tensor x, w;
  std::optional<at::Tensor> b;

  OneDNNOperands(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& bias,
                 const ConvArgs& a, at::MemoryFormat fmt)
      : x(x_.contiguous(fmt)),
        b(bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt) {
    w = fmt == at::MemoryFormat::ChannelsLast ? packed_weight(w_, x, a) : w_.contiguous();
  }
};

// dst = relu?(y + r), elementwise over NCHW-contiguous float32 tensors (dst
// may be y or r).
void sum_relu(const at::Tensor& y, const at::Tensor& r, at::Tensor& dst, bool relu) {
  const float* yp = y.const_data_ptr<float>();
  const float* rp = r.const_data_ptr<float>();
  float* dp = dst.mutable_data_ptr<float>();
  at::parallel_for(0, y.numel(), 16384, [&](int64_t begin, int64_t end) {
    bn_forward_plane(yp + begin, rp + begin, dp + begin, end - begin, 1.0f, 0.0f, relu);
  });
}

}  // namespace

at::Tensor onednn_conv_relu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& residual, bool relu, const ConvArgs& a,
                            at::MemoryFormat fmt) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  if (x.scalar_type() != at::kFloat) {
    // bfloat16: ATen's convolution, then residual and ReLU in float.
    at::Tensor y = aten_conv(x, w, bias, a, fmt).to(at::kFloat);
    if (residual.defined()) y.add_(residual);
    if (relu) y.relu_();
    return y.to(x.scalar_type()).contiguous(fmt);
  }
  const OneDNNOperands o(x, w, bias, a, fmt);
  if (residual.defined() && fmt == at::MemoryFormat::Contiguous) {
    // oneDNN fuses the residual add only in channels_last (for NCHW ATen runs
    // the convolution, then add_ and relu_: two passes); here the primitive
    // adds the bias and one cnnops pass adds the residual and applies ReLU.
    at::Tensor y = op_unary(o.x, o.w, o.b, a, "none").contiguous();
    sum_relu(y, residual.contiguous(), y, relu);
    return y;
  }
  if (residual.defined()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
                               .typed<PointwiseBinaryFn>();
    return op.call(o.x, residual.contiguous(fmt), o.w, o.b, a.padding, a.stride, a.dilation,
                   a.groups, "add", std::nullopt,
                   relu ? std::optional<c10::string_view>("relu") : std::nullopt,
                   c10::List<std::optional<at::Scalar>>(), std::nullopt)
        .contiguous(fmt);
  }
  return op_unary(o.x, o.w, o.b, a, relu ? "relu" : "none").contiguous(fmt);
}

void onednn_conv_relu_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& bias, bool relu, const ConvArgs& a,
                           at::MemoryFormat fmt) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat &&
                        residual.is_contiguous(fmt));
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const OneDNNOperands o(x, w, bias, a, fmt);
  if (fmt == at::MemoryFormat::Contiguous) {
    sum_relu(op_unary(o.x, o.w, o.b, a, "none").contiguous(), residual, residual, relu);
    return;
  }
  // `other` (the residual) accumulates conv + bias, then the unary post-op
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_convolution_pointwise_", "binary")
                             .typed<InplaceBinaryFn>();
  op.call(residual, o.x, o.w, o.b, a.padding, a.stride, a.dilation, a.groups, "add",
          std::nullopt, relu ? std::optional<c10::string_view>("relu") : std::nullopt,
          c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace cpu
}  // namespace cnnops

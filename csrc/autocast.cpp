// Autocast (torch.autocast("cuda") and torch.autocast("cpu")) for the cnnops
// convolutions.
//
// Like aten's convolution, conv2d, conv2d_relu and conv_bn_relu run in the
// autocast dtype: input, weight, conv bias and residual are cast (fp32 ->
// fp16/bf16; float64 tensors are left alone, as autocast does). BatchNorm's
// weight, bias and running statistics stay float32, which the CUDA kernels
// accept next to half activations, as cuDNN's batch norm does.
// Every other op (batch_norm, bn_relu, pooling, add_relu and the backward
// ops) has no autocast kernel, so autocast falls through and they run in the
// dtype of their input.
//
// Each kernel casts, then calls the op again below the autocast key, so the
// casts are recorded by autograd and gradients reach the fp32 parameters.
// On the CPU the autocast dtype is bfloat16 by default, which the CPU
// convolutions run on their oneDNN core (csrc/cpu/conv_core.h); cnnops.functional
// casts the same way in Python, so this matters for calls of torch.ops.cnnops.*
// and for compiled graphs.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

#include "op_handles.h"

namespace cnnops {
namespace {

// The autocast key and the device type of each autocast flavour.
template <c10::DeviceType D>
constexpr c10::DispatchKey autocast_key() {
  return D == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                    : c10::DispatchKey::AutocastCPU;
}

template <c10::DeviceType D>
at::Tensor cast(const at::Tensor& t) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), t, D);
}

template <c10::DeviceType D>
std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), t, D);
}

// The argument names autocast casts: the convolution's tensors. BN's weight,
// bias and running statistics (bn_weight, bn_bias, running_mean, running_var)
// are deliberately not cast.
constexpr const char* kCastArguments[] = {"input", "weight", "bias", "conv_bias", "residual"};

// A bit per argument of op's schema: whether autocast casts it.
uint64_t cast_mask(const c10::OperatorHandle& op) {
  uint64_t mask = 0;
  for (const char* name : kCastArguments) {
    if (op.schema().argumentIndexWithName(name).has_value()) {
      mask |= uint64_t{1} << ops::arg_position(op, name);
    }
  }
  return mask;
}

template <c10::DeviceType D>
at::Tensor maybe_cast(const at::Tensor& t, bool wanted) {
  return wanted ? cast<D>(t) : t;
}
template <c10::DeviceType D>
std::optional<at::Tensor> maybe_cast(const std::optional<at::Tensor>& t, bool wanted) {
  return wanted ? cast<D>(t) : t;
}
template <c10::DeviceType D, typename T>
const T& maybe_cast(const T& value, bool) {
  return value;
}

// The autocast kernel of the op whose handle `op()` returns, with the op's own
// signature: casts the arguments named in kCastArguments, then calls the op
// again below the autocast key.
template <c10::DeviceType D, auto op, typename Handle = std::decay_t<decltype(op())>>
struct Autocast;

template <c10::DeviceType D, auto op, typename Result, typename... Params>
struct Autocast<D, op, c10::TypedOperatorHandle<Result(Params...)>> {
  static Result call(Params... args) { return cast_and_call(std::index_sequence_for<Params...>{}, args...); }

 private:
  template <size_t... i>
  static Result cast_and_call(std::index_sequence<i...>, Params... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
    static const uint64_t mask = cast_mask(op());
    return op().call(maybe_cast<D>(args, (mask >> i) & 1)...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, AutocastCUDA, m) {
  m.impl("conv2d", &Autocast<c10::DeviceType::CUDA, ops::conv2d_op>::call);
  m.impl("conv2d_relu", &Autocast<c10::DeviceType::CUDA, ops::conv2d_relu_op>::call);
  m.impl("conv_bn_relu", &Autocast<c10::DeviceType::CUDA, ops::conv_bn_relu_op>::call);
}

TORCH_LIBRARY_IMPL(cnnops, AutocastCPU, m) {
  m.impl("conv2d", &Autocast<c10::DeviceType::CPU, ops::conv2d_op>::call);
  m.impl("conv2d_relu", &Autocast<c10::DeviceType::CPU, ops::conv2d_relu_op>::call);
  m.impl("conv_bn_relu", &Autocast<c10::DeviceType::CPU, ops::conv_bn_relu_op>::call);
}

}  // namespace cnnops

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
// Each wrapper casts, then calls the op again below the autocast key, so the
// casts are recorded by autograd and gradients reach the fp32 parameters.
// On the CPU the autocast dtype is bfloat16 by default, which the CPU
// convolutions run on their oneDNN core (csrc/cpu/conv_core.h); cnnops.functional
// casts the same way in Python, so this matters for calls of torch.ops.cnnops.*
// and for compiled graphs.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

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

using Conv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t);
using Conv2dReLUFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, at::IntArrayRef,
                                at::IntArrayRef, at::IntArrayRef, int64_t);
using ConvBNReLUFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
    int64_t, bool, double, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

template <c10::DeviceType D>
at::Tensor conv2d_autocast(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
  static const auto op = op_handle<Conv2dFn>("cnnops::conv2d");
  return op.call(cast<D>(input), cast<D>(weight), cast<D>(bias), stride, padding, dilation, groups);
}

template <c10::DeviceType D>
at::Tensor conv2d_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
  static const auto op = op_handle<Conv2dReLUFn>("cnnops::conv2d_relu");
  return op.call(cast<D>(input), cast<D>(weight), cast<D>(bias), cast<D>(residual), stride, padding,
                 dilation, groups);
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_autocast(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool training, double eps, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<D>());
  static const auto op = op_handle<ConvBNReLUFn>("cnnops::conv_bn_relu");
  // BN parameters and statistics are deliberately not cast.
  return op.call(cast<D>(input), cast<D>(weight), cast<D>(conv_bias), bn_weight, bn_bias, running_mean,
                 running_var, cast<D>(residual), stride, padding, dilation, groups, training, eps,
                 relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, AutocastCUDA, m) {
  m.impl("conv2d", &conv2d_autocast<c10::DeviceType::CUDA>);
  m.impl("conv2d_relu", &conv2d_relu_autocast<c10::DeviceType::CUDA>);
  m.impl("conv_bn_relu", &conv_bn_relu_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(cnnops, AutocastCPU, m) {
  m.impl("conv2d", &conv2d_autocast<c10::DeviceType::CPU>);
  m.impl("conv2d_relu", &conv2d_relu_autocast<c10::DeviceType::CPU>);
  m.impl("conv_bn_relu", &conv_bn_relu_autocast<c10::DeviceType::CPU>);
}

}  // namespace cnnops

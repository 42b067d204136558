// Autocast (torch.autocast("cuda")) for the cnnops convolutions.
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
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace cnnops {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

at::ScalarType autocast_dtype() { return at::autocast::get_autocast_dtype(at::kCUDA); }

at::Tensor cast(const at::Tensor& t) {
  return at::autocast::cached_cast(autocast_dtype(), t, kCUDA);
}

std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) {
  return at::autocast::cached_cast(autocast_dtype(), t, kCUDA);
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

at::Tensor conv2d_autocast(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = op_handle<Conv2dFn>("cnnops::conv2d");
  return op.call(cast(input), cast(weight), cast(bias), stride, padding, dilation, groups);
}

at::Tensor conv2d_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = op_handle<Conv2dReLUFn>("cnnops::conv2d_relu");
  return op.call(cast(input), cast(weight), cast(bias), cast(residual), stride, padding,
                 dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_autocast(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool training, double eps, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = op_handle<ConvBNReLUFn>("cnnops::conv_bn_relu");
  // BN parameters and statistics are deliberately not cast.
  return op.call(cast(input), cast(weight), cast(conv_bias), bn_weight, bn_bias, running_mean,
                 running_var, cast(residual), stride, padding, dilation, groups, training, eps,
                 relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, AutocastCUDA, m) {
  m.impl("conv2d", &conv2d_autocast);
  m.impl("conv2d_relu", &conv2d_relu_autocast);
  m.impl("conv_bn_relu", &conv_bn_relu_autocast);
}

}  // namespace cnnops

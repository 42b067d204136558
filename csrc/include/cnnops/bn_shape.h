// BatchNorm arguments, checked once, shared by the CPU and CUDA kernels of
// batch_norm, bn_relu, conv_bn_relu and their backward ops. Each check takes
// the device's own tensor check where it checks the input
// (check_cpu_float, gpu::check_cuda_float); the device files only convert
// what these return to the layouts their kernels read.
#pragma once

#include "cnnops/conv_shape.h"

namespace cnnops {

// The per-channel BN arguments of a forward op: [C] on input's device, in
// input's dtype or (float16/bfloat16 input) float32; returned contiguous in
// the accumulation dtype (bn_channel_param), undefined when absent.
struct BNParams {
  at::Tensor running_mean, running_var, weight, bias;
};

// What a BN forward checks after its input: the four per-channel tensors (in
// the order weight, bias, running_mean, running_var), that inference has
// running statistics, and eps. `op` names the op in the inference message;
// conv_bn_relu calls its affine parameters bn_weight / bn_bias.
inline BNParams check_bn_params(const char* op, const at::Tensor& input, int64_t channels,
                                const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var,
                                const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, bool training, double eps,
                                const char* weight_name = "weight",
                                const char* bias_name = "bias") {
  BNParams p;
  p.weight = bn_channel_param(weight, input, channels, weight_name);
  p.bias = bn_channel_param(bias, input, channels, bias_name);
  p.running_mean = bn_channel_param(running_mean, input, channels, "running_mean");
  p.running_var = bn_channel_param(running_var, input, channels, "running_var");
  TORCH_CHECK_VALUE(training || (p.running_mean.defined() && p.running_var.defined()), op,
                    " in inference mode (training=False) needs running_mean and running_var");
  TORCH_CHECK_VALUE(eps >= 0, "expected eps >= 0, got ", eps);
  return p;
}

// bn_relu's residual: input's dtype, device and shape; undefined when absent.
inline at::Tensor check_bn_residual(const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& input) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  check_same(*residual, input, "residual", "input");
  TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), "expected residual of shape ",
                    input.sizes(), " (the shape of input), got ", residual->sizes());
  return *residual;
}

// The per-channel tensors of a BN backward op: weight (optional) and the
// forward's save_mean / save_invstd (required), as bn_channel_param returns them.
struct BNSaved {
  at::Tensor weight, mean, invstd;
};

inline BNSaved check_bn_saved(const at::Tensor& input, int64_t channels,
                              const c10::optional<at::Tensor>& weight,
                              const at::Tensor& save_mean, const at::Tensor& save_invstd,
                              const char* weight_name = "weight") {
  BNSaved s{bn_channel_param(weight, input, channels, weight_name),
            bn_channel_param(save_mean, input, channels, "save_mean"),
            bn_channel_param(save_invstd, input, channels, "save_invstd")};
  TORCH_CHECK_VALUE(s.mean.defined() && s.invstd.defined(),
                    "save_mean and save_invstd are required");
  return s;
}

// The activations of batch_norm_backward, bn_relu_backward and
// bn_relu_backward_elemt: a 4-D input the device's kernels take, grad_output
// of its shape, and (with relu) the forward output, of its shape too: the
// ReLU mask. Returns the output, undefined without relu.
inline at::Tensor check_bn_backward(const char* op, const at::Tensor& grad_output,
                                    const c10::optional<at::Tensor>& output,
                                    const at::Tensor& input, bool relu,
                                    DeviceCheck check_device) {
  check_4d(input, "input");
  check_device(input, "input");
  check_shape(grad_output, input.sizes(), "grad_output", input, "input");
  if (!relu) return at::Tensor();
  TORCH_CHECK_VALUE(output.has_value() && output->defined(), op,
                    " with relu=True needs the forward output");
  check_shape(*output, input.sizes(), "output", input, "input");
  return *output;
}

// conv_bn_relu_backward's activations, of the conv output's shape (s) and
// input's dtype and device: grad_output, output, and in training conv_output.
// Returns its conv bias (optional_channel: input's dtype), undefined when absent.
inline at::Tensor check_conv_bn_relu_backward(const at::Tensor& grad_output,
                                              const at::Tensor& output, const at::Tensor& input,
                                              const c10::optional<at::Tensor>& conv_bias,
                                              const at::Tensor& conv_output, const ConvShape& s,
                                              bool training) {
  const int64_t shape[] = {s.N, s.OC, s.OH, s.OW};
  check_shape(grad_output, shape, "grad_output", input, "input");
  check_shape(output, shape, "output", input, "input");
  if (training) check_shape(conv_output, shape, "conv_output", input, "input");
  return optional_channel(conv_bias, input, s.OC, "conv_bias");
}

}  // namespace cnnops

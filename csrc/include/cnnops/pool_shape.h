// Pooling arguments, checked once, shared by the CPU and CUDA kernels (the
// rules and messages of aten's pool2d_shape_check). Each check takes the
// device's own tensor check (check_cpu_float, gpu::check_cuda_float).
#pragma once

#include <optional>
#include <string>

#include "cnnops/common.h"

namespace cnnops {

struct PoolShape {
  int64_t N, C, H, W, OH, OW;
};

// What max_pool2d and avg_pool2d (and their backward ops) check, as aten's
// pool2d_shape_check does. `dilation` is empty for avg_pool2d.
inline PoolShape check_pool2d(const char* op, const at::Tensor& input, DeviceCheck check_device,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_4d(input, "input");
  check_device(input, "input");
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  const bool dilated = !dilation.empty();
  if (dilated) check_pair(dilation, "dilation", 1);
  // aten bounds the padding by half the kernel size, not the dilated extent,
  // for max_pool2d too.
  TORCH_CHECK_VALUE(
      padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
      ": expected padding to be at most half of kernel_size, i.e. <= [", kernel_size[0] / 2,
      ", ", kernel_size[1] / 2, "] for kernel_size ", kernel_size, ", got padding ", padding);
  // Only the batch may be empty, as in PyTorch.
  TORCH_CHECK_VALUE(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
                    ": expected input with non-zero C, H and W (only the batch dimension may "
                    "be 0), got shape ",
                    input.sizes());
  PoolShape s{input.size(0), input.size(1), input.size(2), input.size(3), 0, 0};
  const int64_t dH = dilated ? dilation[0] : 1;
  const int64_t dW = dilated ? dilation[1] : 1;
  s.OH = pool_output_size(s.H, kernel_size[0], padding[0], stride[0], dH, ceil_mode);
  s.OW = pool_output_size(s.W, kernel_size[1], padding[1], stride[1], dW, ceil_mode);
  TORCH_CHECK_VALUE(s.OH >= 1 && s.OW >= 1, op, ": input of spatial size ", s.H, "x", s.W,
                    " gives an output of size ", s.OH, "x", s.OW, " with kernel_size ",
                    kernel_size, ", stride ", stride, ", padding ", padding,
                    (dilated ? c10::str(", dilation ", dilation) : std::string()),
                    ", ceil_mode=", (ceil_mode ? "True" : "False"),
                    "; the output must be at least 1x1");
  return s;
}

inline void check_divisor_override(const char* op, std::optional<int64_t> divisor_override) {
  TORCH_CHECK_VALUE(!divisor_override.has_value() || *divisor_override != 0, op,
                    ": expected divisor_override to be non-zero or None, got 0");
}

// grad_output of a pooling op: 4-D, the input's dtype, and the input's N and C.
inline void check_pool_grad_output(const char* op, const at::Tensor& grad_output,
                                   const at::Tensor& input) {
  check_4d(grad_output, "grad_output");
  check_same(grad_output, input, "grad_output", "input");
  TORCH_CHECK_VALUE(
      grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1), op,
      ": expected grad_output to have the batch and channel sizes of input [", input.size(0),
      ", ", input.size(1), ", *, *], got shape ", grad_output.sizes());
}

// What max_pool2d_backward checks: the geometry, the input, grad_output, and
// indices (int64, input's device, grad_output's shape: the forward's).
inline void check_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& indices, DeviceCheck check_device,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  check_4d(input, "input");
  check_device(input, "input");
  check_pool_grad_output("max_pool2d_backward", grad_output, input);
  TORCH_CHECK_TYPE(indices.defined() && indices.scalar_type() == at::kLong,
                   "max_pool2d_backward: expected indices of dtype int64, got ",
                   indices.defined() ? c10::toString(indices.scalar_type()) : "None");
  TORCH_CHECK_VALUE(indices.device() == input.device(),
                    "max_pool2d_backward: expected indices on the device of input (",
                    input.device(), "), got ", indices.device());
  TORCH_CHECK_VALUE(indices.sizes() == grad_output.sizes(),
                    "max_pool2d_backward: expected indices of the shape of grad_output ",
                    grad_output.sizes(), ", got ", indices.sizes());
}

// The input of adaptive_avg_pool2d (and its backward): H and W non-zero.
inline void check_adaptive_input(const char* op, const at::Tensor& input,
                                 DeviceCheck check_device) {
  check_4d(input, "input");
  check_device(input, "input");
  TORCH_CHECK_VALUE(input.size(2) > 0 && input.size(3) > 0, op,
                    ": expected input with non-zero H and W, got shape ", input.sizes());
}

}  // namespace cnnops

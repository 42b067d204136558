// CPU kernels for add_relu = relu(input + other), the residual-join of ResNet
// blocks, and its backward.
//
// Both operands are brought to the output's memory format, where they are
// dense, so the kernels are flat loops over memory in any layout. Broadcasting
// happens in Python (cnnops.functional.add_relu), which also reduces the
// gradient for a broadcast operand.

#include "cnnops/common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

namespace cnnops {
namespace {

// float32 and float64, and bfloat16 (the ReLU after a bfloat16 convolution, whose
// backward is add_relu_backward): a sum rounded once, and a select, are exact
// in any of them.
void check_cpu_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) {
    check_cpu_conv(t, name);
  } else {
    check_cpu_float(t, name);
  }
}

}  // namespace

at::Tensor add_relu_cpu(const at::Tensor& input, const at::Tensor& other) {
  check_cpu_dtype(input, "input");
  check_cpu_dtype(other, "other");
  check_same(other, input, "other", "input");
  check_same_shape("add_relu", other, input, "other", "input");
  const auto fmt = output_memory_format(input);
  const at::Tensor a = input.contiguous(fmt);
  const at::Tensor b = other.contiguous(fmt);
  at::Tensor output = at::empty(a.sizes(), a.options().memory_format(fmt));
  const int64_t n = output.numel();
  if (n == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "cnnops_add_relu_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t s = pa[i] + pb[i];
        // '<' rather than '<=' keeps NaN (and -0.0) as torch.relu does.
        out[i] = s < scalar_t(0) ? scalar_t(0) : s;
      }
    });
  });
  return output;
}

// output is the add_relu result; the gradient of both operands is
// grad_output where output > 0.
at::Tensor add_relu_backward_cpu(const at::Tensor& grad_output,
                                 const at::Tensor& output) {
  check_cpu_dtype(grad_output, "grad_output");
  check_cpu_dtype(output, "output");
  check_same(output, grad_output, "output", "grad_output");
  check_same_shape("add_relu_backward", grad_output, output, "grad_output", "output");
  const auto fmt = output_memory_format(output);
  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor y = output.contiguous(fmt);
  at::Tensor grad_input = at::empty(y.sizes(), y.options().memory_format(fmt));
  const int64_t n = grad_input.numel();
  if (n == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "cnnops_add_relu_backward_cpu",
                                 [&] {
    const scalar_t* __restrict__ pg = g.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ py = y.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ out = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Both values are loaded unconditionally so that this is a vector
        // select, not a branch (a branch on the sign of activations is
        // mispredicted half the time: 20x slower).
        // aten's threshold_backward: a NaN output passes its gradient.
        const scalar_t grad = pg[i];
        out[i] = py[i] <= scalar_t(0) ? scalar_t(0) : grad;
      }
    });
  });
  return grad_input;
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_backward", &add_relu_backward_cpu);
}

}  // namespace cnnops

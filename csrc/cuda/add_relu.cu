// add_relu = relu(input + other), the residual join of ResNet blocks, and its
// backward, on the GPU.
//
// Both operands are read in the output's memory format, where they are dense
// (an NCHW or channels_last tensor is used as is; a broadcast, sliced or
// otherwise strided operand is made dense first), so the kernels are flat
// loops over memory. When all pointers are 16-byte aligned they move 16 bytes
// per load and store (4 floats, 8 halves, 2 doubles). Broadcasting and type
// promotion happen in Python (cnnops.functional.add_relu).
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace cnnops {
namespace gpu {
namespace {

template <typename scalar_t>
struct AddReLU {
  __device__ __forceinline__ scalar_t operator()(scalar_t a, scalar_t b) const {
    using acc_t = acc_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(a) + static_cast<acc_t>(b);
    // '<' rather than '<=' keeps NaN (and -0.0), as the CPU kernel does.
    return static_cast<scalar_t>(s < acc_t(0) ? acc_t(0) : s);
  }
};

// (grad_output, output) -> grad: aten's threshold_backward, a NaN output
// passes its gradient.
template <typename scalar_t>
struct ReLUBackward {
  __device__ __forceinline__ scalar_t operator()(scalar_t g, scalar_t y) const {
    using acc_t = acc_type<scalar_t>;
    return static_cast<acc_t>(y) <= acc_t(0) ? scalar_t(0) : g;
  }
};

// out[i] = op(a[i], b[i]) for i < n; vectorised over V-element chunks, the
// tail (n % V elements) done element-wise.
template <typename scalar_t, bool VEC, typename Op>
__global__ void binary_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                              scalar_t* __restrict__ out, int64_t n, Op op) {
  constexpr int V = VEC ? kVec<scalar_t> : 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunks = n / V;
  if constexpr (VEC) {
    for (int64_t i = first; i < chunks; i += stride) {
      const Vec16<scalar_t> x = load16(a + i * V), y = load16(b + i * V);
      Vec16<scalar_t> r;
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = op(x.v[k], y.v[k]);
      store16(out + i * V, r);
    }
  }
  for (int64_t i = (VEC ? chunks * V : 0) + first; i < n; i += stride) out[i] = op(a[i], b[i]);
}

template <typename scalar_t, typename Op>
void launch_binary(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, Op op) {
  const int64_t n = out.numel();
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (aligned16({pa, pb, po})) {
    binary_kernel<scalar_t, true, Op>
        <<<grid_for(ceil_div(n, kVec<scalar_t>), kThreads), kThreads, 0, stream>>>(pa, pb, po, n,
                                                                                   op);
  } else {
    binary_kernel<scalar_t, false, Op><<<grid_for(n, kThreads), kThreads, 0, stream>>>(pa, pb, po,
                                                                                       n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gpu

at::Tensor add_relu_cuda(const at::Tensor& input, const at::Tensor& other) {
  gpu::check_cuda_float(input, "input");
  gpu::check_cuda_float(other, "other");
  check_same(other, input, "other", "input");
  check_same_shape("add_relu", other, input, "other", "input");
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor a = input.contiguous(fmt), b = other.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_add_relu_cuda", [&] {
    gpu::launch_binary<scalar_t>(a, b, out, gpu::AddReLU<scalar_t>());
  });
  return out;
}

// output is the add_relu result; the gradient of both operands is grad_output
// where output > 0.
at::Tensor add_relu_backward_cuda(const at::Tensor& grad_output, const at::Tensor& output) {
  gpu::check_cuda_float(grad_output, "grad_output");
  gpu::check_cuda_float(output, "output");
  check_same(output, grad_output, "output", "grad_output");
  check_same_shape("add_relu_backward", grad_output, output, "grad_output", "output");
  c10::cuda::CUDAGuard guard(output.device());
  const auto fmt = output_memory_format(output);
  at::Tensor grad_input = at::empty(output.sizes(), output.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor g = grad_output.contiguous(fmt), y = output.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "cnnops_add_relu_backward_cuda", [&] {
    gpu::launch_binary<scalar_t>(g, y, grad_input, gpu::ReLUBackward<scalar_t>());
  });
  return grad_input;
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_backward", &add_relu_backward_cuda);
}

}  // namespace cnnops

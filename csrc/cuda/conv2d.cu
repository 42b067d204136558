// conv2d and conv2d_relu on the GPU: cuDNN's convolution (conv_cudnn.cuh);
// conv2d_relu as one fused cuDNN conv + bias (+ residual) + ReLU call where
// cuDNN takes it, else the convolution and one epilogue pass.
//
// Layouts: a channels_last input or weight gives a channels_last output,
// anything else (contiguous, sliced, strided) an NCHW-contiguous one
// (cnnops::conv_memory_format); the input gradient follows the same rule.
#include <torch/library.h>

#include "conv_cudnn.cuh"

namespace cnnops {
namespace {

// The checked geometry of a conv call; `bias` is checked when given.
ConvShape checked_conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  const ConvShape s = conv_shape(input, weight, bias, stride, padding, dilation, groups);
  gpu::check_cuda_float(input, "input");
  return s;
}

}  // namespace

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias_opt, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  checked_conv(input, weight, bias, stride, padding, dilation, groups);
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  return aten_conv(input, weight, bias, {stride, padding, dilation, groups},
                   conv_memory_format(input, weight));
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias_opt,
                            const c10::optional<at::Tensor>& residual_opt, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  const ConvShape s = checked_conv(input, weight, bias, stride, padding, dilation, groups);
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto fmt = conv_memory_format(input, weight);
  const at::Tensor residual = conv_residual(residual_opt, input, s, fmt);
  const at::Tensor shift =
      bias.defined() ? bias.to(gpu::acc_dtype(input.scalar_type())) : at::Tensor();
  return gpu::conv_bias_relu(input, weight, bias, shift, residual, /*relu=*/true,
                             {stride, padding, dilation, groups}, fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const ConvShape s = checked_conv(input, weight, at::Tensor(), stride, padding, dilation, groups);
  const int64_t out_shape[] = {s.N, s.OC, s.OH, s.OW};
  check_shape(grad_output, out_shape, "grad_output", input, "input");
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto fmt = conv_memory_format(input, weight);
  auto [gi, gw, unused] = aten_conv_backward(grad_output, input, weight,
                                             {stride, padding, dilation, groups}, fmt,
                                             {output_mask[0], output_mask[1], false});
  // The bias gradient: summed in float, in the input's dtype, as aten's conv.
  at::Tensor gb = output_mask[2] ? grad_output.sum({0, 2, 3}, false,
                                                  gpu::acc_dtype(input.scalar_type()))
                                       .to(input.scalar_type())
                                 : at::Tensor();
  return {gi.defined() ? gi : not_requested(input), gw.defined() ? gw : not_requested(input),
          gb.defined() ? gb : not_requested(input)};
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward", &conv2d_backward_cuda);
  m.impl("conv2d_relu", &conv2d_relu_cuda);
}

}  // namespace cnnops

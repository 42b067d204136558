// ATen's convolution, forward and backward, as the CPU oneDNN core
// (csrc/cpu/conv_core.h) and the CUDA backend (csrc/cuda/conv_cudnn.cuh) call
// it: at::convolution picks oneDNN on the CPU and cuDNN on a GPU, and honours
// torch.backends (mkldnn; cudnn benchmark, deterministic, allow_tf32) as eager
// PyTorch does.
//
// Layouts: results come back in fmt (cnnops::conv_memory_format of the input
// and the weight), the weight gradient in the weight's (weight_grad_memory_format). ATen picks its own layout from the
// input's and the weight's (channels_last if either is), so the weight is
// brought to fmt first: a copy only when a model mixes layouts.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "cnnops/common.h"

namespace cnnops {

// The geometry of a conv call, as ATen's convolution takes it.
struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

// conv(x, w) + bias (bias of x's dtype, or undefined), in layout fmt.
inline at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const ConvArgs& a, at::MemoryFormat fmt) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // an implementation detail of an op
  const int64_t no_output_padding[] = {0, 0};
  return at::convolution(x, w.contiguous(fmt),
                         bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                         a.stride, a.padding, a.dilation, /*transposed=*/false,
                         no_output_padding, a.groups)
      .contiguous(fmt);
}

// (grad_input, grad_weight, grad_bias) of conv(x, w) + bias for the output
// gradient dy, as mask asks; undefined where not wanted.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> aten_conv_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const ConvArgs& a,
    at::MemoryFormat fmt, std::array<bool, 3> mask) {
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t no_output_padding[] = {0, 0};
  const int64_t bias_sizes[] = {w.size(0)};
  auto [gi, gw, gb] = at::convolution_backward(
      dy, x, w.contiguous(fmt), mask[2] ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
      a.stride, a.padding, a.dilation, /*transposed=*/false, no_output_padding, a.groups, mask);
  return {mask[0] ? gi.contiguous(fmt) : at::Tensor(), mask[1] ? gw.contiguous(weight_grad_memory_format(w)) : at::Tensor(),
          mask[2] ? gb : at::Tensor()};
}

}  // namespace cnnops

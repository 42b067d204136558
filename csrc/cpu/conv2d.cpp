// conv2d and conv2d_relu on the CPU, on the core conv_core.h chooses: im2col +
// GEMM forward and col2im + GEMM backward (bias, residual and ReLU in the GEMM
// epilogue), oneDNN (bias, residual and ReLU as post-ops of one primitive), or
// for 3x3 stride-1 calls Winograd (bias, residual and ReLU in its output
// transform; in the backward the input gradient, oneDNN the others).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "bn_kernels.h"
#include "cnnops/conv_shape.h"
#include "conv_core.h"
#include "conv_kernels.h"

namespace cnnops {
namespace {

at::Tensor conv2d_im2col(const ConvShape& s, const at::Tensor& input, const at::Tensor& weight,
                         const at::Tensor& bias) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor out = at::empty({s.N, s.OC, s.OH, s.OW}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_cpu", [&] {
    using T = scalar_t;
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    const int64_t L = s.L();
    cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y, int64_t ld) {
      cpu::copy_channel_bias(y, ld, op + n * s.OC * L + la, L, bp, s.OC, lb - la);
    });
  });
  return out.contiguous(conv_memory_format(input, weight));
}

at::Tensor conv2d_relu_im2col(const ConvShape& s, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& residual) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor out = at::empty({s.N, s.OC, s.OH, s.OW}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_cpu", [&] {
    using T = scalar_t;
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    const int64_t L = s.L();
    // Bias, residual and ReLU in one pass over each hot GEMM output tile.
    cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y, int64_t ld) {
      for (int64_t c = 0; c < s.OC; ++c) {
        const int64_t off = (n * s.OC + c) * L + la;
        cpu::bn_forward_plane(y + c * ld, rp ? rp + off : nullptr, op + off, lb - la, T(1),
                              bp ? bp[c] : T(0), /*relu=*/true);
      }
    });
  });
  return out.contiguous(conv_memory_format(input, weight));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_im2col(
    const ConvShape& s, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, std::array<bool, 3> output_mask) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor g = grad_output.contiguous();
  at::Tensor gi = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gw = output_mask[1] ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gb = output_mask[2] ? at::empty({s.OC}, input.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_backward_cpu", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const int64_t L = s.L();
    auto grad_of = [&](int64_t n, int64_t la, int64_t lb, T* dst, int64_t ld) {
      for (int64_t c = 0; c < s.OC; ++c) {
        const T* src = gp + (n * s.OC + c) * L + la;
        std::copy(src, src + (lb - la), dst + c * ld);
      }
    };
    cpu::conv_backward<T>(s, x, w, grad_of, gi, gw, gb);
  });
  return {gi.defined() ? gi.contiguous(conv_memory_format(input, weight)) : not_requested(input),
          gw.defined() ? gw.contiguous(weight_grad_memory_format(weight)) : not_requested(input),
          gb.defined() ? gb : not_requested(input)};
}

}  // namespace

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias_opt, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  const ConvShape s = conv_shape(input, weight, bias, stride, padding, dilation, groups);
  check_cpu_conv(input, "input");
  const ConvArgs args{stride, padding, dilation, groups};
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  const cpu::CoreKey key("conv2d", s, input, fmt, {{"bias", bias.defined()}},
                         /*winograd=*/true);
  return cpu::with_core(key, [&](cpu::Core core) {
    if (core == cpu::Core::Winograd) {
      return cpu::winograd_conv_relu(s, input, weight, bias, at::Tensor(), /*relu=*/false, fmt);
    }
    if (core == cpu::Core::OneDNN) {
      // channels_last float32: the primitive with a packed weight (conv_core.h)
      if (fmt == at::MemoryFormat::ChannelsLast && input.scalar_type() == at::kFloat) {
        return cpu::onednn_conv_relu(input, weight, bias, at::Tensor(), /*relu=*/false, args,
                                     fmt);
      }
      return aten_conv(input, weight, bias, args, fmt);
    }
    return conv2d_im2col(s, input, weight, bias);
  });
}

at::Tensor conv2d_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias_opt,
                           const c10::optional<at::Tensor>& residual_opt, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  const ConvShape s = conv_shape(input, weight, bias, stride, padding, dilation, groups);
  check_cpu_conv(input, "input");
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  const at::Tensor residual = conv_residual(residual_opt, input, s, fmt);
  const ConvArgs args{stride, padding, dilation, groups};
  const cpu::CoreKey key("conv2d_relu", s, input, fmt,
                         {{"bias", bias.defined()}, {"residual", residual.defined()}},
                         /*winograd=*/true);
  return cpu::with_core(key, [&](cpu::Core core) {
    if (core == cpu::Core::Winograd) {
      return cpu::winograd_conv_relu(s, input, weight, bias, residual, /*relu=*/true, fmt);
    }
    if (core == cpu::Core::OneDNN) {
      return cpu::onednn_conv_relu(input, weight, bias, residual, /*relu=*/true, args, fmt);
    }
    return conv2d_relu_im2col(s, input, weight, bias,
                              residual.defined() ? residual.contiguous() : residual);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  check_cpu_conv(input, "input");
  check_same(grad_output, input, "grad_output", "input");
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == s.N &&
                        grad_output.size(1) == s.OC && grad_output.size(2) == s.OH &&
                        grad_output.size(3) == s.OW,
                    "expected grad_output of shape [", s.N, ", ", s.OC, ", ", s.OH, ", ", s.OW,
                    "], got ", grad_output.sizes());
  const ConvArgs args{stride, padding, dilation, groups};
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  const cpu::CoreKey key("conv2d_backward", s, input, fmt,
                         {{"grad_input", output_mask[0]}, {"grad_weight", output_mask[1]},
                          {"grad_bias", output_mask[2]}},
                         /*winograd=*/output_mask[0] && cpu::winograd_runs_input_grad(s));
  return cpu::with_core(key, [&](cpu::Core core) {
    if (core != cpu::Core::Im2col) {
      auto [gi, gw, gb] =
          core == cpu::Core::Winograd
              ? cpu::winograd_conv_backward(s, grad_output, input, weight, args, fmt, output_mask)
              : aten_conv_backward(grad_output, input, weight, args, fmt, output_mask);
      return std::make_tuple(gi.defined() ? gi : not_requested(input),
                             gw.defined() ? gw : not_requested(input),
                             gb.defined() ? gb : not_requested(input));
    }
    return conv2d_backward_im2col(s, grad_output, input, weight, output_mask);
  });
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
  m.impl("conv2d_relu", &conv2d_relu_cpu);
}

}  // namespace cnnops

// conv2d on the GPU: im2col + cuBLAS GEMM forward with a fused bias /
// residual / ReLU epilogue, col2im + GEMM backward (conv_kernels.cuh).
//
// Layouts: an NCHW (or arbitrarily strided) input is read through its strides
// by im2col and gives an NCHW-contiguous output; a channels_last input takes
// the NHWC path and gives a channels_last output (cnnops::output_memory_format).
#include <torch/library.h>

#include "conv_kernels.cuh"

namespace cnnops {
namespace {

at::Tensor conv_forward_entry(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias_opt,
                              const c10::optional<at::Tensor>& residual_opt,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, bool relu) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  const ConvShape s = conv_shape(input, weight, bias, stride, padding, dilation, groups);
  gpu::check_cuda_float(input, "input");
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto fmt = output_memory_format(input);
  const at::Tensor residual = gpu::conv_residual_cuda(residual_opt, input, s, fmt);
  at::Tensor out = at::empty({s.N, s.OC, s.OH, s.OW}, input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor shift =
      bias.defined() ? bias.to(gpu::acc_dtype(input.scalar_type())).contiguous() : at::Tensor();
  gpu::conv_forward_fused(s, input, weight.contiguous(), gpu::uses_nhwc(input), out,
                          at::Tensor(), at::Tensor(), shift, residual, relu);
  return out;
}

}  // namespace

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_forward_entry(input, weight, bias, c10::nullopt, stride, padding, dilation, groups,
                            /*relu=*/false);
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_forward_entry(input, weight, bias, residual, stride, padding, dilation, groups,
                            /*relu=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  gpu::check_cuda_float(input, "input");
  const int64_t out_shape[] = {s.N, s.OC, s.OH, s.OW};
  gpu::check_shape(grad_output, out_shape, "grad_output", input, "input");
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto fmt = output_memory_format(input);
  const bool nhwc = gpu::uses_nhwc(input);
  at::Tensor gi = output_mask[0] ? at::empty(input.sizes(), input.options().memory_format(fmt))
                                 : at::Tensor();
  at::Tensor gw = output_mask[1] ? at::empty(weight.sizes(), weight.options()) : at::Tensor();
  at::Tensor gb = output_mask[2] ? at::empty({s.OC}, input.options()) : at::Tensor();
  const int64_t L = s.L();

  if (s.N == 0) {
    if (gw.defined()) gw.zero_();
    if (gb.defined()) gb.zero_();
  } else {
    // The NHWC path and the bias gradient read grad_output in the output
    // layout (a copy only when it arrives in another one).
    const at::Tensor g = (nhwc || gb.defined()) ? grad_output.contiguous(fmt) : grad_output;
    if (gb.defined()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "conv2d_bias_grad", [&] {
        gpu::channel_sum<scalar_t>(g.const_data_ptr<scalar_t>(),
                                   nhwc ? gpu::rows_view(s.N, s.OC, L)
                                        : gpu::nchw_view(s.N, s.OC, L),
                                   gb);
      });
    }
    if (gi.defined() || gw.defined()) {
      const at::Tensor w = weight.contiguous();
      if (nhwc) {
        gpu::conv_backward_from_buffer(s, input, w, gpu::as_rows(g), /*nhwc=*/true, gi, gw);
      } else {
        // Each chunk's gradient, channel-major [OC, Bc*L], copied from any strides.
        gpu::conv_backward_nchw(
            s, input, w,
            [&](int64_t nb, int64_t Bc) {
              at::Tensor buf = at::empty({s.OC, Bc * L}, input.options());
              buf.view({s.OC, Bc, s.OH, s.OW}).copy_(g.narrow(0, nb, Bc).transpose(0, 1));
              return buf;
            },
            gi, gw);
      }
    }
  }
  return {gi.defined() ? gi : not_requested(input), gw.defined() ? gw : not_requested(input),
          gb.defined() ? gb : not_requested(input)};
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward", &conv2d_backward_cuda);
  m.impl("conv2d_relu", &conv2d_relu_cuda);
}

}  // namespace cnnops

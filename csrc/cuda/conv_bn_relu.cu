// conv -> BatchNorm -> (+ residual) -> ReLU in one op on the GPU: cuDNN's
// convolution (conv_cudnn.cuh) with cnnops' BN kernels (bn_kernels.cuh) around it.
//
// Inference: BN folded into the weight and bias (one small kernel), then one
// fused cuDNN conv + bias (+ residual) + ReLU call, or cuDNN's convolution and
// one epilogue pass where cuDNN does not fuse (no ReLU, float64, a refused
// configuration).
// Training: cuDNN's convolution (+ conv bias) writes conv_output, the
// pre-normalisation activations the backward reads; one reduction gives the
// batch statistics (Welford / Chan, deterministic) and one elementwise pass
// normalises, adds the residual and applies the ReLU.
// Backward: one reduction (sum of gy and of gy * (conv_output - mean), gy the
// ReLU-masked gradient) and one elementwise pass producing the conv output's
// gradient and grad_residual; then cuDNN's dgrad and wgrad.
//
// Every activation (output, conv_output, gradients) is dense in the layout of
// cnnops::conv_memory_format(input, weight): NHWC when the input or the
// weight is channels_last, NCHW otherwise.
#include <torch/library.h>

#include "cnnops/bn_shape.h"
#include "conv_cudnn.cuh"

namespace cnnops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_cuda(
    const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& conv_bias_opt,
    const c10::optional<at::Tensor>& bn_weight_opt,
    const c10::optional<at::Tensor>& bn_bias_opt,
    const c10::optional<at::Tensor>& running_mean_opt,
    const c10::optional<at::Tensor>& running_var_opt,
    const c10::optional<at::Tensor>& residual_opt, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    double eps, bool relu) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  gpu::check_cuda_float(input, "input");
  const int64_t OC = s.OC, L = s.L();
  const at::Tensor cbias = optional_channel(conv_bias_opt, input, OC, "conv_bias");
  const BNParams bn =
      check_bn_params("conv_bn_relu", input, OC, running_mean_opt, running_var_opt,
                      bn_weight_opt, bn_bias_opt, training, eps, "bn_weight", "bn_bias");
  const at::Tensor &bnw = bn.weight, &bnb = bn.bias, &rmean = bn.running_mean,
                   &rvar = bn.running_var;
  const auto fmt = conv_memory_format(input, weight);
  const at::Tensor residual = conv_residual(residual_opt, input, s, fmt);
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const ConvArgs args{stride, padding, dilation, groups};
  const auto opts = input.options();

  if (!training) {
    const at::Tensor acc_cbias =
        cbias.defined() ? cbias.to(gpu::acc_dtype(input.scalar_type())) : cbias;
    const gpu::FoldedBN f = gpu::fold_bn(weight, fmt, rmean, rvar, bnw, bnb, acc_cbias, eps);
    at::Tensor out = gpu::conv_bias_relu(input, f.weight, f.bias, f.shift, residual, relu, args,
                                         fmt);
    return {out, at::empty({0}, opts), f.save_mean, f.save_invstd};
  }

  // Training: the convolution adds the conv bias, in the input's dtype.
  const at::Tensor conv_out = aten_conv(input, weight, cbias, args, fmt);
  at::Tensor out = at::empty({s.N, OC, s.OH, s.OW}, opts.memory_format(fmt));
  const gpu::ActView v = fmt == at::MemoryFormat::ChannelsLast ? gpu::rows_view(s.N, OC, L)
                                                               : gpu::nchw_view(s.N, OC, L);
  const auto acc_opts = opts.dtype(gpu::acc_dtype(input.scalar_type()));
  gpu::BNConstants k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_conv_bn_relu_cuda", [&] {
    using acc_t = gpu::acc_type<scalar_t>;
    const scalar_t* src = conv_out.const_data_ptr<scalar_t>();
    const gpu::Partials p = gpu::batch_moments<scalar_t>(src, v, opts);
    k = gpu::bn_constants<acc_t>(OC, p, at::Tensor(), at::Tensor(), bnw, bnb, at::Tensor(), eps,
                                 acc_opts);
    gpu::launch_apply<scalar_t>(src, v, gpu::ptr_or_null<scalar_t>(residual), v,
                                out.mutable_data_ptr<scalar_t>(), v,
                                k.center.const_data_ptr<acc_t>(), k.scale.const_data_ptr<acc_t>(),
                                k.shift.const_data_ptr<acc_t>(), relu);
  });
  return {out, conv_out, k.save_mean, k.save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_backward_cuda(const at::Tensor& grad_output, const at::Tensor& output,
                           const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& conv_bias_opt,
                           const at::Tensor& conv_output,
                           const c10::optional<at::Tensor>& bn_weight_opt,
                           const at::Tensor& save_mean, const at::Tensor& save_invstd,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool training, bool relu,
                           std::array<bool, 6> output_mask) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  gpu::check_cuda_float(input, "input");
  const int64_t OC = s.OC, L = s.L();
  const at::Tensor cbias = check_conv_bn_relu_backward(grad_output, output, input, conv_bias_opt,
                                                       conv_output, s, training);
  const BNSaved saved =
      check_bn_saved(input, OC, bn_weight_opt, save_mean, save_invstd, "bn_weight");
  const at::Tensor &bnw = saved.weight, &mean = saved.mean, &invstd = saved.invstd;
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;

  const bool need_gi = output_mask[0], need_gw = output_mask[1], need_gcb = output_mask[2],
             need_gbw = output_mask[3] && bnw.defined(), need_gbb = output_mask[4],
             need_gr = output_mask[5];
  const auto fmt = conv_memory_format(input, weight);
  const ConvArgs args{stride, padding, dilation, groups};
  const auto opts = input.options();
  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor o = relu ? output.contiguous(fmt) : at::Tensor();
  // The normalised activations' source: saved in training; recomputed in
  // inference only when the BN weight gradient needs it.
  at::Tensor co;
  if (training) {
    co = conv_output.contiguous(fmt);
  } else if (need_gbw) {
    co = aten_conv(input, weight, cbias, args, fmt);
  }

  at::Tensor gcb = need_gcb ? at::empty({OC}, opts) : at::Tensor();
  // BN parameter gradients in the statistics dtype (float32 for half inputs), as
  // aten's; the conv bias gradient in the input's, as aten's conv.
  const auto acc_opts = opts.dtype(gpu::acc_dtype(input.scalar_type()));
  at::Tensor gbw = need_gbw ? at::empty({OC}, acc_opts) : at::Tensor();
  at::Tensor gbb = need_gbb ? at::empty({OC}, acc_opts) : at::Tensor();
  at::Tensor gr = need_gr ? at::empty({s.N, OC, s.OH, s.OW}, opts.memory_format(fmt))
                          : at::Tensor();
  at::Tensor coef = at::empty({3 * OC}, acc_opts);
  // The conv output's gradient, in the output layout, for cuDNN's dgrad / wgrad.
  at::Tensor dconv = (need_gi || need_gw) ? at::empty({s.N, OC, s.OH, s.OW}, opts.memory_format(fmt))
                                          : at::Tensor();
  const gpu::ActView v = fmt == at::MemoryFormat::ChannelsLast ? gpu::rows_view(s.N, OC, L)
                                                               : gpu::nchw_view(s.N, OC, L);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_conv_bn_relu_backward_cuda", [&] {
    using acc_t = gpu::acc_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = gpu::ptr_or_null<scalar_t>(o);
    const scalar_t* cp = gpu::ptr_or_null<scalar_t>(co);
    gpu::SumPartials p;  // S == 0: no reduction needed
    if (training || need_gbw || need_gbb || need_gcb) {
      p = gpu::bwd_reduce<scalar_t>(gp, op, cp, v, mean.const_data_ptr<acc_t>(), opts);
    }
    gpu::launch_bwd_constants<scalar_t>(OC, p, invstd, bnw, s.N * L, training, coef, gbw, gbb,
                                        gcb);
    gpu::launch_bwd_apply<scalar_t>(gp, op, training ? cp : nullptr, v,
                                    gpu::mut_ptr_or_null<scalar_t>(dconv), v,
                                    gpu::mut_ptr_or_null<scalar_t>(gr), coef, mean);
  });
  auto [gi, gw, unused] =
      aten_conv_backward(dconv, input, weight, args, fmt, {need_gi, need_gw, false});

  return {gi.defined() ? gi : not_requested(input),   gw.defined() ? gw : not_requested(input),
          gcb.defined() ? gcb : not_requested(input), gbw.defined() ? gbw : not_requested(input),
          gbb.defined() ? gbb : not_requested(input), gr.defined() ? gr : not_requested(input)};
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv_bn_relu", &conv_bn_relu_cuda);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward_cuda);
}

}  // namespace cnnops

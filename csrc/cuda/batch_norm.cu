// BatchNorm (+ residual + ReLU) on the GPU: the batch_norm and bn_relu ops
// and their backward ops (building blocks in bn_kernels.cuh).
//
// Forward: one reduction (Welford per thread, Chan merges, per-channel
// partials merged in a fixed order) for the batch statistics in training,
// one tiny kernel for the per-channel constants, and one elementwise pass for
// normalise + affine + residual + ReLU.
// Backward: one reduction (sum of gy and of gy*(x - mean), gy the gradient
// masked by the ReLU, read from the sign of `output`), one tiny constants
// kernel, one elementwise pass writing grad_input and grad_residual.
//
// Layouts: channels_last tensors are read and written as NHWC rows directly;
// anything else as NCHW planes (made contiguous first when strided). Other
// tensors (residual, grad_output, output) are brought to the input's layout,
// which costs a copy only when they arrive in another one.
//
// Dtypes: input float32/float64/float16/bfloat16; for half inputs, BN
// weight/bias/running statistics may be float32 (mixed precision), and
// save_mean/save_invstd are float32. Accumulation is float (double for
// float64 inputs).
#include <torch/library.h>

#include "bn_kernels.cuh"
#include "cnnops/bn_shape.h"

namespace cnnops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& running_mean_opt,
    const c10::optional<at::Tensor>& running_var_opt, const c10::optional<at::Tensor>& weight_opt,
    const c10::optional<at::Tensor>& bias_opt, const c10::optional<at::Tensor>& residual_opt, bool training, double eps, bool relu) {
  check_4d(input, "input");
  gpu::check_cuda_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2) * input.size(3);
  const BNParams p = check_bn_params("batch_norm", input, C, running_mean_opt, running_var_opt,
                                     weight_opt, bias_opt, training, eps);
  const at::Tensor &weight = p.weight, &bias = p.bias, &rmean = p.running_mean,
                   &rvar = p.running_var;
  const auto fmt = output_memory_format(input);
  at::Tensor residual = check_bn_residual(residual_opt, input);
  if (residual.defined()) residual = residual.contiguous(fmt);
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;

  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(fmt);  // no copy for NCHW or channels_last input
  at::Tensor y = at::empty(input.sizes(), input.options().memory_format(fmt));
  const auto acc_opts = input.options().dtype(gpu::acc_dtype(input.scalar_type()));
  const gpu::ActView v = nhwc ? gpu::rows_view(N, C, L) : gpu::nchw_view(N, C, L);

  gpu::BNConstants k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_bn_relu_cuda", [&] {
    using acc_t = gpu::acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    gpu::Partials p;  // S == 0: inference
    if (training) p = gpu::batch_moments<scalar_t>(xp, v, input.options());
    k = gpu::bn_constants<acc_t>(C, p, rmean, rvar, weight, bias, at::Tensor(), eps, acc_opts);
    gpu::launch_apply<scalar_t>(xp, v, gpu::ptr_or_null<scalar_t>(residual), v,
                                y.mutable_data_ptr<scalar_t>(), v,
                                k.center.const_data_ptr<acc_t>(), k.scale.const_data_ptr<acc_t>(),
                                k.shift.const_data_ptr<acc_t>(), relu);
  });
  return {y, k.save_mean, k.save_invstd};
}

namespace {

// The checked arguments both BN backward ops take: input and grad_output; the
// forward output read for the ReLU mask (in input's layout, undefined without
// relu); the per-channel weight and saved statistics, which must be given.
struct BackwardArgs {
  at::Tensor out, weight, mean, invstd;
};

BackwardArgs backward_args(const at::Tensor& grad_output,
                           const c10::optional<at::Tensor>& output_opt, const at::Tensor& input,
                           const c10::optional<at::Tensor>& weight_opt,
                           const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
                           const char* op) {
  const at::Tensor out =
      check_bn_backward(op, grad_output, output_opt, input, relu, gpu::check_cuda_float);
  const BNSaved s = check_bn_saved(input, input.size(1), weight_opt, save_mean, save_invstd);
  return {out.defined() ? out.contiguous(output_memory_format(input)) : out, s.weight, s.mean,
          s.invstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu,
    std::array<bool, 4> output_mask) {
  const BackwardArgs a = backward_args(grad_output, output_opt, input, weight_opt, save_mean,
                                       save_invstd, relu, "bn_relu_backward");
  const at::Tensor &out = a.out, &weight = a.weight, &mean = a.mean, &invstd = a.invstd;
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2) * input.size(3);
  const auto fmt = output_memory_format(input);
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;

  const bool need_gi = output_mask[0], need_gw = output_mask[1] && weight.defined(),
             need_gb = output_mask[2], need_gr = output_mask[3];
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  const auto opts = input.options();
  at::Tensor gi = need_gi ? at::empty(input.sizes(), opts.memory_format(fmt)) : at::Tensor();
  // BN parameter gradients in the statistics dtype (float32 for half inputs), as aten's.
  const auto acc_opts = opts.dtype(gpu::acc_dtype(input.scalar_type()));
  at::Tensor gw = need_gw ? at::empty({C}, acc_opts) : at::Tensor();
  at::Tensor gb = need_gb ? at::empty({C}, acc_opts) : at::Tensor();
  at::Tensor gr = need_gr ? at::empty(input.sizes(), opts.memory_format(fmt)) : at::Tensor();
  at::Tensor coef = at::empty({3 * C}, acc_opts);
  const gpu::ActView v = nhwc ? gpu::rows_view(N, C, L) : gpu::nchw_view(N, C, L);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_bn_relu_backward_cuda", [&] {
    using acc_t = gpu::acc_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = gpu::ptr_or_null<scalar_t>(out);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    gpu::SumPartials p;  // S == 0: no reduction (inference, no parameter gradients)
    if (training || need_gw || need_gb) {
      // x is read only where the centred sum is needed.
      p = gpu::bwd_reduce<scalar_t>(gp, op, (training || need_gw) ? xp : nullptr, v,
                                    mean.const_data_ptr<acc_t>(), opts);
    }
    gpu::launch_bwd_constants<scalar_t>(C, p, invstd, weight, N * L, training, coef, gw, gb,
                                        at::Tensor());
    gpu::launch_bwd_apply<scalar_t>(gp, op, training ? xp : nullptr, v,
                                    gpu::mut_ptr_or_null<scalar_t>(gi), v,
                                    gpu::mut_ptr_or_null<scalar_t>(gr), coef, mean);
  });
  return {gi.defined() ? gi : not_requested(input), gw.defined() ? gw : not_requested(input),
          gb.defined() ? gb : not_requested(input), gr.defined() ? gr : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_4d(input, "input");
  gpu::check_cuda_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(N * L > 0, "batch_norm_stats needs at least one value per channel, got "
                    "input of shape ", input.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto fmt = output_memory_format(input);
  const at::Tensor x = input.contiguous(fmt);
  const gpu::ActView v = fmt == at::MemoryFormat::ChannelsLast ? gpu::rows_view(N, C, L)
                                                               : gpu::nchw_view(N, C, L);
  gpu::Partials p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_batch_norm_stats_cuda", [&] {
    p = gpu::batch_moments<scalar_t>(x.const_data_ptr<scalar_t>(), v, input.options());
  });
  // Chan et al.'s merge of each channel's S partials (an empty partial holds
  // count 0, mean 0, m2 0), as a few ops on [C, S].
  const at::Tensor n = p.n.view({C, p.S}).to(p.mean.scalar_type());
  const at::Tensor part_mean = p.mean.view({C, p.S}), part_m2 = p.m2.view({C, p.S});
  const at::Tensor count = n.sum(1);
  const at::Tensor mean = (n * part_mean).sum(1) / count;
  const at::Tensor m2 =
      part_m2.sum(1) + (n * (part_mean - mean.unsqueeze(1)).square()).sum(1);
  return {mean, m2 / count};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_elemt_cuda(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mean_dy,
    const at::Tensor& mean_dy_xhat, bool relu, std::array<bool, 2> output_mask) {
  const BackwardArgs a = backward_args(grad_output, output_opt, input, weight_opt, save_mean,
                                       save_invstd, relu, "bn_relu_backward_elemt");
  const at::Tensor &out = a.out, &weight = a.weight, &mean = a.mean, &invstd = a.invstd;
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2) * input.size(3);
  const auto fmt = output_memory_format(input);
  const at::Tensor mdy = gpu::bn_channel_param(mean_dy, input, C, "mean_dy");
  const at::Tensor mdx = gpu::bn_channel_param(mean_dy_xhat, input, C, "mean_dy_xhat");
  TORCH_CHECK_VALUE(mdy.defined() && mdx.defined(), "mean_dy and mean_dy_xhat are required");
  c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;

  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  const auto opts = input.options().memory_format(fmt);
  at::Tensor gi = output_mask[0] ? at::empty(input.sizes(), opts) : at::Tensor();
  at::Tensor gr = output_mask[1] ? at::empty(input.sizes(), opts) : at::Tensor();
  // The coefficients of launch_bwd_apply (see bwd_constants_kernel):
  // gx = a * ((gy - k) - b * (x - mean)) with a = weight * invstd,
  // b = invstd * mean_dy_xhat, k = mean_dy.
  const at::Tensor coef =
      at::cat({weight.defined() ? weight * invstd : invstd, invstd * mdx, mdy}).contiguous();
  const gpu::ActView v = fmt == at::MemoryFormat::ChannelsLast ? gpu::rows_view(N, C, L)
                                                               : gpu::nchw_view(N, C, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_bn_relu_backward_elemt_cuda", [&] {
    gpu::launch_bwd_apply<scalar_t>(g.const_data_ptr<scalar_t>(), gpu::ptr_or_null<scalar_t>(out),
                                    x.const_data_ptr<scalar_t>(), v,
                                    gpu::mut_ptr_or_null<scalar_t>(gi), v,
                                    gpu::mut_ptr_or_null<scalar_t>(gr), coef, mean);
  });
  return {gi.defined() ? gi : not_requested(input), gr.defined() ? gr : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, bool training, double eps) {
  return bn_relu_cuda(input, running_mean, running_var, weight, bias, c10::nullopt, training, eps,
                      /*relu=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask) {
  auto grads = bn_relu_backward_cuda(grad_output, c10::nullopt, input, weight, save_mean,
                                     save_invstd, training, /*relu=*/false,
                                     {output_mask[0], output_mask[1], output_mask[2], false});
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

namespace gpu {
namespace {

// One thread per channel; running_mean / running_var may be null.
template <typename stat_t, typename run_t>
__global__ void update_running_stats_kernel(int64_t C, const stat_t* __restrict__ save_mean,
                                            const stat_t* __restrict__ save_invstd,
                                            run_t* running_mean, int64_t sm, run_t* running_var,
                                            int64_t sv, RunningStatsUpdate u) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (running_mean != nullptr) {
      running_mean[c * sm] = static_cast<run_t>(
          u.mean(static_cast<double>(running_mean[c * sm]), static_cast<double>(save_mean[c])));
    }
    if (running_var != nullptr) {
      running_var[c * sv] = static_cast<run_t>(
          u.var(static_cast<double>(running_var[c * sv]), static_cast<double>(save_invstd[c])));
    }
  }
}

}  // namespace
}  // namespace gpu

// The running statistics update of a training step in one launch (no host
// synchronisation), instead of the dozen small tensor ops of the formula.
void update_running_stats_cuda(const c10::optional<at::Tensor>& running_mean_opt,
                               const c10::optional<at::Tensor>& running_var_opt,
                               const at::Tensor& save_mean, const at::Tensor& save_invstd,
                               int64_t count, double momentum, double eps) {
  const int64_t C = check_running_stats_update(running_mean_opt, running_var_opt, save_mean,
                                               save_invstd, count);
  TORCH_CHECK_VALUE(save_mean.is_cuda(), "expected save_mean on a CUDA device, got ",
                    save_mean.device());
  const at::Tensor rm = running_mean_opt.has_value() ? *running_mean_opt : at::Tensor();
  const at::Tensor rv = running_var_opt.has_value() ? *running_var_opt : at::Tensor();
  if (count == 0 || C == 0 || !(rm.defined() || rv.defined())) return;
  c10::cuda::CUDAGuard guard(save_mean.device());
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const RunningStatsUpdate u(count, momentum, eps);
  // One launch for both buffers (two if their dtypes differ).
  const auto launch = [&](const at::Tensor& m, const at::Tensor& v) {
    const auto run_type = m.defined() ? m.scalar_type() : v.scalar_type();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cnnops_update_running_stats", [&] {
      using stat_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_type, "cnnops_update_running_stats", [&] {
        gpu::update_running_stats_kernel<stat_t, scalar_t>
            <<<gpu::grid_for(C, gpu::kThreads), gpu::kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                C, mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(),
                gpu::mut_ptr_or_null<scalar_t>(m), m.defined() ? m.stride(0) : 0,
                gpu::mut_ptr_or_null<scalar_t>(v), v.defined() ? v.stride(0) : 0, u);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  };
  if (rm.defined() && rv.defined() && rm.scalar_type() != rv.scalar_type()) {
    launch(rm, at::Tensor());
    launch(at::Tensor(), rv);
  } else {
    launch(rm, rv);
  }
}

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("update_running_stats", &update_running_stats_cuda);
  m.impl("batch_norm", &batch_norm_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("bn_relu", &bn_relu_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cuda);
}

}  // namespace cnnops

// BatchNorm (+ residual + ReLU) on the CPU: the batch_norm and bn_relu ops.
//
// Layout: each op runs in the layout of cnnops::output_memory_format(input),
// NCHW or channels_last (the passes of bn_kernels.h read both), and returns its
// results in it; other strided inputs are made NCHW-contiguous first.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_kernels.h"
#include "cnnops/bn_shape.h"

namespace cnnops {
namespace {

// The activations of a BN backward op, checked against input and made
// contiguous in input's layout: grad_output, and the forward output when relu
// (its sign is the ReLU mask; undefined otherwise).
struct BackwardActivations {
  at::Tensor g, out, x;
  at::MemoryFormat fmt;
  cpu::Activation layout() const { return cpu::Activation(x, fmt); }
};

BackwardActivations backward_activations(const at::Tensor& grad_output,
                                         const c10::optional<at::Tensor>& output_opt,
                                         const at::Tensor& input, bool relu, const char* op) {
  const at::Tensor out =
      check_bn_backward(op, grad_output, output_opt, input, relu, check_cpu_float);
  const at::MemoryFormat fmt = output_memory_format(input);
  BackwardActivations a;
  a.fmt = fmt;
  if (out.defined()) a.out = out.contiguous(fmt);
  a.g = grad_output.contiguous(fmt);
  a.x = input.contiguous(fmt);
  return a;
}

// grad_input (gi, may be undefined) and grad_residual (gr, may be undefined),
// in the activations' layout, from the per-channel coefficients of
// cpu::bn_backward_coef.
void backward_apply(const BackwardActivations& a, const std::vector<double>& mean,
                    const std::vector<cpu::BNBackwardCoef>& coef, at::Tensor& gi,
                    at::Tensor& gr) {
  if (!gi.defined() && !gr.defined()) return;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bn_backward_apply_cpu", [&] {
    using T = scalar_t;
    const T* gp = a.g.const_data_ptr<T>();
    const T* op = a.out.defined() ? a.out.const_data_ptr<T>() : nullptr;
    if (gi.defined()) {
      cpu::channel_grad_apply(gp, op, a.x.const_data_ptr<T>(), gi.mutable_data_ptr<T>(), a.layout(),
                              coef, mean);
    }
    if (gr.defined()) cpu::relu_grad_all(gp, op, gr.mutable_data_ptr<T>(), a.x.numel());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(N * P > 0, "batch_norm_stats needs at least one value per channel, got "
                    "input of shape ", input.sizes());
  const at::MemoryFormat fmt = output_memory_format(input);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor mean = at::empty({C}, input.options());
  at::Tensor var = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using T = scalar_t;
    const std::vector<cpu::Moments> m =
        cpu::channel_moments(x.const_data_ptr<T>(), cpu::Activation(x, fmt));
    T* mp = mean.mutable_data_ptr<T>();
    T* vp = var.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<T>(m[c].mean);
      vp[c] = static_cast<T>(m[c].biased_var());
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& running_mean_opt,
    const c10::optional<at::Tensor>& running_var_opt,
    const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt,
    const c10::optional<at::Tensor>& residual_opt, bool training, double eps,
    bool relu) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  const int64_t C = input.size(1);
  const BNParams p = check_bn_params("batch_norm", input, C, running_mean_opt, running_var_opt,
                                     weight_opt, bias_opt, training, eps);
  const at::Tensor &weight = p.weight, &bias = p.bias, &rmean = p.running_mean,
                   &rvar = p.running_var;
  const at::MemoryFormat fmt = output_memory_format(input);
  at::Tensor residual = check_bn_residual(residual_opt, input);
  if (residual.defined()) {
    residual = residual.contiguous(fmt);
  }

  const at::Tensor x = input.contiguous(fmt);
  const cpu::Activation act(x, fmt);
  at::Tensor y = at::empty_like(x, fmt);
  at::Tensor mean = at::empty({C}, input.options());
  at::Tensor invstd = at::empty({C}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    std::vector<double> scale(C), shift(C);
    const std::vector<cpu::Moments> m =
        training ? cpu::channel_moments(xp, act) : std::vector<cpu::Moments>();
    const std::vector<double> rm = cpu::channel_values<T>(rmean, C, 0.0),
                              rv = cpu::channel_values<T>(rvar, C, 1.0),
                              w = cpu::channel_values<T>(weight, C, 1.0),
                              b = cpu::channel_values<T>(bias, C, 0.0);
    T* mp = mean.mutable_data_ptr<T>();
    T* ip = invstd.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const double mu = training ? m[c].mean : rm[c];
      const double is = 1.0 / std::sqrt((training ? m[c].biased_var() : rv[c]) + eps);
      mp[c] = static_cast<T>(mu);
      ip[c] = static_cast<T>(is);
      scale[c] = w[c] * is;
      shift[c] = b[c] - mu * scale[c];
    }
    cpu::channel_affine(xp, residual.defined() ? residual.const_data_ptr<T>() : nullptr,
                        y.mutable_data_ptr<T>(), act, scale, shift, relu);
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    bool relu, std::array<bool, 4> output_mask) {
  const BackwardActivations a =
      backward_activations(grad_output, output_opt, input, relu, "bn_relu_backward");
  const int64_t C = input.size(1);
  const auto [weight, mean, invstd] =
      check_bn_saved(input, C, weight_opt, save_mean, save_invstd);

  const bool need_gi = output_mask[0], need_gw = output_mask[1] && weight.defined(),
             need_gb = output_mask[2], need_gr = output_mask[3];
  at::Tensor gi = need_gi ? at::empty_like(a.x, a.fmt) : at::Tensor();
  at::Tensor gw = need_gw ? at::empty({C}, input.options()) : not_requested(input);
  at::Tensor gb = need_gb ? at::empty({C}, input.options()) : not_requested(input);
  at::Tensor gr = need_gr ? at::empty_like(a.x, a.fmt) : at::Tensor();

  std::vector<cpu::BNBackwardCoef> coef(C);
  std::vector<double> mean_d;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_backward_cpu", [&] {
    using T = scalar_t;
    mean_d = cpu::channel_values<T>(mean, C, 0.0);
    const std::vector<double> is = cpu::channel_values<T>(invstd, C, 1.0),
                              w = cpu::channel_values<T>(weight, C, 1.0);
    std::vector<double> sum_gy(C, 0.0), sum_gy_xc(C, 0.0);
    if (training || need_gw || need_gb) {
      cpu::channel_grad_sums(a.g.const_data_ptr<T>(),
                             a.out.defined() ? a.out.const_data_ptr<T>() : nullptr,
                             a.x.const_data_ptr<T>(), a.layout(),
                             mean_d, sum_gy, sum_gy_xc);
    }
    T* gwp = need_gw ? gw.mutable_data_ptr<T>() : nullptr;
    T* gbp = need_gb ? gb.mutable_data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      if (gwp) gwp[c] = static_cast<T>(sum_gy_xc[c] * is[c]);
      if (gbp) gbp[c] = static_cast<T>(sum_gy[c]);
      coef[c] = cpu::bn_backward_coef(training, w[c], is[c], sum_gy[c], sum_gy_xc[c],
                                      a.layout().rows());
    }
  });
  backward_apply(a, mean_d, coef, gi, gr);
  return {need_gi ? gi : not_requested(input), gw, gb, need_gr ? gr : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_elemt_cpu(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mean_dy,
    const at::Tensor& mean_dy_xhat, bool relu, std::array<bool, 2> output_mask) {
  const BackwardActivations a =
      backward_activations(grad_output, output_opt, input, relu, "bn_relu_backward_elemt");
  const int64_t C = input.size(1);
  const auto [weight, mean, invstd] =
      check_bn_saved(input, C, weight_opt, save_mean, save_invstd);
  const at::Tensor mdy = bn_channel_param(mean_dy, input, C, "mean_dy");
  const at::Tensor mdx = bn_channel_param(mean_dy_xhat, input, C, "mean_dy_xhat");
  TORCH_CHECK_VALUE(mdy.defined() && mdx.defined(), "mean_dy and mean_dy_xhat are required");

  // bn_backward_coef's training formula over a count of 1, whose sums are the
  // means: sum(gy) = mean_dy, sum(gy * (x - mean)) = mean_dy_xhat / invstd.
  std::vector<cpu::BNBackwardCoef> coef(C);
  std::vector<double> mean_d;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_backward_elemt_cpu", [&] {
    using T = scalar_t;
    mean_d = cpu::channel_values<T>(mean, C, 0.0);
    const std::vector<double> is = cpu::channel_values<T>(invstd, C, 1.0),
                              w = cpu::channel_values<T>(weight, C, 1.0),
                              dy = cpu::channel_values<T>(mdy, C, 0.0),
                              dx = cpu::channel_values<T>(mdx, C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      coef[c] = cpu::bn_backward_coef(/*training=*/true, w[c], is[c], dy[c], dx[c] / is[c],
                                      /*count=*/1);
    }
  });
  at::Tensor gi = output_mask[0] ? at::empty_like(a.x, a.fmt) : at::Tensor();
  at::Tensor gr = output_mask[1] ? at::empty_like(a.x, a.fmt) : at::Tensor();
  backward_apply(a, mean_d, coef, gi, gr);
  return {output_mask[0] ? gi : not_requested(input),
          output_mask[1] ? gr : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, bool training, double eps) {
  return bn_relu_cpu(input, running_mean, running_var, weight, bias, c10::nullopt, training,
                     eps, /*relu=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask) {
  auto grads = bn_relu_backward_cpu(grad_output, c10::nullopt, input, weight, save_mean,
                                    save_invstd, training, /*relu=*/false,
                                    {output_mask[0], output_mask[1], output_mask[2], false});
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

void update_running_stats_cpu(const c10::optional<at::Tensor>& running_mean,
                              const c10::optional<at::Tensor>& running_var,
                              const at::Tensor& save_mean, const at::Tensor& save_invstd,
                              int64_t count, double momentum, double eps) {
  const int64_t C = check_running_stats_update(running_mean, running_var, save_mean,
                                               save_invstd, count);
  TORCH_CHECK_VALUE(save_mean.device().is_cpu(), "expected save_mean on the CPU, got ",
                    save_mean.device());
  if (count == 0) return;  // an empty batch leaves the statistics alone, as in torch
  const RunningStatsUpdate u(count, momentum, eps);
  // A few hundred channels: a plain loop per buffer, strided as the buffer is.
  const auto update = [&](const c10::optional<at::Tensor>& buffer, const at::Tensor& batch,
                          bool is_var) {
    if (!buffer.has_value() || !buffer->defined()) return;
    at::Tensor b = *buffer;
    // The batch statistic in double, read as it is (a converted copy was two tensor
    // allocations a BatchNorm call, 106 a ResNet-50 step).
    std::vector<double> bp(C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.scalar_type(),
                                    "update_running_stats_cpu", [&] {
      const scalar_t* q = batch.const_data_ptr<scalar_t>();
      const int64_t qs = batch.stride(0);
      for (int64_t c = 0; c < C; ++c) bp[c] = static_cast<double>(q[c * qs]);
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "update_running_stats_cpu", [&] {
      scalar_t* p = b.mutable_data_ptr<scalar_t>();
      const int64_t st = b.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        const double r = static_cast<double>(p[c * st]);
        p[c * st] = static_cast<scalar_t>(is_var ? u.var(r, bp[c]) : u.mean(r, bp[c]));
      }
    });
  };
  update(running_mean, save_mean, /*is_var=*/false);
  update(running_var, save_invstd, /*is_var=*/true);
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("update_running_stats", &update_running_stats_cpu);
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cpu);
}

}  // namespace cnnops

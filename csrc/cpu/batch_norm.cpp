// BatchNorm (+ residual + ReLU) on the CPU: the batch_norm and bn_relu ops.
//
// Layout assumed: NCHW-contiguous (other layouts are converted on entry and the
// result is returned in the layout rule of cnnops::output_memory_format).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_kernels.h"
#include "cnnops/common.h"

namespace cnnops {
namespace {

// Mean and sum of squared deviations of channel c of an NCHW-contiguous
// [N, C, P] tensor.
template <typename T>
cpu::Moments channel_moments(const T* x, int64_t N, int64_t C, int64_t P, int64_t c) {
  cpu::Moments m;
  for (int64_t n = 0; n < N; ++n) m.merge(cpu::plane_moments(x + (n * C + c) * P, P));
  return m;
}

// The activations of a BN backward op, checked against input and made
// NCHW-contiguous: grad_output, and the forward output when relu (its sign is
// the ReLU mask; undefined otherwise).
struct BackwardActivations {
  at::Tensor g, out, x;
};

BackwardActivations backward_activations(const at::Tensor& grad_output,
                                         const c10::optional<at::Tensor>& output_opt,
                                         const at::Tensor& input, bool relu, const char* op) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  check_same(grad_output, input, "grad_output", "input");
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "expected grad_output of shape ",
                    input.sizes(), ", got ", grad_output.sizes());
  BackwardActivations a;
  if (relu) {
    TORCH_CHECK_VALUE(output_opt.has_value() && output_opt->defined(), op,
                      " with relu=True needs the forward output");
    check_same(*output_opt, input, "output", "input");
    TORCH_CHECK_VALUE(output_opt->sizes() == input.sizes(), "expected output of shape ",
                      input.sizes(), ", got ", output_opt->sizes());
    a.out = output_opt->contiguous();
  }
  a.g = grad_output.contiguous();
  a.x = input.contiguous();
  return a;
}

// grad_input (gi, may be undefined) and grad_residual (gr, may be undefined),
// NCHW-contiguous, from the per-channel coefficients of cpu::bn_backward_coef.
void backward_apply(const BackwardActivations& a, const at::Tensor& mean,
                    const std::vector<cpu::BNBackwardCoef>& coef, at::Tensor& gi,
                    at::Tensor& gr) {
  if (!gi.defined() && !gr.defined()) return;
  const int64_t N = a.x.size(0), C = a.x.size(1), P = a.x.size(2) * a.x.size(3);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bn_backward_apply_cpu", [&] {
    using T = scalar_t;
    const T* gp = a.g.const_data_ptr<T>();
    const T* op = a.out.defined() ? a.out.const_data_ptr<T>() : nullptr;
    const T* xp = a.x.const_data_ptr<T>();
    const T* mp = mean.const_data_ptr<T>();
    T* gip = gi.defined() ? gi.mutable_data_ptr<T>() : nullptr;
    T* grp = gr.defined() ? gr.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C, off = plane * P;
        const T* opl = op ? op + off : nullptr;
        if (gip) {
          cpu::bn_backward_apply_plane(gp + off, opl, xp + off, gip + off, P, coef[c],
                                       static_cast<double>(mp[c]));
        }
        if (grp) cpu::relu_grad_plane(gp + off, opl, grp + off, P);
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(N * P > 0, "batch_norm_stats needs at least one value per channel, got "
                    "input of shape ", input.sizes());
  const at::Tensor x = input.contiguous();
  at::Tensor mean = at::empty({C}, input.options());
  at::Tensor var = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const cpu::Moments m = channel_moments(xp, N, C, P, c);
        mean.mutable_data_ptr<T>()[c] = static_cast<T>(m.mean);
        var.mutable_data_ptr<T>()[c] = static_cast<T>(m.biased_var());
      }
    });
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const c10::optional<at::Tensor>& bias_opt,
    const c10::optional<at::Tensor>& running_mean_opt,
    const c10::optional<at::Tensor>& running_var_opt,
    const c10::optional<at::Tensor>& residual_opt, bool training, double eps,
    bool relu) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  const at::Tensor weight = optional_channel(weight_opt, input, C, "weight");
  const at::Tensor bias = optional_channel(bias_opt, input, C, "bias");
  const at::Tensor rmean = optional_channel(running_mean_opt, input, C, "running_mean");
  const at::Tensor rvar = optional_channel(running_var_opt, input, C, "running_var");
  TORCH_CHECK_VALUE(training || (rmean.defined() && rvar.defined()),
                    "batch_norm in inference mode (training=False) needs running_mean "
                    "and running_var");
  TORCH_CHECK_VALUE(eps >= 0, "expected eps >= 0, got ", eps);
  at::Tensor residual;
  if (residual_opt.has_value() && residual_opt->defined()) {
    check_same(*residual_opt, input, "residual", "input");
    TORCH_CHECK_VALUE(residual_opt->sizes() == input.sizes(), "expected residual of shape ",
                      input.sizes(), " (the shape of input), got ", residual_opt->sizes());
    residual = residual_opt->contiguous();
  }

  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({C}, input.options());
  at::Tensor invstd = at::empty({C}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* mp = mean.mutable_data_ptr<T>();
    T* ip = invstd.mutable_data_ptr<T>();
    std::vector<double> mean_d(C), invstd_d(C);
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double mu, var;
        if (training) {
          const cpu::Moments m = channel_moments(xp, N, C, P, c);
          mu = m.mean;
          var = m.biased_var();
        } else {
          mu = cpu::channel_value<T>(rmean, c, 0.0);
          var = cpu::channel_value<T>(rvar, c, 1.0);
        }
        mean_d[c] = mu;
        invstd_d[c] = 1.0 / std::sqrt(var + eps);
        mp[c] = static_cast<T>(mu);
        ip[c] = static_cast<T>(invstd_d[c]);
      }
    });
    const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const double scale = cpu::channel_value<T>(weight, c, 1.0) * invstd_d[c];
        const double shift = cpu::channel_value<T>(bias, c, 0.0) - mean_d[c] * scale;
        cpu::bn_forward_plane(xp + plane * P, rp ? rp + plane * P : nullptr,
                              yp + plane * P, P, static_cast<T>(scale),
                              static_cast<T>(shift), relu);
      }
    });
  });
  return {y.contiguous(output_memory_format(input)), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    bool relu, std::array<bool, 4> output_mask) {
  const BackwardActivations a =
      backward_activations(grad_output, output_opt, input, relu, "bn_relu_backward");
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  const at::Tensor weight = optional_channel(weight_opt, input, C, "weight");
  const at::Tensor mean = optional_channel(save_mean, input, C, "save_mean");
  const at::Tensor invstd = optional_channel(save_invstd, input, C, "save_invstd");
  TORCH_CHECK_VALUE(mean.defined() && invstd.defined(), "save_mean and save_invstd are required");

  const bool need_gi = output_mask[0], need_gw = output_mask[1] && weight.defined(),
             need_gb = output_mask[2], need_gr = output_mask[3];
  const auto fmt = output_memory_format(input);
  at::Tensor gi = need_gi ? at::empty_like(a.x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gw = need_gw ? at::empty({C}, input.options()) : not_requested(input);
  at::Tensor gb = need_gb ? at::empty({C}, input.options()) : not_requested(input);
  at::Tensor gr = need_gr ? at::empty_like(a.x, at::MemoryFormat::Contiguous) : at::Tensor();

  std::vector<cpu::BNBackwardCoef> coef(C);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_backward_cpu", [&] {
    using T = scalar_t;
    const T* gp = a.g.const_data_ptr<T>();
    const T* op = a.out.defined() ? a.out.const_data_ptr<T>() : nullptr;
    const T* xp = a.x.const_data_ptr<T>();
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const double mu = mean.const_data_ptr<T>()[c];
        const double is = invstd.const_data_ptr<T>()[c];
        double sum_gy = 0.0, sum_gy_xc = 0.0;
        if (training || need_gw || need_gb) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c) * P;
            cpu::bn_backward_reduce_plane(gp + off, op ? op + off : nullptr, xp + off, P, mu,
                                          sum_gy, sum_gy_xc);
          }
        }
        if (need_gw) gw.mutable_data_ptr<T>()[c] = static_cast<T>(sum_gy_xc * is);
        if (need_gb) gb.mutable_data_ptr<T>()[c] = static_cast<T>(sum_gy);
        coef[c] = cpu::bn_backward_coef(training, cpu::channel_value<T>(weight, c, 1.0), is,
                                        sum_gy, sum_gy_xc, N * P);
      }
    });
  });
  backward_apply(a, mean, coef, gi, gr);
  return {need_gi ? gi.contiguous(fmt) : not_requested(input), gw, gb,
          need_gr ? gr.contiguous(fmt) : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_elemt_cpu(
    const at::Tensor& grad_output, const c10::optional<at::Tensor>& output_opt,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mean_dy,
    const at::Tensor& mean_dy_xhat, bool relu, std::array<bool, 2> output_mask) {
  const BackwardActivations a =
      backward_activations(grad_output, output_opt, input, relu, "bn_relu_backward_elemt");
  const int64_t C = input.size(1);
  const at::Tensor weight = optional_channel(weight_opt, input, C, "weight");
  const at::Tensor mean = optional_channel(save_mean, input, C, "save_mean");
  const at::Tensor invstd = optional_channel(save_invstd, input, C, "save_invstd");
  const at::Tensor mdy = optional_channel(mean_dy, input, C, "mean_dy");
  const at::Tensor mdx = optional_channel(mean_dy_xhat, input, C, "mean_dy_xhat");
  TORCH_CHECK_VALUE(mean.defined() && invstd.defined() && mdy.defined() && mdx.defined(),
                    "save_mean, save_invstd, mean_dy and mean_dy_xhat are required");

  // bn_backward_coef's training formula over a count of 1, whose sums are the
  // means: sum(gy) = mean_dy, sum(gy * (x - mean)) = mean_dy_xhat / invstd.
  std::vector<cpu::BNBackwardCoef> coef(C);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bn_relu_backward_elemt_cpu", [&] {
    using T = scalar_t;
    for (int64_t c = 0; c < C; ++c) {
      const double is = invstd.const_data_ptr<T>()[c];
      coef[c] = cpu::bn_backward_coef(/*training=*/true, cpu::channel_value<T>(weight, c, 1.0),
                                      is, mdy.const_data_ptr<T>()[c],
                                      mdx.const_data_ptr<T>()[c] / is, /*count=*/1);
    }
  });
  const auto fmt = output_memory_format(input);
  at::Tensor gi = output_mask[0] ? at::empty_like(a.x, at::MemoryFormat::Contiguous)
                                 : at::Tensor();
  at::Tensor gr = output_mask[1] ? at::empty_like(a.x, at::MemoryFormat::Contiguous)
                                 : at::Tensor();
  backward_apply(a, mean, coef, gi, gr);
  return {output_mask[0] ? gi.contiguous(fmt) : not_requested(input),
          output_mask[1] ? gr.contiguous(fmt) : not_requested(input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  return bn_relu_cpu(input, weight, bias, running_mean, running_var, c10::nullopt, training,
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
    const at::Tensor batch_d = batch.to(at::kDouble).contiguous();
    const double* bp = batch_d.const_data_ptr<double>();
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

// conv -> BatchNorm -> (+ residual) -> ReLU in one op on the CPU.
//
// Inference: BN is a per-channel scale and shift, applied (with residual and
// ReLU) to each GEMM output tile while it is still in cache.
// Training: each conv output tile also yields its per-channel mean and
// squared deviations in the GEMM epilogue, so batch statistics cost no extra
// pass over memory; one more pass normalises. The backward computes the BN
// gradient of each output tile on the fly (the conv-output gradient is never
// materialised for the whole batch) and feeds it straight to the conv backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_kernels.h"
#include "cnnops/conv_shape.h"
#include "conv_kernels.h"

namespace cnnops {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_cpu(
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
  check_cpu_float(input, "input");
  const at::Tensor cbias = optional_channel(conv_bias_opt, input, s.OC, "conv_bias");
  const at::Tensor bnw = optional_channel(bn_weight_opt, input, s.OC, "bn_weight");
  const at::Tensor bnb = optional_channel(bn_bias_opt, input, s.OC, "bn_bias");
  const at::Tensor rmean = optional_channel(running_mean_opt, input, s.OC, "running_mean");
  const at::Tensor rvar = optional_channel(running_var_opt, input, s.OC, "running_var");
  TORCH_CHECK_VALUE(training || (rmean.defined() && rvar.defined()),
                    "conv_bn_relu in inference mode (training=False) needs running_mean "
                    "and running_var");
  TORCH_CHECK_VALUE(eps >= 0, "expected eps >= 0, got ", eps);
  const at::Tensor residual = conv_residual(residual_opt, input, s);

  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const int64_t L = s.L(), OC = s.OC;
  at::Tensor out = at::empty({s.N, OC, s.OH, s.OW}, input.options());
  at::Tensor conv_out = training ? at::empty({s.N, OC, s.OH, s.OW}, input.options())
                                 : at::empty({0}, input.options());
  at::Tensor mean = at::empty({OC}, input.options());
  at::Tensor invstd = at::empty({OC}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_bn_relu_cpu", [&] {
    using T = scalar_t;
    const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    const T* cbp = cbias.defined() ? cbias.const_data_ptr<T>() : nullptr;
    std::vector<double> mean_d(OC), invstd_d(OC);
    auto scale_shift = [&](int64_t c, T& scale, T& shift) {
      const double sc = cpu::channel_value<T>(bnw, c, 1.0) * invstd_d[c];
      scale = static_cast<T>(sc);
      shift = static_cast<T>(cpu::channel_value<T>(bnb, c, 0.0) - mean_d[c] * sc);
    };

    if (!training) {
      for (int64_t c = 0; c < OC; ++c) {
        // A conv bias before BN only shifts the mean it subtracts.
        mean_d[c] = cpu::channel_value<T>(rmean, c, 0.0) - (cbp ? cbp[c] : T(0));
        invstd_d[c] = 1.0 / std::sqrt(cpu::channel_value<T>(rvar, c, 1.0) + eps);
      }
      std::vector<T> scale(OC), shift(OC);
      for (int64_t c = 0; c < OC; ++c) scale_shift(c, scale[c], shift[c]);
      T* op = out.mutable_data_ptr<T>();
      cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y,
                                        int64_t ld) {
        for (int64_t c = 0; c < OC; ++c) {
          const int64_t off = (n * OC + c) * L + la;
          cpu::bn_forward_plane(y + c * ld, rp ? rp + off : nullptr, op + off, lb - la,
                                scale[c], shift[c], relu);
        }
      });
      mean.copy_(rmean);
      for (int64_t c = 0; c < OC; ++c) invstd.mutable_data_ptr<T>()[c] = static_cast<T>(invstd_d[c]);
      return;
    }

    // Training: moments of each (image, channel) pair, merged tile by tile in
    // position order while each tile is hot.
    std::vector<cpu::Moments> tile(s.N * OC);
    T* cop = conv_out.mutable_data_ptr<T>();
    cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y,
                                      int64_t ld) {
      T* dst = cop + n * OC * L + la;
      cpu::copy_channel_bias(y, ld, dst, L, cbp, OC, lb - la);
      for (int64_t c = 0; c < OC; ++c) {
        tile[n * OC + c].merge(cpu::plane_moments(dst + c * L, lb - la));
      }
    });
    for (int64_t c = 0; c < OC; ++c) {
      cpu::Moments m;
      for (int64_t n = 0; n < s.N; ++n) m.merge(tile[n * OC + c]);
      mean_d[c] = m.mean;
      invstd_d[c] = 1.0 / std::sqrt(m.biased_var() + eps);
      mean.mutable_data_ptr<T>()[c] = static_cast<T>(mean_d[c]);
      invstd.mutable_data_ptr<T>()[c] = static_cast<T>(invstd_d[c]);
    }
    const T* cp = conv_out.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, s.N * OC, 1, [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        T scale, shift;
        scale_shift(plane % OC, scale, shift);
        cpu::bn_forward_plane(cp + plane * L, rp ? rp + plane * L : nullptr, op + plane * L, L,
                              scale, shift, relu);
      }
    });
  });
  return {out.contiguous(output_memory_format(input)), conv_out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& output,
                          const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& conv_bias_opt,
                          const at::Tensor& conv_output,
                          const c10::optional<at::Tensor>& bn_weight_opt,
                          const at::Tensor& save_mean, const at::Tensor& save_invstd,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, bool training, bool relu,
                          std::array<bool, 6> output_mask) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  check_cpu_float(input, "input");
  const int64_t L = s.L(), OC = s.OC;
  const std::vector<int64_t> out_shape{s.N, OC, s.OH, s.OW};
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_output, "grad_output"},
                                {output, "output"}}) {
    check_same(t, input, name, "input");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), "expected ", name, " of shape ",
                      at::IntArrayRef(out_shape), ", got ", t.sizes());
  }
  if (training) {
    check_same(conv_output, input, "conv_output", "input");
    TORCH_CHECK_VALUE(conv_output.sizes() == at::IntArrayRef(out_shape),
                      "expected conv_output of shape ", at::IntArrayRef(out_shape), ", got ",
                      conv_output.sizes());
  }
  const at::Tensor cbias = optional_channel(conv_bias_opt, input, OC, "conv_bias");
  const at::Tensor bnw = optional_channel(bn_weight_opt, input, OC, "bn_weight");
  const at::Tensor mean = optional_channel(save_mean, input, OC, "save_mean");
  const at::Tensor invstd = optional_channel(save_invstd, input, OC, "save_invstd");
  TORCH_CHECK_VALUE(mean.defined() && invstd.defined(), "save_mean and save_invstd are required");

  const bool need_gi = output_mask[0], need_gw = output_mask[1], need_gcb = output_mask[2],
             need_gbw = output_mask[3] && bnw.defined(), need_gbb = output_mask[4],
             need_gr = output_mask[5];
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor o = relu ? output.contiguous() : at::Tensor();
  // The normalised activations' source: saved in training; recomputed in
  // inference only when the BN weight gradient needs it.
  at::Tensor co;
  if (training) {
    co = conv_output.contiguous();
  } else if (need_gbw) {
    co = at::empty({s.N, OC, s.OH, s.OW}, input.options());
  }
  at::Tensor gi = need_gi ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gw = need_gw ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gcb = need_gcb ? at::empty({OC}, input.options()) : at::Tensor();
  at::Tensor gbw = need_gbw ? at::empty({OC}, input.options()) : not_requested(input);
  at::Tensor gbb = need_gbb ? at::empty({OC}, input.options()) : not_requested(input);
  at::Tensor gr = need_gr ? at::empty({s.N, OC, s.OH, s.OW}, input.options()) : not_requested(input);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_bn_relu_backward_cpu", [&] {
    using T = scalar_t;
    if (!training && need_gbw) {
      const T* cbp = cbias.defined() ? cbias.const_data_ptr<T>() : nullptr;
      T* cop = co.mutable_data_ptr<T>();
      cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y,
                                        int64_t ld) {
        cpu::copy_channel_bias(y, ld, cop + n * OC * L + la, L, cbp, OC, lb - la);
      });
    }
    const T* gp = g.const_data_ptr<T>();
    const T* op = o.defined() ? o.const_data_ptr<T>() : nullptr;
    const T* cp = co.defined() ? co.const_data_ptr<T>() : nullptr;
    std::vector<cpu::BNBackwardCoef> coef(OC);
    std::vector<double> mean_d(OC);
    at::parallel_for(0, OC, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        mean_d[c] = mean.const_data_ptr<T>()[c];
        const double is = invstd.const_data_ptr<T>()[c];
        double sum_gy = 0.0, sum_gy_xc = 0.0;
        if (training || need_gbw || need_gbb) {
          for (int64_t n = 0; n < s.N; ++n) {
            const int64_t off = (n * OC + c) * L;
            cpu::bn_backward_reduce_plane(gp + off, op ? op + off : nullptr,
                                          cp ? cp + off : nullptr, L, mean_d[c], sum_gy,
                                          sum_gy_xc);
          }
        }
        if (need_gbw) gbw.mutable_data_ptr<T>()[c] = static_cast<T>(sum_gy_xc * is);
        if (need_gbb) gbb.mutable_data_ptr<T>()[c] = static_cast<T>(sum_gy);
        coef[c] = cpu::bn_backward_coef(training, cpu::channel_value<T>(bnw, c, 1.0), is, sum_gy,
                                        sum_gy_xc, s.N * L);
      }
    });
    if (need_gr) {
      T* grp = gr.mutable_data_ptr<T>();
      at::parallel_for(0, s.N * OC * L, 4096, [&](int64_t b, int64_t e) {
        cpu::relu_grad_plane(gp + b, op ? op + b : nullptr, grp + b, e - b);
      });
    }
    if (need_gi || need_gw || need_gcb) {
      // The conv-output gradient of image n, computed per tile into scratch.
      auto grad_of = [&](int64_t n, int64_t la, int64_t lb, T* dst, int64_t ld) {
        for (int64_t c = 0; c < OC; ++c) {
          const int64_t off = (n * OC + c) * L + la;
          cpu::bn_backward_apply_plane(gp + off, op ? op + off : nullptr,
                                       training ? cp + off : nullptr, dst + c * ld, lb - la,
                                       coef[c], mean_d[c]);
        }
      };
      cpu::conv_backward<T>(s, x, w, grad_of, gi, gw, gcb);
    }
  });
  return {gi.defined() ? gi.contiguous(output_memory_format(input)) : not_requested(input),
          gw.defined() ? gw : not_requested(input),
          gcb.defined() ? gcb : not_requested(input),
          gbw,
          gbb,
          need_gr ? gr.contiguous(output_memory_format(input)) : gr};
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("conv_bn_relu", &conv_bn_relu_cpu);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward_cpu);
}

}  // namespace cnnops

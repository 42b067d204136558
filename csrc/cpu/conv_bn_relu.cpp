// conv -> BatchNorm -> (+ residual) -> ReLU in one op on the CPU, on the
// convolution core conv_core.h chooses.
//
// im2col core. Inference: BN is a per-channel scale and shift, applied (with
// residual and ReLU) to each GEMM output tile while it is still in cache.
// Training: each conv output tile also yields its per-channel mean and squared
// deviations in the GEMM epilogue, so batch statistics cost no extra pass over
// memory; one more pass normalises. The backward computes the BN gradient of
// each output tile on the fly (the conv-output gradient is never materialised
// for the whole batch) and feeds it straight to the conv backward.
//
// oneDNN core. Inference: BN folded into the weight and bias, and conv + bias
// (+ residual) + ReLU as one oneDNN primitive. Training: oneDNN's convolution,
// then one statistics pass and one apply pass; the backward writes the
// conv-output gradient once and hands it to oneDNN's backward. Every tensor
// stays in the call's layout (cnnops::conv_memory_format): the BN passes read
// channels_last as it is. (The im2col core works in NCHW.) bfloat16 runs
// here, with the BN arithmetic in float32 (statistics, BN weight and bias
// gradients float32, as aten's batch norm keeps them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_kernels.h"
#include "cnnops/bn_shape.h"
#include "conv_core.h"
#include "conv_kernels.h"

namespace cnnops {
namespace {

// The dtype the BN arithmetic runs in: the input's, float32 for bfloat16.
at::ScalarType compute_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kBFloat16 ? at::kFloat : input.scalar_type();
}

// t (undefined, or of input's dtype) contiguous in fmt, in the compute dtype.
at::Tensor in_compute_dtype(const at::Tensor& t, const at::Tensor& input,
                            at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  return t.defined() ? t.to(compute_dtype(input)).contiguous(fmt) : t;
}

// The layout a core computes in: oneDNN and Winograd the call's, im2col NCHW.
at::MemoryFormat working_format(cpu::Core core, at::MemoryFormat fmt) {
  return core == cpu::Core::Im2col ? at::MemoryFormat::Contiguous : fmt;
}

// The per-channel arguments, contiguous in the compute dtype (undefined when
// absent), and the tensors they came from.
struct BNArgs {
  at::Tensor conv_bias, weight, bias, running_mean, running_var;
  at::Tensor conv_bias_in;        // the conv bias in the input's dtype, for the convolution
  std::vector<at::Tensor> given;  // conv weight, then the five above as passed
};

// Training forward after the convolution: the batch statistics from each
// channel's moments m, then out = relu?(conv_out * scale + shift + residual?)
// over the activation in its layout.
template <typename T>
void normalise(const T* cp, const cpu::Activation& act, const std::vector<cpu::Moments>& m,
               const BNArgs& p, const T* rp, T* op, T* mean, T* invstd, double eps,
               bool relu) {
  std::vector<double> scale(act.C), shift(act.C);
  const std::vector<double> w = cpu::channel_values<T>(p.weight, act.C, 1.0),
                            b = cpu::channel_values<T>(p.bias, act.C, 0.0);
  for (int64_t c = 0; c < act.C; ++c) {
    const double is = 1.0 / std::sqrt(m[c].biased_var() + eps);
    mean[c] = static_cast<T>(m[c].mean);
    invstd[c] = static_cast<T>(is);
    scale[c] = w[c] * is;
    shift[c] = b[c] - m[c].mean * scale[c];
  }
  cpu::channel_affine(cp, rp, op, act, scale, shift, relu);
}

// Inference: BN as y * scale + shift with, per channel,
//   invstd = 1/sqrt(running_var + eps), scale = bn_weight * invstd,
//   shift = bn_bias - (running_mean - conv_bias) * scale
// (a conv bias before BN only shifts the mean it subtracts).
template <typename T>
void inference_affine(const BNArgs& p, int64_t OC, double eps, std::vector<double>& scale,
                      std::vector<double>& shift, std::vector<double>& invstd) {
  const std::vector<double> rm = cpu::channel_values<T>(p.running_mean, OC, 0.0),
                            rv = cpu::channel_values<T>(p.running_var, OC, 1.0),
                            w = cpu::channel_values<T>(p.weight, OC, 1.0),
                            b = cpu::channel_values<T>(p.bias, OC, 0.0),
                            cb = cpu::channel_values<T>(p.conv_bias, OC, 0.0);
  for (int64_t c = 0; c < OC; ++c) {
    invstd[c] = 1.0 / std::sqrt(rv[c] + eps);
    scale[c] = w[c] * invstd[c];
    shift[c] = b[c] - (rm[c] - cb[c]) * scale[c];
  }
}

// Inference on the oneDNN core: BN folded into the convolution, kept while
// the tensors it came from stay unchanged (cpu::folded_bn_cache) -> (w', b',
// invstd) with w' = weight * scale per output channel and b' = shift.
std::vector<at::Tensor> folded_bn(const at::Tensor& input, const at::Tensor& weight,
                                  const BNArgs& p, int64_t OC, double eps) {
  return cpu::folded_bn_cache().get(p.given, eps, [&] {
    std::vector<at::Tensor> f;
    AT_DISPATCH_FLOATING_TYPES(compute_dtype(input), "conv_bn_relu_cpu", [&] {
      std::vector<double> scale(OC), shift(OC), is(OC);
      inference_affine<scalar_t>(p, OC, eps, scale, shift, is);
      // (copies out of the vectors, which die here: .to(kDouble) of a float64
      // view would return the view itself)
      const auto dopts = at::TensorOptions().dtype(at::kDouble);
      const auto copy = [&](std::vector<double>& v, at::IntArrayRef size, at::ScalarType t) {
        return at::from_blob(v.data(), size, dopts).to(t, /*non_blocking=*/false, /*copy=*/true);
      };
      const at::Tensor sc = copy(scale, {OC, 1, 1, 1}, compute_dtype(input));
      f = {(weight.to(compute_dtype(input)) * sc).to(input.scalar_type()).contiguous(),
           copy(shift, {OC}, input.scalar_type()), copy(is, {OC}, compute_dtype(input))};
    });
    return f;
  });
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// stats: whether the caller takes the statistics (in inference they are
// undefined without it: conv_bn_relu_inference, conv_bn_relu_into_residual).
// into (inference only; undefined otherwise): the residual, which the output
// may overwrite (conv_bn_relu_into_residual). Where the core writes its output
// in place, the output returned is `into` itself.
Forward forward(cpu::Core core, const ConvShape& s, const at::Tensor& input,
                const at::Tensor& weight, const BNArgs& p, const at::Tensor& residual_in,
                const ConvArgs& args, bool training, double eps, bool relu, bool stats = true,
                const at::Tensor& into = at::Tensor()) {
  const int64_t L = s.L(), OC = s.OC;
  const bool im2col = core == cpu::Core::Im2col;
  const at::MemoryFormat fmt = conv_memory_format(input, weight);
  const auto stat_opts = input.options().dtype(compute_dtype(input));

  if (!training && core != cpu::Core::Im2col) {
    // BN folded into the weight and bias; conv + bias (+ residual) + ReLU in one
    // oneDNN primitive, or in the Winograd core's GEMMs and output transform.
    const std::vector<at::Tensor> folded = folded_bn(input, weight, p, OC, eps);
    // (`into` comes only with stats off)
    at::Tensor out;
    if (core == cpu::Core::Winograd) {
      out = cpu::winograd_conv_relu(s, input, folded[0], folded[1], residual_in, relu, fmt, into);
    } else if (into.defined() && into.scalar_type() == at::kFloat && into.is_contiguous(fmt)) {
      out = into;
      cpu::onednn_conv_relu_into(out, input, folded[0], folded[1], relu, args, fmt);
    } else {
      out = cpu::onednn_conv_relu(input, folded[0], folded[1], residual_in, relu, args, fmt);
    }
    if (!stats) return {out, at::Tensor(), at::Tensor(), at::Tensor()};
    return {out, at::empty({0}, input.options()), p.running_mean.to(stat_opts, false, true),
            folded[2].clone()};
  }

  const bool make_stats = training || stats;
  at::Tensor mean = make_stats ? at::empty({OC}, stat_opts) : at::Tensor(),
             invstd = make_stats ? at::empty({OC}, stat_opts) : at::Tensor();

  // oneDNN and Winograd read the input in any layout; im2col wants it NCHW.
  const at::MemoryFormat work = working_format(core, fmt);
  const at::Tensor x = im2col ? input.contiguous() : input;
  const at::Tensor w = im2col ? weight.contiguous() : weight;
  const at::Tensor residual = in_compute_dtype(residual_in, input, work);
  // (the im2col epilogue reads each residual element before it writes that
  // output element: in inference it writes over a residual it may reuse)
  at::Tensor out = !training && into.defined() && into.is_same(residual)
                       ? into
                       : at::empty({s.N, OC, s.OH, s.OW}, stat_opts.memory_format(work));
  at::Tensor conv_out;  // training: the conv output (+ conv bias), saved for backward
  AT_DISPATCH_FLOATING_TYPES(compute_dtype(input), "conv_bn_relu_cpu", [&] {
    using T = scalar_t;
    const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    const T* cbp = p.conv_bias.defined() ? p.conv_bias.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    if (!training) {  // im2col: the BN affine in the GEMM epilogue
      std::vector<double> scale(OC), shift(OC), is(OC);
      inference_affine<T>(p, OC, eps, scale, shift, is);
      std::vector<T> sc(scale.begin(), scale.end()), sh(shift.begin(), shift.end());
      cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y,
                                        int64_t ld) {
        for (int64_t c = 0; c < OC; ++c) {
          const int64_t off = (n * OC + c) * L + la;
          cpu::bn_forward_plane(y + c * ld, rp ? rp + off : nullptr, op + off, lb - la, sc[c],
                                sh[c], relu);
        }
      });
      if (stats) {
        mean.copy_(p.running_mean);
        std::copy(is.begin(), is.end(), invstd.mutable_data_ptr<T>());
      }
      return;
    }
    // Each channel's moments: one pass over oneDNN's or Winograd's output, or
    // (im2col) from each (image, channel) pair's moments taken in the GEMM
    // epilogue, tile by tile in position order while each tile is hot, merged
    // in image order.
    std::vector<cpu::Moments> m(OC);
    at::Tensor cf;  // conv_out in T
    if (!im2col) {
      conv_out = core == cpu::Core::Winograd
                     ? cpu::winograd_conv_relu(s, x, w, p.conv_bias_in, at::Tensor(),
                                               /*relu=*/false, fmt)
                     : aten_conv(x, w, p.conv_bias_in, args, fmt);
      cf = in_compute_dtype(conv_out, input, fmt);
      m = cpu::channel_moments(cf.const_data_ptr<T>(), cpu::Activation(cf, fmt));
    } else {
      std::vector<cpu::Moments> tile(s.N * OC);
      conv_out = cf = at::empty({s.N, OC, s.OH, s.OW}, input.options());
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
        for (int64_t n = 0; n < s.N; ++n) m[c].merge(tile[n * OC + c]);
      }
    }
    normalise<T>(cf.const_data_ptr<T>(), cpu::Activation(cf, work), m, p, rp, op,
                 mean.mutable_data_ptr<T>(), invstd.mutable_data_ptr<T>(), eps, relu);
  });
  // conv_out, saved for the backward, is in the call's layout whichever core ran (the
  // fake kernel's rule): a copy on the im2col core's channels_last calls only.
  conv_out = training ? conv_out.contiguous(fmt) : at::empty({0}, input.options());
  return {out.to(input.scalar_type()).contiguous(fmt), conv_out, mean, invstd};
}

// A conv_bn_relu call's arguments, checked: the shape, the per-channel
// arguments, the layout and the convolution geometry.
struct Call {
  ConvShape s;
  BNArgs p;
  at::MemoryFormat fmt;
  ConvArgs args;
};

Call check_call(const at::Tensor& input, const at::Tensor& weight,
                const c10::optional<at::Tensor>& conv_bias_opt,
                const c10::optional<at::Tensor>& bn_weight_opt,
                const c10::optional<at::Tensor>& bn_bias_opt,
                const c10::optional<at::Tensor>& running_mean_opt,
                const c10::optional<at::Tensor>& running_var_opt, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                bool training, double eps) {
  const ConvShape s = conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  check_cpu_conv(input, "input");
  const auto given = [](const c10::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); };
  const at::Tensor cbias = optional_channel(conv_bias_opt, input, s.OC, "conv_bias");
  const BNParams bn =
      check_bn_params("conv_bn_relu", input, s.OC, running_mean_opt, running_var_opt,
                      bn_weight_opt, bn_bias_opt, training, eps, "bn_weight", "bn_bias");
  return {s,
          {in_compute_dtype(cbias, input),
           bn.weight,
           bn.bias,
           bn.running_mean,
           bn.running_var,
           cbias,
           {weight, given(conv_bias_opt), given(bn_weight_opt), given(bn_bias_opt),
            given(running_mean_opt), given(running_var_opt)}},
          // (in the input's layout: the oneDNN core reads it so; the other paths make it NCHW)
          conv_memory_format(input, weight),
          {stride, padding, dilation, groups}};
}

cpu::CoreKey forward_key(const Call& c, const at::Tensor& input, bool training, bool relu,
                         bool residual) {
  return cpu::CoreKey("conv_bn_relu", c.s, input, c.fmt,
                      {{"train", training}, {"relu", relu}, {"residual", residual},
                       {"conv_bias", c.p.conv_bias.defined()}},
                      /*winograd=*/true);
}

}  // namespace

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
  const Call c = check_call(input, weight, conv_bias_opt, bn_weight_opt, bn_bias_opt,
                            running_mean_opt, running_var_opt, stride, padding, dilation, groups,
                            training, eps);
  const at::Tensor residual = conv_residual(residual_opt, input, c.s, c.fmt);
  return cpu::with_core(forward_key(c, input, training, relu, residual.defined()),
                        [&](cpu::Core core) {
                          return forward(core, c.s, input, weight, c.p, residual, c.args,
                                         training, eps, relu);
                        });
}

at::Tensor conv_bn_relu_inference_cpu(const at::Tensor& input, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& conv_bias_opt,
                                      const c10::optional<at::Tensor>& bn_weight_opt,
                                      const c10::optional<at::Tensor>& bn_bias_opt,
                                      const at::Tensor& running_mean,
                                      const at::Tensor& running_var,
                                      const c10::optional<at::Tensor>& residual_opt,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, double eps,
                                      bool relu) {
  const Call c = check_call(input, weight, conv_bias_opt, bn_weight_opt, bn_bias_opt,
                            running_mean, running_var, stride, padding, dilation, groups,
                            /*training=*/false, eps);
  const at::Tensor residual = conv_residual(residual_opt, input, c.s, c.fmt);
  return std::get<0>(cpu::with_core(
      forward_key(c, input, /*training=*/false, relu, residual.defined()), [&](cpu::Core core) {
        return forward(core, c.s, input, weight, c.p, residual, c.args, /*training=*/false, eps,
                       relu, /*stats=*/false);
      }));
}

void conv_bn_relu_into_residual_cpu(const at::Tensor& residual, const at::Tensor& input,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& conv_bias_opt,
                                    const c10::optional<at::Tensor>& bn_weight_opt,
                                    const c10::optional<at::Tensor>& bn_bias_opt,
                                    const at::Tensor& running_mean,
                                    const at::Tensor& running_var, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, double eps, bool relu) {
  const Call c = check_call(input, weight, conv_bias_opt, bn_weight_opt, bn_bias_opt,
                            running_mean, running_var, stride, padding, dilation, groups,
                            /*training=*/false, eps);
  check_conv_residual(residual, input, c.s);
  TORCH_CHECK_VALUE(!residual.is_alias_of(input), "conv_bn_relu_into_residual: the residual "
                    "shares memory with the input, which the result would overwrite");
  const cpu::CoreKey key = forward_key(c, input, /*training=*/false, relu, /*residual=*/true);
  const auto run = [&](cpu::Core core, const at::Tensor& into) {
    return std::get<0>(forward(core, c.s, input, weight, c.p, residual, c.args,
                               /*training=*/false, eps, relu, /*stats=*/false, into));
  };
  // The core is measured (auto mode, a configuration's first call) on runs that
  // leave the residual as it is; once it is settled, the core writes into it.
  at::Tensor out;
  cpu::CoreChoice fixed;
  if (const cpu::CoreChoice* settled = cpu::settled_choice(key, fixed)) {
    cpu::trace_call(key, *settled);
    out = run(settled->core, residual);
  } else {
    out = cpu::with_core(key, [&](cpu::Core core) { return run(core, at::Tensor()); });
  }
  if (!out.is_same(residual)) {  // (the core wrote into it: nothing to copy)
    at::Tensor dst = residual;
    dst.copy_(out);
  }
}

namespace {

using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct BackwardArgs {
  const at::Tensor &grad_output, &output, &input, &weight, &conv_output, &mean, &invstd;
  const BNArgs& p;
  bool training, relu;
  std::array<bool, 6> mask;
};

Backward backward(cpu::Core core, const ConvShape& s, const BackwardArgs& a,
                  const ConvArgs& args) {
  const at::Tensor& input = a.input;
  const int64_t L = s.L(), OC = s.OC;
  const bool im2col = core == cpu::Core::Im2col;
  const bool need_gi = a.mask[0], need_gw = a.mask[1], need_gcb = a.mask[2],
             need_gbw = a.mask[3] && a.p.weight.defined(), need_gbb = a.mask[4],
             need_gr = a.mask[5];
  const auto copts = input.options().dtype(compute_dtype(input));
  const at::MemoryFormat fmt = conv_memory_format(input, a.weight);
  const at::MemoryFormat work = working_format(core, fmt);
  const at::Tensor x = im2col ? input.contiguous() : input;
  const at::Tensor w = im2col ? a.weight.contiguous() : a.weight;
  const at::Tensor g = in_compute_dtype(a.grad_output, input, work);
  const at::Tensor o = a.relu ? in_compute_dtype(a.output, input, work) : at::Tensor();
  // The normalised activations' source: saved in training; recomputed in
  // inference only when the BN weight gradient needs it.
  at::Tensor co;
  if (a.training) {
    co = in_compute_dtype(a.conv_output, input, work);
  } else if (need_gbw && !im2col) {
    co = in_compute_dtype(aten_conv(x, w, a.p.conv_bias_in, args, fmt), input, work);
  } else if (need_gbw) {
    co = at::empty({s.N, OC, s.OH, s.OW}, input.options());
  }
  at::Tensor gi, gw, gcb;
  if (im2col) {
    gi = need_gi ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
    gw = need_gw ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::Tensor();
    gcb = need_gcb ? at::empty({OC}, input.options()) : at::Tensor();
  }
  at::Tensor gbw = need_gbw ? at::empty({OC}, copts) : not_requested(input);
  at::Tensor gbb = need_gbb ? at::empty({OC}, copts) : not_requested(input);
  at::Tensor gr = need_gr ? at::empty_like(g) : not_requested(input);

  AT_DISPATCH_FLOATING_TYPES(compute_dtype(input), "conv_bn_relu_backward_cpu", [&] {
    using T = scalar_t;
    if (!a.training && need_gbw && im2col) {
      const T* cbp = a.p.conv_bias.defined() ? a.p.conv_bias.const_data_ptr<T>() : nullptr;
      T* cop = co.mutable_data_ptr<T>();
      cpu::conv_forward<T>(s, x, w, [&](int64_t n, int64_t la, int64_t lb, const T* y,
                                        int64_t ld) {
        cpu::copy_channel_bias(y, ld, cop + n * OC * L + la, L, cbp, OC, lb - la);
      });
    }
    const cpu::Activation act(g, work);
    const T* gp = g.const_data_ptr<T>();
    const T* op = o.defined() ? o.const_data_ptr<T>() : nullptr;
    const T* cp = co.defined() ? co.const_data_ptr<T>() : nullptr;
    const std::vector<double> mean_d = cpu::channel_values<T>(a.mean, OC, 0.0),
                              is = cpu::channel_values<T>(a.invstd, OC, 1.0),
                              bn_w = cpu::channel_values<T>(a.p.weight, OC, 1.0);
    std::vector<double> sum_gy(OC, 0.0), sum_gy_xc(OC, 0.0);
    if (a.training || need_gbw || need_gbb) {
      cpu::channel_grad_sums(gp, op, cp, act, mean_d, sum_gy, sum_gy_xc);
    }
    std::vector<cpu::BNBackwardCoef> coef(OC);
    T* gbwp = need_gbw ? gbw.mutable_data_ptr<T>() : nullptr;
    T* gbbp = need_gbb ? gbb.mutable_data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < OC; ++c) {
      if (gbwp) gbwp[c] = static_cast<T>(sum_gy_xc[c] * is[c]);
      if (gbbp) gbbp[c] = static_cast<T>(sum_gy[c]);
      coef[c] = cpu::bn_backward_coef(a.training, bn_w[c], is[c], sum_gy[c], sum_gy_xc[c],
                                      act.rows());
    }
    if (need_gr) cpu::relu_grad_all(gp, op, gr.mutable_data_ptr<T>(), g.numel());
    if (!(need_gi || need_gw || need_gcb)) return;
    const T* xn = a.training ? cp : nullptr;  // BN's input, read by the training gradient
    if (im2col) {
      // The conv-output gradient of image n at positions [la, lb), channel c at
      // dst[c*ld + j], computed tile by tile inside the conv backward.
      auto grad_of = [&](int64_t n, int64_t la, int64_t lb, T* dst, int64_t ld) {
        for (int64_t c = 0; c < OC; ++c) {
          const int64_t off = (n * OC + c) * L + la;
          cpu::bn_backward_apply_plane(gp + off, op ? op + off : nullptr,
                                       xn ? xn + off : nullptr, dst + c * ld, lb - la,
                                       coef[c], mean_d[c]);
        }
      };
      cpu::conv_backward<T>(s, x, w, grad_of, gi, gw, gcb);
      return;
    }
    at::Tensor gconv = at::empty_like(g);
    cpu::channel_grad_apply(gp, op, xn, gconv.mutable_data_ptr<T>(), act, coef, mean_d);
    const std::array<bool, 3> mask{need_gi, need_gw, need_gcb};
    std::tie(gi, gw, gcb) =
        core == cpu::Core::Winograd
            ? cpu::winograd_conv_backward(s, gconv, x, w, args, fmt, mask)
            : aten_conv_backward(gconv.to(input.scalar_type()), x, w, args, fmt, mask);
  });
  return {gi.defined() ? gi.contiguous(fmt) : not_requested(input),
          gw.defined() ? gw.contiguous(weight_grad_memory_format(a.weight)) : not_requested(input),
          gcb.defined() ? gcb : not_requested(input),
          gbw,
          gbb,
          need_gr ? gr.to(input.scalar_type()).contiguous(fmt) : gr};
}

}  // namespace

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
  check_cpu_conv(input, "input");
  const at::Tensor cbias = check_conv_bn_relu_backward(grad_output, output, input, conv_bias_opt,
                                                       conv_output, s, training);
  const BNSaved saved =
      check_bn_saved(input, s.OC, bn_weight_opt, save_mean, save_invstd, "bn_weight");
  const at::Tensor &mean = saved.mean, &invstd = saved.invstd;
  const BNArgs p{in_compute_dtype(cbias, input), saved.weight, {}, {}, {}, cbias, {}};
  const BackwardArgs a{grad_output, output, input, weight, conv_output, mean, invstd,
                       p, training, relu, output_mask};
  const ConvArgs args{stride, padding, dilation, groups};
  const cpu::CoreKey key("conv_bn_relu_backward", s, input, conv_memory_format(input, weight),
                         {{"train", training}, {"relu", relu},
                          {"conv_bias", p.conv_bias.defined()},
                          {"grad_input", output_mask[0]}, {"grad_weight", output_mask[1]},
                          {"grad_conv_bias", output_mask[2]}, {"grad_bn_weight", output_mask[3]},
                          {"grad_bn_bias", output_mask[4]}, {"grad_residual", output_mask[5]}},
                         /*winograd=*/output_mask[0] && cpu::winograd_runs_input_grad(s));
  return cpu::with_core(key, [&](cpu::Core core) {
    return backward(core, s, a, args);
  });
}

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("conv_bn_relu", &conv_bn_relu_cpu);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward_cpu);
  m.impl("conv_bn_relu_inference", &conv_bn_relu_inference_cpu);
  m.impl("conv_bn_relu_into_residual", &conv_bn_relu_into_residual_cpu);
}

}  // namespace cnnops

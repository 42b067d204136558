// Checks and shape helpers shared by every device file.
//
// Kernels check what they rely on before touching memory: the Python layer
// validates user input with friendlier messages, but the ops are public
// (torch.ops.cnnops.*) and must never crash the process on bad arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace cnnops {

// Output layout rule of every op: channels_last in, channels_last out;
// anything else (contiguous, sliced, strided) gives an NCHW-contiguous output.
// The fake kernels in cnnops/ops.py apply the same rule.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() &&
      t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// A convolution's output layout (and its input gradient's): the rule above,
// and also channels_last when the weight suggests it, as PyTorch's CPU
// convolutions decide. So a model moved with .to(memory_format=channels_last)
// gets channels_last activations from its first layer on, even from an NCHW
// input with one channel (which reads as both layouts). The fake kernels in
// cnnops/ops.py apply the same rule (_conv_fmt).
inline at::MemoryFormat conv_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  if (output_memory_format(input) == at::MemoryFormat::ChannelsLast ||
      (weight.defined() && weight.dim() == 4 &&
       weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// A convolution's weight gradient's layout: the weight's own, as autograd
// stores it in .grad (AccumulateGrad copies a gradient of another layout), so
// a gradient reaches .grad without a copy. The fake kernels in cnnops/ops.py
// apply the same rule (cnnops/_shapes.py, weight_grad_memory_format).
inline at::MemoryFormat weight_grad_memory_format(const at::Tensor& weight) {
  return weight.suggest_memory_format();
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == 4, "expected ", name,
                    " to be 4-D [N, C, H, W], got ", t.dim(), "-D with shape ",
                    t.sizes());
}

// The CPU kernels are written for float32 and float64.
inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "expected ", name,
                    " on the CPU, got a tensor on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "the cnnops CPU kernels support float32 and float64; ", name,
                   " has dtype ", t.scalar_type());
}

// The CPU convolutions also take bfloat16, which their oneDNN core runs
// (csrc/cpu/conv_core.h checks the dtype against the core chosen).
inline void check_cpu_conv(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "expected ", name,
                    " on the CPU, got a tensor on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kBFloat16,
                   "the cnnops CPU convolutions support float32, float64 and bfloat16; ", name,
                   " has dtype ", t.scalar_type());
}

// `t` (when defined) must share dtype and device with `like`.
inline void check_same(const at::Tensor& t, const at::Tensor& like,
                       const char* name, const char* like_name) {
  if (!t.defined()) return;
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "expected ", name,
                   " to have the dtype of ", like_name, " (", like.scalar_type(),
                   "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "expected ", name,
                    " on the device of ", like_name, " (", like.device(),
                    "), got ", t.device());
}

// A tensor of a given shape, with the dtype and device of `like`.
inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name,
                        const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  check_same(t, like, name, like_name);
  TORCH_CHECK_VALUE(t.sizes() == shape, "expected ", name, " of shape ", shape, ", got ",
                    t.sizes());
}

// The shape of `like`, exactly (the elementwise ops take tensors of any rank).
inline void check_same_shape(const char* op, const at::Tensor& t, const at::Tensor& like,
                             const char* name, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": expected ", name, " to have the shape of ",
                    like_name, " ", like.sizes(), ", got ", t.sizes());
}

// A tensor check of one device: raises unless t suits that device's kernels
// (check_cpu_float, gpu::check_cuda_float). The shared checks of an op family
// (pool_shape.h, bn_shape.h) take it for the input.
using DeviceCheck = void (*)(const at::Tensor& t, const char* name);

// A per-channel vector ([C]) when defined.
inline void check_channel_vector(const at::Tensor& t, int64_t channels,
                                 const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, "expected ", name,
                    " of shape [", channels, "], got ", t.sizes());
}

// An optional per-channel tensor argument: checked against `like` and made
// contiguous; undefined when absent.
inline at::Tensor optional_channel(const c10::optional<at::Tensor>& t, const at::Tensor& like,
                                   int64_t channels, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same(*t, like, name, "input");
  check_channel_vector(*t, channels, name);
  return t->contiguous();
}

// The dtype of BN statistics and accumulators for activations of dtype `t`
// (the save_mean / save_invstd dtype of the BN ops).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// An optional per-channel BN tensor (weight, bias, running statistics, saved
// statistics): [C] on input's device, of input's dtype or, for a
// float16/bfloat16 input, float32 (mixed precision, as torch's batch_norm and
// autocast produce). Returned contiguous in the accumulation dtype, so that
// the kernels read every per-channel value in it; undefined when absent.
// (A conv bias is a convolution argument: optional_channel, input's dtype.)
inline at::Tensor bn_channel_param(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                                   int64_t channels, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const auto in_type = input.scalar_type();
  const auto type = t->scalar_type();
  TORCH_CHECK_TYPE(type == in_type || (is_reduced(in_type) && type == at::kFloat), "expected ",
                   name, " to have the dtype of input (", in_type, ")",
                   is_reduced(in_type) ? " or float32" : "", ", got ", type);
  TORCH_CHECK_VALUE(t->device() == input.device(), "expected ", name, " on the device of input (",
                    input.device(), "), got ", t->device());
  check_channel_vector(*t, channels, name);
  return t->to(acc_dtype(in_type)).contiguous();
}

// An int[2] argument whose entries lie in [min_value, 2^31 - 1]. The upper
// bound keeps products such as dilation * (kernel - 1) far from overflow.
inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  TORCH_CHECK_VALUE(v.size() == 2, "expected ", name, " to have 2 entries, got ",
                    v.size());
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, "expected ", name, " >= ",
                    min_value, ", got ", v);
  TORCH_CHECK_VALUE(v[0] <= kMax && v[1] <= kMax, "expected ", name, " <= ", kMax, ", got ", v);
}

// The arguments of update_running_stats: save_mean / save_invstd [C] of one
// floating dtype; running_mean / running_var (each optional) [C] of any
// floating dtype, on their device. Returns C.
inline int64_t check_running_stats_update(const c10::optional<at::Tensor>& running_mean,
                                          const c10::optional<at::Tensor>& running_var,
                                          const at::Tensor& save_mean,
                                          const at::Tensor& save_invstd, int64_t count) {
  TORCH_CHECK_VALUE(save_mean.dim() == 1, "expected save_mean to be 1-D [C], got shape ",
                    save_mean.sizes());
  const int64_t C = save_mean.size(0);
  check_channel_vector(save_invstd, C, "save_invstd");
  check_same(save_invstd, save_mean, "save_invstd", "save_mean");
  TORCH_CHECK_TYPE(at::isFloatingType(save_mean.scalar_type()),
                   "expected floating-point save_mean, got ", save_mean.scalar_type());
  TORCH_CHECK_VALUE(count >= 0, "expected count >= 0, got ", count);
  for (const auto* t : {&running_mean, &running_var}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const char* name = t == &running_mean ? "running_mean" : "running_var";
    check_channel_vector(**t, C, name);
    TORCH_CHECK_TYPE(at::isFloatingType((*t)->scalar_type()), "expected floating-point ", name,
                     ", got ", (*t)->scalar_type());
    TORCH_CHECK_VALUE((*t)->device() == save_mean.device(), "expected ", name,
                      " on the device of save_mean (", save_mean.device(), "), got ",
                      (*t)->device());
  }
  return C;
}

// One channel's running statistics update (see update_running_stats in
// csrc/cnnops.cpp), in double.
struct RunningStatsUpdate {
  double keep, momentum, eps, unbias;
  RunningStatsUpdate(int64_t count, double momentum, double eps)
      : keep(1.0 - momentum), momentum(momentum), eps(eps),
        unbias(count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0) {}
  C10_HOST_DEVICE double mean(double running, double batch_mean) const {
    return keep * running + momentum * batch_mean;
  }
  C10_HOST_DEVICE double var(double running, double batch_invstd) const {
    double v = 1.0 / (batch_invstd * batch_invstd) - eps;
    return keep * running + momentum * (v > 0.0 ? v : 0.0) * unbias;
  }
};

// Division rounding toward negative infinity (C++ '/' truncates toward zero).
inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// floor((in + 2p - d(k-1) - 1) / s) + 1, the convolution output size.
inline int64_t conv_output_size(int64_t in, int64_t k, int64_t pad,
                                int64_t stride, int64_t dil) {
  return floor_div(in + 2 * pad - dil * (k - 1) - 1, stride) + 1;
}

// PyTorch's pooling output size: like convolution, optionally rounded up, but
// a window that would start in the right padding is dropped.
inline int64_t pool_output_size(int64_t in, int64_t k, int64_t pad,
                                int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
  int64_t out = floor_div(span + (ceil_mode ? stride - 1 : 0), stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// An empty tensor standing for a gradient that was not requested.
inline at::Tensor not_requested(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

}  // namespace cnnops

// GPU convolution: cuDNN's (through ATen), with cnnops' fusions around it,
// shared by conv2d.cu and conv_bn_relu.cu.
//
// cuDNN's implicit-GEMM convolutions run near the machine's limit; an explicit
// im2col on the GPU measured 3-10x slower (bench/results/h200-2026-12-04). So
// the convolution is at::convolution / at::convolution_backward, which pick
// cuDNN's kernels and honour torch.backends.cudnn (benchmark, deterministic,
// allow_tf32) as eager PyTorch does, and cnnops does less around it:
//  * inference conv -> BN (-> + residual) -> ReLU folds BN into the weight and
//    bias (one small kernel, fold_bn_kernel) and runs conv + bias (+ residual)
//    + ReLU as one cuDNN call (cudnn_convolution_relu / _add_relu, cuDNN's
//    runtime fusion engines); where cuDNN refuses that call, its convolution
//    and one cnnops epilogue pass;
//  * training and the backward put cnnops' BN kernels (bn_kernels.cuh) between
//    cuDNN's forward and its dgrad / wgrad.
//
// Layouts: the output follows cnnops::conv_memory_format (channels_last when
// the input or the weight is; NCHW otherwise); see cnnops/aten_conv.h, which calls
// ATen's convolution for this file and for the CPU backend's oneDNN core.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <tuple>

#include "bn_kernels.cuh"
#include "cnnops/aten_conv.h"
#include "cnnops/conv_shape.h"

namespace cnnops {
namespace gpu {

// ---- inference: BN folded into the convolution --------------------------------

// Per output channel oc, with invstd = 1/sqrt(running_var + eps) and
// scale = bn_weight * invstd:
//   w'[oc, ...] = w[oc, ...] * scale
//   b'[oc]      = (conv_bias - running_mean) * scale + bn_bias
// w and w' are dense [OC, K] in memory order (NCHW- or channels_last-
// contiguous: output channels outermost either way); one thread per weight
// element, the first of each channel also writing b' (in x's dtype and in
// acc_t) and the statistics the op returns. conv_bias, bn_weight and bn_bias
// may be null.
template <typename scalar_t, typename acc_t>
__global__ void fold_bn_kernel(const scalar_t* __restrict__ w, int64_t OC, int64_t K,
                               const acc_t* __restrict__ running_mean,
                               const acc_t* __restrict__ running_var,
                               const acc_t* __restrict__ bn_weight,
                               const acc_t* __restrict__ bn_bias,
                               const acc_t* __restrict__ conv_bias, double eps,
                               scalar_t* __restrict__ w_out, scalar_t* __restrict__ b_out,
                               acc_t* __restrict__ shift, acc_t* __restrict__ save_mean,
                               acc_t* __restrict__ save_invstd) {
  const int64_t total = OC * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oc = i / K;
    const acc_t invstd = acc_t(1) / device_sqrt(running_var[oc] + static_cast<acc_t>(eps));
    const acc_t scale = (bn_weight != nullptr ? bn_weight[oc] : acc_t(1)) * invstd;
    w_out[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * scale);
    if (i - oc * K == 0) {
      const acc_t mean = running_mean[oc];
      const acc_t b = ((conv_bias != nullptr ? conv_bias[oc] : acc_t(0)) - mean) * scale +
                      (bn_bias != nullptr ? bn_bias[oc] : acc_t(0));
      b_out[oc] = static_cast<scalar_t>(b);
      shift[oc] = b;
      save_mean[oc] = mean;
      save_invstd[oc] = invstd;
    }
  }
}

struct FoldedBN {
  at::Tensor weight, bias;         // w' (layout fmt), b' (x's dtype)
  at::Tensor shift;                // b' in acc dtype, for the epilogue fallback
  at::Tensor save_mean, save_invstd;
};

// Per-channel tensors: acc dtype, contiguous [OC] (bn_channel_param's).
inline FoldedBN fold_bn(const at::Tensor& weight, at::MemoryFormat fmt,
                        const at::Tensor& running_mean, const at::Tensor& running_var,
                        const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                        const at::Tensor& conv_bias, double eps) {
  const at::Tensor w = weight.contiguous(fmt);
  const int64_t OC = w.size(0), K = OC > 0 ? w.numel() / OC : 0;
  const auto acc_opts = w.options().dtype(acc_dtype(w.scalar_type()));
  FoldedBN f;
  f.weight = at::empty_like(w);
  f.bias = at::empty({OC}, w.options());
  f.shift = at::empty({OC}, acc_opts);
  f.save_mean = at::empty({OC}, acc_opts);
  f.save_invstd = at::empty({OC}, acc_opts);
  if (w.numel() == 0) return f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cnnops_fold_bn", [&] {
    using acc_t = acc_type<scalar_t>;
    fold_bn_kernel<scalar_t, acc_t><<<grid_for(OC * K, kThreads), kThreads, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
        w.const_data_ptr<scalar_t>(), OC, K, running_mean.const_data_ptr<acc_t>(),
        running_var.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(bn_weight),
        ptr_or_null<acc_t>(bn_bias), ptr_or_null<acc_t>(conv_bias), eps,
        f.weight.mutable_data_ptr<scalar_t>(), f.bias.mutable_data_ptr<scalar_t>(),
        f.shift.mutable_data_ptr<acc_t>(), f.save_mean.mutable_data_ptr<acc_t>(),
        f.save_invstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return f;
}

// ---- conv + bias (+ residual) (+ ReLU) ------------------------------------------

// cuDNN's fused conv + bias (+ add) + ReLU is tried when cuDNN is enabled
// (torch.backends.cudnn.enabled) and for these dtypes: its runtime fusion
// engines do not take float64. CNNOPS_CUDNN_FUSION=0 turns it off (every call
// then takes the fallback; the tests use it to cover that path).
inline bool try_cudnn_fusion(at::ScalarType t) {
  const char* env = std::getenv("CNNOPS_CUDNN_FUSION");
  return t != at::kDouble && at::globalContext().userEnabledCuDNN() &&
         !(env != nullptr && std::strcmp(env, "0") == 0);
}

// Configurations cuDNN refused the fused call for, so that each is tried once
// per process: (dtype, channels_last, grouped, with a residual).
class RefusedFusions {
 public:
  using Key = std::tuple<int, bool, bool, bool>;
  bool contains(const Key& k) {
    std::lock_guard<std::mutex> lock(mutex_);
    return refused_.count(k) > 0;
  }
  void add(const Key& k) {
    std::lock_guard<std::mutex> lock(mutex_);
    refused_.insert(k);
  }

 private:
  std::mutex mutex_;
  std::set<Key> refused_;
};

inline RefusedFusions& refused_fusions() {
  static RefusedFusions r;
  return r;
}

// relu?(conv(x, w) + bias + residual?) in layout fmt.
//   bias: x's dtype (what cuDNN's fused call takes), or undefined;
//   shift: the same bias in acc dtype (what the fallback epilogue adds), or
//          undefined when bias is;
//   residual: undefined or of the output's shape, in fmt.
// With a ReLU: one fused cuDNN call where cuDNN takes it; otherwise (no ReLU,
// float64, or a refused configuration) cuDNN's convolution and one epilogue
// pass in place over its output.
inline at::Tensor conv_bias_relu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                 const at::Tensor& shift, const at::Tensor& residual, bool relu,
                                 const ConvArgs& a, at::MemoryFormat fmt) {
  if (relu && try_cudnn_fusion(x.scalar_type())) {
    const RefusedFusions::Key key{static_cast<int>(x.scalar_type()),
                                  fmt == at::MemoryFormat::ChannelsLast, a.groups > 1,
                                  residual.defined()};
    if (!refused_fusions().contains(key)) {
      const at::Tensor wf = w.contiguous(fmt);
      const c10::optional<at::Tensor> b =
          bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
      try {
        at::Tensor y = residual.defined()
                           ? at::cudnn_convolution_add_relu(x, wf, residual, at::Scalar(1.0), b,
                                                            a.stride, a.padding, a.dilation,
                                                            a.groups)
                           : at::cudnn_convolution_relu(x, wf, b, a.stride, a.padding,
                                                        a.dilation, a.groups);
        return y.contiguous(fmt);
      } catch (const c10::OutOfMemoryError&) {
        throw;  // not a refusal: the fallback would need the memory too
      } catch (const std::exception&) {
        // No engine for this configuration (cuDNN's errors come as c10::Error, its
        // frontend's as std::runtime_error): remember, and take the fallback.
        refused_fusions().add(key);
      }
    }
  }
  at::Tensor y = aten_conv(x, w, at::Tensor(), a, fmt);
  if (y.numel() == 0 || !(shift.defined() || residual.defined() || relu)) return y;
  const int64_t N = y.size(0), OC = y.size(1), L = y.size(2) * y.size(3);
  const ActView v = fmt == at::MemoryFormat::ChannelsLast ? rows_view(N, OC, L)
                                                          : nchw_view(N, OC, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "cnnops_conv_epilogue", [&] {
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    launch_apply<scalar_t>(yp, v, ptr_or_null<scalar_t>(residual), v, yp, v, nullptr, nullptr,
                           ptr_or_null<acc_type<scalar_t>>(shift), relu);
  });
  return y;
}

}  // namespace gpu
}  // namespace cnnops

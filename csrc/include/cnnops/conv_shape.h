// Convolution geometry, checked once, shared by the CPU and CUDA kernels.
#pragma once

#include "cnnops/common.h"

namespace cnnops {

// Sizes of one conv2d call. The GEMM view used by every backend:
// per image and group, out[OCg, L] = weight[OCg, K] @ cols[K, L],
// where K = Cg*KH*KW and L = OH*OW.
struct ConvShape {
  int64_t N, C, H, W;       // input
  int64_t OC, KH, KW;       // weight [OC, C/groups, KH, KW]
  int64_t OH, OW;           // output
  int64_t sh, sw, ph, pw, dh, dw, groups;

  int64_t Cg() const { return C / groups; }
  int64_t OCg() const { return OC / groups; }
  int64_t K() const { return Cg() * KH * KW; }
  int64_t L() const { return OH * OW; }
  // A 1x1, stride-1, unpadded conv reads its input as the column matrix.
  bool pointwise() const {
    return KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  }
};

// Validates a conv2d call (input, weight, optional bias) and returns its shape.
inline ConvShape conv_shape(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  check_4d(input, "input");
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 4,
                    "expected weight to be 4-D [out_channels, in_channels/groups, "
                    "kH, kW], got shape ", weight.sizes());
  check_same(weight, input, "weight", "input");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, "expected groups >= 1, got ", groups);

  ConvShape s;
  s.N = input.size(0); s.C = input.size(1); s.H = input.size(2); s.W = input.size(3);
  s.OC = weight.size(0); s.KH = weight.size(2); s.KW = weight.size(3);
  s.sh = stride[0]; s.sw = stride[1];
  s.ph = padding[0]; s.pw = padding[1];
  s.dh = dilation[0]; s.dw = dilation[1];
  s.groups = groups;

  TORCH_CHECK_VALUE(s.C % groups == 0, "in_channels (", s.C,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(s.OC % groups == 0 && s.OC > 0, "out_channels (", s.OC,
                    ") must be positive and divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == s.C, "expected weight of shape [",
                    s.OC, ", ", s.C / groups, ", kH, kW] for input with ", s.C,
                    " channels and groups=", groups, ", got weight of shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(s.KH > 0 && s.KW > 0, "expected a non-empty kernel, got weight of shape ",
                    weight.sizes());
  s.OH = conv_output_size(s.H, s.KH, s.ph, s.sh, s.dh);
  s.OW = conv_output_size(s.W, s.KW, s.pw, s.sw, s.dw);
  TORCH_CHECK_VALUE(s.OH > 0 && s.OW > 0, "input of spatial size (", s.H, ", ", s.W,
                    ") with padding ", padding, " is smaller than the dilated kernel (",
                    s.dh * (s.KH - 1) + 1, ", ", s.dw * (s.KW - 1) + 1,
                    "): the output would be empty");
  if (bias.defined()) {
    check_same(bias, input, "bias", "input");
    check_channel_vector(bias, s.OC, "bias");
  }
  return s;
}

// A residual added to the conv output: input's dtype and device, the output's shape.
inline void check_conv_residual(const at::Tensor& residual, const at::Tensor& input,
                                const ConvShape& s) {
  check_same(residual, input, "residual", "input");
  const int64_t shape[] = {s.N, s.OC, s.OH, s.OW};
  TORCH_CHECK_VALUE(residual.sizes() == at::IntArrayRef(shape),
                    "expected residual of the conv output's shape ", at::IntArrayRef(shape),
                    ", got ", residual.sizes());
}

// An optional residual added to the conv output: checked, made contiguous in
// `fmt`; undefined when absent.
inline at::Tensor conv_residual(const c10::optional<at::Tensor>& residual,
                                const at::Tensor& input, const ConvShape& s,
                                at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  check_conv_residual(*residual, input, s);
  return residual->contiguous(fmt);
}

}  // namespace cnnops

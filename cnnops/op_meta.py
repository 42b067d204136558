"""What torch needs to know of the compiled ops (torch.ops.cnnops.*) beyond their kernels.

The schemas live in csrc/cnnops.cpp; the CPU and CUDA kernels register there by device,
and their autograd kernels in csrc/autograd.cpp. This module registers:

* a fake (meta) kernel for every op, so torch.compile / torch.export can trace shapes;
* ``register_flops(ns)``: FLOP formulas for the convolutions of a namespace (cnnops and
  cnnops_triton), so torch.utils.flop_counter.FlopCounterMode counts them.

Shapes: input [N, C, H, W], weight [OC, C/groups, KH, KW], per-channel vectors [C] (or
[OC]), output [N, OC, OH, OW].
"""
import torch

from . import _ext
from ._shapes import conv_memory_format as _conv_fmt
from ._shapes import conv_output_shape as _conv_out
from ._shapes import memory_format as _fmt
from ._shapes import pool_output_shape as _pool_out
from ._shapes import weight_grad_memory_format as _weight_grad_fmt

_REDUCED = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Shape rules shared by the fake kernels (they mirror csrc/include/cnnops).

def _stat_dtype(t):
    return torch.float32 if t.dtype in _REDUCED else t.dtype


def _like(t, shape, fmt=torch.contiguous_format, dtype=None):
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def _none(t):
    """The empty tensor a backward op returns for a gradient not asked for."""
    return t.new_empty(0)


if _ext.LOADED:

    @torch.library.register_fake("cnnops::conv2d")
    def _(input, weight, bias, stride, padding, dilation, groups):
        return _like(input, _conv_out(input, weight, stride, padding, dilation),
                     _conv_fmt(input, weight))

    @torch.library.register_fake("cnnops::conv2d_backward")
    def _(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
        fmt = _conv_fmt(input, weight)
        return (_like(input, input.shape, fmt) if output_mask[0] else _none(input),
                _like(weight, weight.shape, _weight_grad_fmt(weight)) if output_mask[1] else _none(input),
                _like(input, (weight.shape[0],)) if output_mask[2] else _none(input))

    @torch.library.register_fake("cnnops::conv2d_relu")
    def _(input, weight, bias, residual, stride, padding, dilation, groups):
        return _like(input, _conv_out(input, weight, stride, padding, dilation),
                     _conv_fmt(input, weight))

    def _bn_stats(input):
        C = input.shape[1]
        return _like(input, (C,), dtype=_stat_dtype(input)), _like(input, (C,), dtype=_stat_dtype(input))

    @torch.library.register_fake("cnnops::batch_norm")
    def _(input, running_mean, running_var, weight, bias, training, eps):
        return (_like(input, input.shape, _fmt(input)),) + _bn_stats(input)

    @torch.library.register_fake("cnnops::update_running_stats")
    def _(running_mean, running_var, save_mean, save_invstd, count, momentum, eps):
        return None

    @torch.library.register_fake("cnnops::bn_relu")
    def _(input, running_mean, running_var, weight, bias, residual, training, eps, relu):
        return (_like(input, input.shape, _fmt(input)),) + _bn_stats(input)

    def _bn_param_grads(input, weight, output_mask):
        """BN weight / bias gradients: in the statistics dtype, as aten's batch norm."""
        C = input.shape[1]
        vec = lambda wanted: _like(input, (C,), dtype=_stat_dtype(input)) if wanted else _none(input)
        return vec(output_mask[1] and weight is not None), vec(output_mask[2])

    @torch.library.register_fake("cnnops::batch_norm_backward")
    def _(grad_output, input, weight, save_mean, save_invstd, training, output_mask):
        gi = _like(input, input.shape, _fmt(input)) if output_mask[0] else _none(input)
        return (gi,) + _bn_param_grads(input, weight, output_mask)

    @torch.library.register_fake("cnnops::bn_relu_backward")
    def _(grad_output, output, input, weight, save_mean, save_invstd, training, relu, output_mask):
        gi = _like(input, input.shape, _fmt(input)) if output_mask[0] else _none(input)
        gr = _like(input, input.shape, _fmt(input)) if output_mask[3] else _none(input)
        return (gi,) + _bn_param_grads(input, weight, output_mask) + (gr,)

    @torch.library.register_fake("cnnops::batch_norm_stats")
    def _(input):
        return _bn_stats(input)

    @torch.library.register_fake("cnnops::bn_relu_backward_elemt")
    def _(grad_output, output, input, weight, save_mean, save_invstd, mean_dy, mean_dy_xhat,
          relu, output_mask):
        return tuple(_like(input, input.shape, _fmt(input)) if wanted else _none(input)
                     for wanted in output_mask)

    @torch.library.register_fake("cnnops::conv_bn_relu")
    def _(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
          stride, padding, dilation, groups, training, eps, relu):
        shape = _conv_out(input, weight, stride, padding, dilation)
        OC = shape[1]
        # conv_output (kept for backward) is the convolution's own output, in the output's
        # layout.
        fmt = _conv_fmt(input, weight)
        conv_output = _like(input, shape, fmt) if training else _none(input)
        stats = _like(input, (OC,), dtype=_stat_dtype(input))
        return _like(input, shape, fmt), conv_output, stats, torch.empty_like(stats)

    @torch.library.register_fake("cnnops::conv_bn_relu_inference")
    def _(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
          stride, padding, dilation, groups, eps, relu):
        return _like(input, _conv_out(input, weight, stride, padding, dilation),
                     _conv_fmt(input, weight))

    @torch.library.register_fake("cnnops::conv_bn_relu_into_residual")
    def _(residual, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
          stride, padding, dilation, groups, eps, relu):
        return None

    @torch.library.register_fake("cnnops::conv_bn_relu_backward")
    def _(grad_output, output, input, weight, conv_bias, conv_output, bn_weight, save_mean,
          save_invstd, stride, padding, dilation, groups, training, relu, output_mask):
        OC = weight.shape[0]
        vec = lambda wanted, dtype=None: _like(input, (OC,), dtype=dtype) if wanted else _none(input)
        fmt = _conv_fmt(input, weight)
        return (_like(input, input.shape, fmt) if output_mask[0] else _none(input),
                _like(weight, weight.shape, _weight_grad_fmt(weight)) if output_mask[1] else _none(input),
                vec(output_mask[2]),
                vec(output_mask[3] and bn_weight is not None, _stat_dtype(input)),
                vec(output_mask[4], _stat_dtype(input)),
                _like(input, grad_output.shape, fmt) if output_mask[5] else _none(input))

    @torch.library.register_fake("cnnops::max_pool2d")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode):
        shape = _pool_out(input, kernel_size, stride, padding, dilation, ceil_mode)
        return _like(input, shape, _fmt(input)), _like(input, shape, _fmt(input), torch.int64)

    @torch.library.register_fake("cnnops::max_pool2d_backward")
    def _(grad_output, input, indices, kernel_size, stride, padding, dilation):
        return _like(input, input.shape, _fmt(input))

    @torch.library.register_fake("cnnops::avg_pool2d")
    def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return _like(input, _pool_out(input, kernel_size, stride, padding, (1, 1), ceil_mode),
                     _fmt(input))

    @torch.library.register_fake("cnnops::avg_pool2d_backward")
    def _(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
          divisor_override):
        return _like(input, input.shape, _fmt(input))

    @torch.library.register_fake("cnnops::adaptive_avg_pool2d")
    def _(input, output_size):
        return _like(input, tuple(input.shape[:2]) + tuple(output_size), _fmt(input))

    @torch.library.register_fake("cnnops::adaptive_avg_pool2d_backward")
    def _(grad_output, input):
        return _like(input, input.shape, _fmt(input))

    @torch.library.register_fake("cnnops::add_relu")
    def _(input, other):
        return _like(input, input.shape, _fmt(input))

    @torch.library.register_fake("cnnops::add_relu_backward")
    def _(grad_output, output):
        return _like(output, output.shape, _fmt(output))


# ---------------------------------------------------------------------------
# FLOP formulas, so torch.utils.flop_counter.FlopCounterMode counts the fused
# convolutions as it counts aten's (2 * multiply-adds; BN/ReLU not counted).

def register_flops(ns):
    """Registers the FLOP formulas of the convolutions in namespace ``ns``."""
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula
    lib = getattr(torch.ops, ns)

    @register_flop_formula(lib.conv2d)
    def _conv2d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    @register_flop_formula(lib.conv2d_relu)
    def _conv2d_relu_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    @register_flop_formula(lib.conv_bn_relu)
    def _conv_bn_relu_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape[0], transposed=False)


if _ext.LOADED:
    register_flops("cnnops")

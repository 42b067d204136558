"""What the generated (fused) forward calls at run time, and nothing else.

The generated source names each as cnnops.fuse.<name> (cnnops/fuse/__init__.py re-exports
them and makes that their module), and pickled fused models keep that source.
"""
import torch
import torch.nn.functional as TF
from torch import nn

from .. import backends
from .. import functional as CF
from .._shapes import conv_output_size
from ..nn import (_conv_input_and_padding, _inference_op, apply_bn_relu, apply_conv_bn_relu,
                  apply_conv_relu)
from ._fx import tree_map

__all__ = ["conv_bn_relu_residual", "bn_relu_residual", "conv_frozen_bn_relu", "frozen_bn_relu",
           "conv_relu", "add_relu", "activation", "max_pool2d", "avg_pool2d",
           "adaptive_avg_pool2d", "max_pool2d_module", "avg_pool2d_module",
           "adaptive_avg_pool2d_module", "to_channels_last", "restore_layout",
           "conv2d_on_cpu", "conv_channels_last"]


# ---------------------------------------------------------------------------
# Run-time helpers: the targets of the rewritten graphs. Each takes the
# model's own modules and falls back to the original ops where the fused op's
# stricter contract (same shapes and dtypes, 4-D input) does not hold.

def _combine(t, residual, how):
    """The original residual add: t + r (how=0), t += r (1) or r += t (2)."""
    if how == 1:
        t += residual
        return t
    if how == 2:
        residual += t
        return residual
    return t + residual


def _conv_out_shape(conv, x):
    n, _, h, w = x.shape
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return (n, conv.out_channels, h, w)
        padding = (0, 0)
    else:
        padding = conv.padding
    out = [conv_output_size(size, k, p, s, d) for size, p, d, k, s in
           zip((h, w), padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (n, conv.out_channels, out[0], out[1])


def _fits(residual, x, shape):
    return (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
            and residual.device == x.device and residual.shape == shape)


def conv_bn_relu_residual(conv, bn, x, residual=None, relu=True, how=0, memory="fast",
                          reuse_residual=False):
    """relu(bn(conv(x)) + residual) as one cnnops::conv_bn_relu when x is 4-D and shapes and
    dtypes match (the original modules otherwise: a SyncBatchNorm takes any input).
    reuse_residual: nothing reads the residual afterwards (the residual-reuse pass,
    reuse.py), so in eval mode outside autograd the result may take its memory."""
    if not bn.training:
        out = _inference_op(conv, bn, x, residual, relu, reuse_residual)
        if out is not None:
            return out
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        return apply_conv_bn_relu(conv, bn, x, residual, relu, memory)
    out = bn(conv(x))
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def bn_relu_residual(bn, x, residual=None, relu=True, how=0):
    """relu(bn(x) + residual) as one cnnops::bn_relu when x is 4-D and shapes and dtypes match
    (the original modules otherwise: a SyncBatchNorm takes any input)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, x.shape)):
        return apply_bn_relu(bn, x, residual, relu)
    out = bn(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def conv_frozen_bn_relu(conv, bn, x, residual=None, relu=True, how=0, reuse_residual=False):
    """conv -> FrozenBatchNorm (inference-mode BN from its buffers) (-> + residual) (-> ReLU).
    reuse_residual: as for conv_bn_relu_residual (in either mode)."""
    out = _inference_op(conv, bn, x, residual, relu, reuse_residual)
    if out is not None:
        return out
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        xp, padding = _conv_input_and_padding(conv, x)
        return CF.conv_bn_relu(xp, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                               bn.running_var, conv.stride, padding, conv.dilation, conv.groups,
                               False, 0.0, bn.eps, relu, residual)
    out = bn(conv(x))
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def frozen_bn_relu(bn, x, residual=None, relu=True, how=0):
    """FrozenBatchNorm (-> + residual) (-> ReLU) as one inference-mode cnnops::bn_relu."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, x.shape)):
        return CF.bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                          bn.eps, relu, residual)
    out = bn(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def conv_relu(conv, x, residual=None, how=0):
    """relu(conv(x) + residual) as one cnnops::conv2d_relu (4-D input; else the original ops)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        return apply_conv_relu(conv, x, residual)
    out = conv(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out)


def add_relu(input, other, how=0):
    """relu(input + other) as one cnnops::add_relu; an in-place add must keep input's shape."""
    if (isinstance(input, torch.Tensor) and isinstance(other, torch.Tensor)
            and input.dtype == other.dtype and input.is_floating_point()
            and input.device == other.device
            and (how == 0 or input.shape == other.shape)):
        return CF.add_relu(input, other)
    if how == 1:
        input += other
        return torch.relu(input)
    if how == 2:
        other += input
        return torch.relu(other)
    return torch.relu(input + other)


def activation(act, x):
    """An activation module's forward, out of place (for an in-place module whose input is a
    fused op's output, which that op keeps for backward)."""
    if isinstance(act, nn.Hardtanh):  # ReLU6 too
        return TF.hardtanh(x, act.min_val, act.max_val)
    if isinstance(act, nn.LeakyReLU):
        return TF.leaky_relu(x, act.negative_slope)
    if isinstance(act, nn.ELU):
        return TF.elu(x, act.alpha)
    if isinstance(act, nn.CELU):
        return TF.celu(x, act.alpha)
    if isinstance(act, nn.SELU):
        return TF.selu(x)
    if isinstance(act, nn.SiLU):
        return TF.silu(x)
    if isinstance(act, nn.Mish):
        return TF.mish(x)
    if isinstance(act, nn.Hardswish):
        return TF.hardswish(x)
    if isinstance(act, nn.Hardsigmoid):
        return TF.hardsigmoid(x)
    return act(x)


def _poolable(x):
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """cnnops max_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode,
                             return_indices)
    return TF.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                         return_indices=return_indices)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """cnnops avg_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                             divisor_override)
    return TF.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)


def adaptive_avg_pool2d(input, output_size):
    """cnnops adaptive_avg_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.adaptive_avg_pool2d(input, output_size)
    return TF.adaptive_avg_pool2d(input, output_size)


def max_pool2d_module(pool, x):
    """An nn.MaxPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                             pool.ceil_mode, pool.return_indices)
    return pool(x)


def avg_pool2d_module(pool, x):
    """An nn.AvgPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                             pool.count_include_pad, pool.divisor_override)
    return pool(x)


def adaptive_avg_pool2d_module(pool, x):
    """An nn.AdaptiveAvgPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.adaptive_avg_pool2d(x, pool.output_size)
    return pool(x)


# ---------------------------------------------------------------------------
# channels_last inference on the CPU

def to_channels_last(x):
    """x in channels_last where the CPU oneDNN core runs it natively (a 4-D float32 or
    bfloat16 CPU tensor on the cpu backend, oneDNN on, the core not forced to im2col);
    x itself otherwise."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_cpu
            and x.dtype in (torch.float32, torch.bfloat16)
            and not x.is_contiguous(memory_format=torch.channels_last)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and backends.resolve(x) == "cpu" and backends.get_cpu_conv() != "im2col"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def restore_layout(out, *pairs):
    """out with its 4-D tensors back in the default layout when to_channels_last converted
    an input: pairs alternate each input and what to_channels_last returned for it."""
    if all(a is b for a, b in zip(pairs[::2], pairs[1::2])):
        return out
    return tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4
                    else t, out)


def _on_cpu_backend(x):
    """Whether a call on x runs on cnnops' cpu backend (False for a tensor the backend
    chosen cannot run: an unfused op is torch's, not an error)."""
    try:
        return isinstance(x, torch.Tensor) and backends.resolve(x) == "cpu"
    except RuntimeError:
        return False


def conv2d_on_cpu(conv, x):
    """conv(x) for an nn.Conv2d that fuse left alone (nothing after it to fuse with). Where
    x resolves to the cpu backend it runs cnnops.functional.conv2d: the core choice (DenseNet's
    3x3 convolutions at 4x4 and 2x2, batch 2, take the im2col core, measured at about a third
    of oneDNN's time forward and backward) and, in channels_last, oneDNN with the weight
    packed once (nn.Conv2d would copy its NCHW weight to channels_last, and oneDNN reorder it,
    on every call). Elsewhere (other devices, float16 on the CPU, another backend chosen)
    conv(x): torch's convolution, which no other cnnops backend beats on its own."""
    if not _on_cpu_backend(x):
        return conv(x)
    x, padding = _conv_input_and_padding(conv, x)
    return CF.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


# the name fused models pickled before conv2d_on_cpu ran every left-alone convolution use
conv_channels_last = conv2d_on_cpu

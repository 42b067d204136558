"""The compiled ops (torch.ops.cnnops.*): Python entry points, fake kernels, autograd.

The schemas live in csrc/cnnops.cpp; the CPU and CUDA kernels register there by
device, and their autograd kernels in csrc/autograd.cpp. This module registers:

* a fake (meta) kernel for every op, so torch.compile / torch.export can trace shapes;
* ``register_autograd(ns)``: the same autograd formulas in Python, for the Triton ops
  (torch.ops.cnnops_triton, whose kernels are Python too). The compiled ops keep theirs
  in C++ because torch.library.register_autograd's glue costs 60-250 us a call.

It also exposes the ops with the same normalised signatures as cnnops.reference,
which is how cnnops.functional calls a backend.

Shapes in the docstrings: input [N, C, H, W], weight [OC, C/groups, KH, KW],
per-channel vectors [C] (or [OC]), output [N, OC, OH, OW].
"""
import functools

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
    lib = torch.ops.cnnops

    # ---- fake kernels ------------------------------------------------------

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
    def _(input, weight, bias, running_mean, running_var, training, eps):
        return (_like(input, input.shape, _fmt(input)),) + _bn_stats(input)

    @torch.library.register_fake("cnnops::update_running_stats")
    def _(running_mean, running_var, save_mean, save_invstd, count, momentum, eps):
        return None

    @torch.library.register_fake("cnnops::bn_relu")
    def _(input, weight, bias, running_mean, running_var, residual, training, eps, relu):
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
# Autograd: each forward op saves what its backward op reads; statistics and
# indices are outputs without gradients. The formulas of csrc/autograd.cpp, for
# the Triton ops (cnnops_triton); tests compare both backends' gradients with torch.

def _grads(ctx, values, n_inputs):
    """Gradients for autograd: None where an input needs none (or is not a tensor)."""
    out = [v if ctx.needs_input_grad[i] else None for i, v in enumerate(values)]
    return tuple(out) + (None,) * (n_inputs - len(out))


class _SecondDerivativeError(torch.autograd.Function):
    """The identity on a backward's gradients, whose own backward (a second derivative) raises.

    forward(message, n, *tensors): the first n tensors are the gradients; the rest are what they
    depend on (saved tensors, incoming gradients), so a second backward towards any of those
    reaches this node."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _once_differentiable(name, backward):
    """``backward`` for autograd: the backward ops have no derivatives of their own, so under
    create_graph=True the gradients it returns raise, naming the op, when a second backward
    reaches them, instead of silently dropping out of second derivatives. As backward_result
    in csrc/autograd.cpp."""
    message = ("cnnops::%s: double backward (differentiating its gradient, as create_graph=True "
               "allows) is not supported; compute second derivatives through "
               "torch.nn.functional instead" % name)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        sources = [t for t in ctx.saved_tensors + grads
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        results = [t for t in out if isinstance(t, torch.Tensor)]
        if not sources or not results:
            return out
        wrapped = iter(_SecondDerivativeError.apply(message, len(results), *results, *sources))
        return tuple(next(wrapped) if isinstance(t, torch.Tensor) else t for t in out)

    return wrapper


def register_autograd(ns):
    """Registers the autograd formulas of the ops in namespace ``ns``."""
    lib = getattr(torch.ops, ns)

    def register(name, backward, setup_context):
        torch.library.register_autograd(ns + "::" + name, _once_differentiable(name, backward),
                                        setup_context=setup_context)

    def _conv2d_setup(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight)
        ctx.conv = (stride, padding, dilation, groups)

    def _conv2d_backward(ctx, grad):
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        return _grads(ctx, lib.conv2d_backward(grad, input, weight, *ctx.conv, mask), 7)

    register("conv2d", _conv2d_backward, _conv2d_setup)

    def _conv2d_relu_setup(ctx, inputs, output):
        input, weight, bias, residual, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight, output)
        ctx.conv = (stride, padding, dilation, groups)

    def _conv2d_relu_backward(ctx, grad):
        input, weight, out = ctx.saved_tensors
        n = ctx.needs_input_grad
        grad = lib.add_relu_backward(grad, out)  # through the ReLU: also the residual's gradient
        gi, gw, gb = lib.conv2d_backward(grad, input, weight, *ctx.conv, [n[0], n[1], n[2]])
        return _grads(ctx, (gi, gw, gb, grad), 8)

    register("conv2d_relu", _conv2d_relu_backward, _conv2d_relu_setup)

    def _bn_setup(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, training, eps = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(input, weight, output[1], output[2])
        ctx.training = training

    def _batch_norm_backward(ctx, grad, _gm, _gi):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        return _grads(ctx, lib.batch_norm_backward(grad, input, weight, mean, invstd,
                                                   ctx.training, mask), 7)

    register("batch_norm", _batch_norm_backward, _bn_setup)

    def _bn_relu_setup(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, residual, training, eps, relu = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(input, weight, output[1], output[2], output[0] if relu else None)
        ctx.training, ctx.relu = training, relu

    def _bn_relu_backward(ctx, grad, _gm, _gi):
        input, weight, mean, invstd, out = ctx.saved_tensors
        n = ctx.needs_input_grad
        gi, gw, gb, gr = lib.bn_relu_backward(grad, out, input, weight, mean, invstd, ctx.training,
                                              ctx.relu, [n[0], n[1], n[2], n[5]])
        return _grads(ctx, (gi, gw, gb, None, None, gr), 9)

    register("bn_relu", _bn_relu_backward, _bn_relu_setup)

    def _cbr_setup(ctx, inputs, output):
        (input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
         stride, padding, dilation, groups, training, eps, relu) = inputs
        out, conv_out, mean, invstd = output
        ctx.mark_non_differentiable(conv_out, mean, invstd)
        # The training backward reads the output only for the ReLU mask (csrc/autograd.cpp)
        kept_out = out if relu or not training else None
        ctx.save_for_backward(input, weight, conv_bias, bn_weight, kept_out, conv_out, mean,
                              invstd)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.training, ctx.relu = training, relu

    def _cbr_backward(ctx, grad, _gc, _gm, _gi):
        input, weight, conv_bias, bn_weight, out, conv_out, mean, invstd = ctx.saved_tensors
        n = ctx.needs_input_grad
        gi, gw, gcb, gbw, gbb, gr = lib.conv_bn_relu_backward(
            grad, out if out is not None else conv_out, input, weight, conv_bias, conv_out, bn_weight, mean, invstd, *ctx.conv,
            ctx.training, ctx.relu, [n[0], n[1], n[2], n[3], n[4], n[7]])
        return _grads(ctx, (gi, gw, gcb, gbw, gbb, None, None, gr), 15)

    register("conv_bn_relu", _cbr_backward, _cbr_setup)

    def _max_pool_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.geometry = inputs[1:5]  # kernel_size, stride, padding, dilation

    def _max_pool_backward(ctx, grad, _gidx):
        input, indices = ctx.saved_tensors
        return (lib.max_pool2d_backward(grad, input, indices, *ctx.geometry),) + (None,) * 5

    register("max_pool2d", _max_pool_backward, _max_pool_setup)

    def _avg_pool_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.args = inputs[1:]

    def _avg_pool_backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return (lib.avg_pool2d_backward(grad, input, *ctx.args),) + (None,) * 6

    register("avg_pool2d", _avg_pool_backward, _avg_pool_setup)

    def _adaptive_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _adaptive_backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return lib.adaptive_avg_pool2d_backward(grad, input), None

    register("adaptive_avg_pool2d", _adaptive_backward, _adaptive_setup)

    def _add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = lib.add_relu_backward(grad, out)
        return _grads(ctx, (g, g), 2)

    register("add_relu", _add_relu_backward, _add_relu_setup)



# ---------------------------------------------------------------------------
# The backend interface (same signatures as cnnops.reference).

class Ops:
    """The ops of one namespace as a backend: cnnops.functional calls these attributes with
    the normalised arguments of cnnops.reference. ``cnnops`` serves the cpu and cuda
    backends (the dispatcher picks the kernel by device), ``cnnops_triton`` the triton one."""

    def __init__(self, ns):
        lib = getattr(torch.ops, ns)
        self.namespace = ns
        self.conv2d = lib.conv2d
        self.conv2d_relu = lib.conv2d_relu
        self.batch_norm = lib.batch_norm
        self.bn_relu = lib.bn_relu
        self.max_pool2d = lib.max_pool2d
        self.avg_pool2d = lib.avg_pool2d
        self.adaptive_avg_pool2d = lib.adaptive_avg_pool2d
        self.add_relu = lib.add_relu
        self.update_running_stats = lib.update_running_stats  # in place, one kernel
        # The phases of a synchronised BatchNorm (cnnops.distributed)
        self.batch_norm_stats = lib.batch_norm_stats
        self.bn_relu_backward = lib.bn_relu_backward
        self.bn_relu_backward_elemt = lib.bn_relu_backward_elemt
        # The lean mode's (cnnops.lean): the op with its conv output, and its backward
        self.conv_bn_relu_op = lib.conv_bn_relu
        self.conv_bn_relu_backward = lib.conv_bn_relu_backward
        fused = self.conv_bn_relu_op

        def conv_bn_relu(*args):
            out, _conv_output, mean, invstd = fused(*args)
            return out, mean, invstd

        self.conv_bn_relu = conv_bn_relu


class BFloat16Ops:
    """The cpu backend for bfloat16 tensors.

    The convolutions (conv2d, conv2d_relu, conv_bn_relu) run in bfloat16 on the oneDNN core
    (BN arithmetic in float32 inside), and add_relu in bfloat16. The other bandwidth-bound
    ops (batch_norm, bn_relu, pooling) have float32/float64 CPU kernels only, so here they
    run on float32 copies and cast back: autograd records the casts, so each gradient comes
    back in its tensor's own dtype. Speed is not the point of this path; correctness against torch is.
    """

    def __init__(self, ops):
        self._ops = ops
        self.namespace = ops.namespace
        self.conv2d = ops.conv2d
        self.conv2d_relu = ops.conv2d_relu
        self.conv_bn_relu = ops.conv_bn_relu
        self.conv_bn_relu_op = ops.conv_bn_relu_op
        self.conv_bn_relu_backward = ops.conv_bn_relu_backward
        self.add_relu = ops.add_relu  # bfloat16 kernels: a sum rounded once and a select

    @staticmethod
    def _f32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t

    def _bf16(self, t, like):
        return t.to(like.dtype) if t.dtype != like.dtype else t

    def batch_norm(self, input, *args):
        out, mean, invstd = self._ops.batch_norm(*map(self._f32, (input,) + args))
        return self._bf16(out, input), mean, invstd

    def bn_relu(self, input, *args):
        out, mean, invstd = self._ops.bn_relu(*map(self._f32, (input,) + args))
        return self._bf16(out, input), mean, invstd

    def batch_norm_stats(self, input):
        return self._ops.batch_norm_stats(self._f32(input))

    def bn_relu_backward(self, *args):
        # The input and residual gradients come back in float32; autograd casts them.
        return self._ops.bn_relu_backward(*map(self._f32, args))

    def bn_relu_backward_elemt(self, *args):
        return self._ops.bn_relu_backward_elemt(*map(self._f32, args))

    def max_pool2d(self, input, *args):
        out, indices = self._ops.max_pool2d(self._f32(input), *args)
        return self._bf16(out, input), indices

    def avg_pool2d(self, input, *args):
        return self._bf16(self._ops.avg_pool2d(self._f32(input), *args), input)

    def adaptive_avg_pool2d(self, input, *args):
        return self._bf16(self._ops.adaptive_avg_pool2d(self._f32(input), *args), input)

    def update_running_stats(self, running_mean, running_var, *args):
        # bfloat16 running statistics (a model.bfloat16() BN): updated in float32, stored back.
        stats = [t for t in (running_mean, running_var) if t is not None]
        if all(t.dtype != torch.bfloat16 for t in stats):
            return self._ops.update_running_stats(running_mean, running_var, *args)
        mean32, var32 = self._f32(running_mean), self._f32(running_var)
        self._ops.update_running_stats(mean32, var32, *args)
        for t, t32 in ((running_mean, mean32), (running_var, var32)):
            if t is not None and t32 is not t:
                t.copy_(t32)


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
    COMPILED = Ops("cnnops")
    COMPILED_BFLOAT16_CPU = BFloat16Ops(COMPILED)

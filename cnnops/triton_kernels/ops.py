"""The Triton ops: ``torch.ops.cnnops_triton.*``, registered with torch.library.triton_op.

Same names, schemas and conventions as the compiled ops of csrc/cnnops.cpp (their
autograd formulas, those of csrc/autograd.cpp, are in autograd.py), so the ``triton``
backend is cnnops.op_table.Ops("cnnops_triton"). triton_op makes each
function its own fake kernel and lets torch.compile trace through it into the
kernels, which it can then schedule with the rest of the graph.

Per-channel vectors ([C] tensors: BN parameters and statistics) are handled in
float32 for float16/bfloat16 data and in the data's dtype otherwise; gradients of
per-channel parameters come back in that dtype and autograd casts them to the
parameter's.

Every op first checks its arguments as the CUDA kernel of the compiled op does, in the same
order and with the same messages (checks.py), before any launch: the ops are public and must
never crash on bad arguments.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from . import _common as common
from . import checks, conv, elementwise, norm, pool

NS = "cnnops_triton"


def _none(t):
    """The empty tensor a backward op returns for a gradient not asked for."""
    return t.new_empty(0)


# ---- convolution ------------------------------------------------------------

@triton_op(NS + "::conv2d", mutates_args=())
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
           padding: list[int], dilation: list[int], groups: int) -> Tensor:
    checks.conv_shape(input, weight, bias, stride, padding, dilation, groups)
    checks.check_cuda_float(input, "input")
    return conv.forward(input, weight, checks.dense_channel(bias), stride, padding, dilation,
                        groups)


@triton_op(NS + "::conv2d_backward", mutates_args=())
def conv2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int,
                    output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    s = checks.conv_shape(input, weight, None, stride, padding, dilation, groups)
    checks.check_cuda_float(input, "input")
    checks.check_shape(grad_output, (s.N, s.OC, s.OH, s.OW), "grad_output", input, "input")
    geometry = (stride, padding, dilation, groups)
    gi = (conv.input_grad(grad_output, weight, input.shape, *geometry, like=input)
          if output_mask[0] else _none(input))
    gw = (conv.weight_grad(grad_output, input, weight, *geometry)
          if output_mask[1] else _none(input))
    # Summed in float32 for half types, rounded once to the bias's (the input's) dtype.
    gb = (norm.backward_constants(grad_output)["sum_g"].to(input.dtype) if output_mask[2]
          else _none(input))
    return gi, gw, gb


@triton_op(NS + "::conv2d_relu", mutates_args=())
def conv2d_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    s = checks.conv_shape(input, weight, bias, stride, padding, dilation, groups)
    checks.check_cuda_float(input, "input")
    residual = checks.conv_residual(residual, input, s)
    return conv.forward(input, weight, checks.dense_channel(bias), stride, padding, dilation,
                        groups, residual=residual, relu=True)


# ---- batch normalisation ------------------------------------------------------

def _bn_forward(input, running_mean, running_var, weight, bias, residual, training, eps, relu):
    # bn_relu_cuda's checks (batch_norm's too: it is bn_relu without residual and ReLU).
    checks.check_4d(input, "input")
    checks.check_cuda_float(input, "input")
    C = input.shape[1]
    running_mean, running_var, weight, bias = checks.check_bn_params(
        "batch_norm", input, C, running_mean, running_var, weight, bias, training, eps)
    residual = checks.check_bn_residual(residual, input)
    # Three launches in all: statistics (or nothing), constants, the apply pass.
    if training:
        mean, invstd, scale = norm.batch_constants(norm.moments(input), weight, eps)
    else:
        mean, invstd, scale, _ = norm.running_constants(
            running_mean, running_var, weight, None, eps, common.stat_dtype(input.dtype))
    out = norm.apply(input, mean, scale, bias, residual, relu)
    return out, mean, invstd


@triton_op(NS + "::update_running_stats", mutates_args={"running_mean", "running_var"})
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         save_mean: Tensor, save_invstd: Tensor, count: int, momentum: float,
                         eps: float) -> None:
    checks.check_running_stats_update(running_mean, running_var, save_mean, save_invstd, count)
    checks.check_cuda_device(save_mean, "save_mean")
    norm.update_running_stats(running_mean, running_var, checks.dense_channel(save_mean),
                              checks.dense_channel(save_invstd), count, momentum, eps)


@triton_op(NS + "::batch_norm", mutates_args=())
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bn_forward(input, running_mean, running_var, weight, bias, None, training, eps, False)


@triton_op(NS + "::bn_relu", mutates_args=())
def bn_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            training: bool, eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bn_forward(input, running_mean, running_var, weight, bias, residual, training, eps,
                       relu)


def _bn_backward(grad, output, x, weight, mean, invstd, training, relu, want, like,
                 want_input_sum=False):
    """Gradients of relu?(batch_norm(x) + residual) w.r.t. (x, weight, bias, residual), and
    the per-channel sum of the x gradient.

    grad, output, x [N, C, H, W] (x: the BN input; it may be empty when neither the
    training formula nor the weight gradient reads it); want: 4 flags; like: the tensor
    whose layout the input and residual gradients take; want_input_sum: also return
    sum over (N, H, W) of grad_x [C] (a conv bias's gradient) in the statistics dtype.
    Returns None for a gradient not wanted. Three launches: partial sums, constants, apply.
    """
    masked = output if relu else None
    want_weight = want[1] and weight is not None
    need_xhat = want_weight or (training and want[0])
    need_sums = need_xhat or want[2] or want_input_sum
    k = norm.backward_constants(grad, masked, x if need_xhat else None, mean, invstd, weight,
                                training, reduce=need_sums)
    training_input = training and want[0]
    gi, gr = norm.backward_apply(grad, masked, x if training_input else None, mean, k["k"],
                                 k["mg"] if training_input else None,
                                 k["mgx"] if training_input else None, want_input=want[0],
                                 want_residual=want[3], like=like)
    return (gi, k["sum_gx"] if want_weight else None, k["sum_g"] if want[2] else None, gr,
            k["gi_sum"] if want_input_sum else None)


@triton_op(NS + "::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                        save_mean: Tensor, save_invstd: Tensor, training: bool,
                        output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    # batch_norm_backward_cuda is bn_relu_backward_cuda without ReLU: its checks.
    checks.check_bn_backward("bn_relu_backward", grad_output, None, input, False)
    weight, save_mean, save_invstd = checks.check_bn_saved(input, input.shape[1], weight,
                                                           save_mean, save_invstd)
    grads = _bn_backward(grad_output, None, input, weight, save_mean, save_invstd, training,
                         False, list(output_mask) + [False], input)
    return tuple(g if g is not None else _none(input) for g in grads[:3])


@triton_op(NS + "::bn_relu_backward", mutates_args=())
def bn_relu_backward(grad_output: Tensor, output: Optional[Tensor], input: Tensor,
                     weight: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor,
                     training: bool, relu: bool,
                     output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    checks.check_bn_backward("bn_relu_backward", grad_output, output, input, relu)
    weight, save_mean, save_invstd = checks.check_bn_saved(input, input.shape[1], weight,
                                                           save_mean, save_invstd)
    grads = _bn_backward(grad_output, output, input, weight, save_mean, save_invstd, training,
                         relu, output_mask, input)
    return tuple(g if g is not None else _none(input) for g in grads[:4])


# ---- synchronised batch normalisation (cnnops.distributed) ------------------------

@triton_op(NS + "::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    checks.check_batch_norm_stats(input)
    return norm.batch_stats(input)


@triton_op(NS + "::bn_relu_backward_elemt", mutates_args=())
def bn_relu_backward_elemt(grad_output: Tensor, output: Optional[Tensor], input: Tensor,
                           weight: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor,
                           mean_dy: Tensor, mean_dy_xhat: Tensor, relu: bool,
                           output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    checks.check_bn_backward("bn_relu_backward_elemt", grad_output, output, input, relu)
    weight, save_mean, save_invstd = checks.check_bn_saved(input, input.shape[1], weight,
                                                           save_mean, save_invstd)
    mean_dy, mean_dy_xhat = checks.check_elemt_means(mean_dy, mean_dy_xhat, input)
    # backward_apply's training formula, (g' - mg - (x - mean) * mgx) * k, with the means over
    # the whole batch: mg = mean_dy, mgx = mean_dy_xhat * invstd, k = weight * invstd.
    acc = common.stat_dtype(input.dtype)
    invstd = save_invstd.to(acc)
    k = invstd if weight is None else weight.to(acc) * invstd
    gi, gr = norm.backward_apply(grad_output, output if relu else None, input, save_mean.to(acc),
                                 k, mean_dy.to(acc), mean_dy_xhat.to(acc) * invstd,
                                 want_input=output_mask[0], want_residual=output_mask[1],
                                 like=input)
    return (gi if gi is not None else _none(input), gr if gr is not None else _none(input))


# ---- convolution + batch normalisation + ReLU -----------------------------------

@triton_op(NS + "::conv_bn_relu", mutates_args=())
def conv_bn_relu(input: Tensor, weight: Tensor, conv_bias: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 residual: Optional[Tensor], stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, training: bool, eps: float,
                 relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s = checks.conv_shape(input, weight, None, stride, padding, dilation, groups)
    checks.check_cuda_float(input, "input")
    conv_bias = checks.optional_channel(conv_bias, input, s.OC, "conv_bias")
    running_mean, running_var, bn_weight, bn_bias = checks.check_bn_params(
        "conv_bn_relu", input, s.OC, running_mean, running_var, bn_weight, bn_bias, training,
        eps, "bn_weight", "bn_bias")
    residual = checks.conv_residual(residual, input, s)
    geometry = (stride, padding, dilation, groups)
    if training:
        # The conv kernel stores the conv output and its per-tile moments in one pass; one
        # launch merges them into the BN constants, one normalises + affine + residual + ReLU.
        conv_output, partials = conv.forward(input, weight, conv_bias, *geometry, stats=True)
        mean, invstd, scale = norm.batch_constants(partials, bn_weight, eps)
        out = norm.apply(conv_output, mean, scale, bn_bias, residual, relu)
        return out, conv_output, mean, invstd
    # Inference: BN folded into the GEMM epilogue, out = conv * scale + shift (one launch for
    # the constants, then the convolution).
    mean, invstd, scale, shift = norm.running_constants(
        running_mean, running_var, bn_weight, bn_bias, eps, common.stat_dtype(input.dtype),
        conv_bias=conv_bias, fold=True)
    out = conv.forward(input, weight, None, *geometry, scale=scale, shift=shift,
                       residual=residual, relu=relu)
    return out, _none(input), mean, invstd


@triton_op(NS + "::conv_bn_relu_backward", mutates_args=())
def conv_bn_relu_backward(grad_output: Tensor, output: Tensor, input: Tensor, weight: Tensor,
                          conv_bias: Optional[Tensor], conv_output: Tensor,
                          bn_weight: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor,
                          stride: list[int], padding: list[int], dilation: list[int],
                          groups: int, training: bool, relu: bool,
                          output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                            Tensor, Tensor]:
    s = checks.conv_shape(input, weight, None, stride, padding, dilation, groups)
    checks.check_cuda_float(input, "input")
    conv_bias = checks.check_conv_bn_relu_backward(grad_output, output, input, conv_bias,
                                                   conv_output, s, training)
    bn_weight, save_mean, save_invstd = checks.check_bn_saved(input, s.OC, bn_weight, save_mean,
                                                              save_invstd, "bn_weight")
    geometry = (stride, padding, dilation, groups)
    want_conv = output_mask[0] or output_mask[1] or output_mask[2]
    y = conv_output
    if not training and output_mask[3] and bn_weight is not None:
        # The weight gradient needs the normalised conv output, not kept in inference.
        y = conv.forward(input, weight, conv_bias, *geometry)
    gy, gbw, gbb, gr, gy_sum = _bn_backward(
        grad_output, output, y, bn_weight, save_mean, save_invstd, training, relu,
        [want_conv, output_mask[3], output_mask[4], output_mask[5]], output,
        want_input_sum=output_mask[2])
    gi = gw = gcb = None
    if output_mask[0]:
        gi = conv.input_grad(gy, weight, input.shape, *geometry, like=input)
    if output_mask[1]:
        gw = conv.weight_grad(gy, input, weight, *geometry)
    if output_mask[2]:
        # The conv bias gradient is the sum of gy: taken from BN's float sums (see
        # _bn_backward), in the conv bias's dtype, which is the input's.
        gcb = gy_sum.to(input.dtype)
    return tuple(g if g is not None else _none(input) for g in (gi, gw, gcb, gbw, gbb, gr))


# ---- pooling ------------------------------------------------------------------

@triton_op(NS + "::max_pool2d", mutates_args=())
def max_pool2d(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               dilation: list[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    checks.check_pool2d("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    return pool.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)


@triton_op(NS + "::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad_output: Tensor, input: Tensor, indices: Tensor,
                        kernel_size: list[int], stride: list[int], padding: list[int],
                        dilation: list[int]) -> Tensor:
    checks.check_max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding,
                                     dilation)
    return pool.max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding,
                                    dilation)


@triton_op(NS + "::avg_pool2d", mutates_args=())
def avg_pool2d(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               ceil_mode: bool, count_include_pad: bool,
               divisor_override: Optional[int]) -> Tensor:
    checks.check_pool2d("avg_pool2d", input, kernel_size, stride, padding, None, ceil_mode)
    checks.check_divisor_override("avg_pool2d", divisor_override)
    return pool.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor_override)


@triton_op(NS + "::avg_pool2d_backward", mutates_args=())
def avg_pool2d_backward(grad_output: Tensor, input: Tensor, kernel_size: list[int],
                        stride: list[int], padding: list[int], ceil_mode: bool,
                        count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    s = checks.check_pool2d("avg_pool2d_backward", input, kernel_size, stride, padding, None,
                            ceil_mode)
    checks.check_divisor_override("avg_pool2d_backward", divisor_override)
    checks.check_avg_pool_grad_output(grad_output, input, s)
    return pool.avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode,
                                    count_include_pad, divisor_override)


@triton_op(NS + "::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(input: Tensor, output_size: list[int]) -> Tensor:
    checks.check_adaptive_input("adaptive_avg_pool2d", input)
    checks.check_pair(output_size, "output_size", 0)
    return pool.adaptive_avg_pool2d(input, output_size)


@triton_op(NS + "::adaptive_avg_pool2d_backward", mutates_args=())
def adaptive_avg_pool2d_backward(grad_output: Tensor, input: Tensor) -> Tensor:
    checks.check_adaptive_input("adaptive_avg_pool2d_backward", input)
    checks.check_pool_grad_output("adaptive_avg_pool2d_backward", grad_output, input)
    return pool.adaptive_avg_pool2d_backward(grad_output, input)


# ---- elementwise ----------------------------------------------------------------

@triton_op(NS + "::add_relu", mutates_args=())
def add_relu(input: Tensor, other: Tensor) -> Tensor:
    checks.check_cuda_float(input, "input")
    checks.check_cuda_float(other, "other")
    checks.check_same(other, input, "other", "input")
    checks.check_same_shape("add_relu", other, input, "other", "input")
    return elementwise.add_relu(input, other)


@triton_op(NS + "::add_relu_backward", mutates_args=())
def add_relu_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    checks.check_cuda_float(grad_output, "grad_output")
    checks.check_cuda_float(output, "output")
    checks.check_same(output, grad_output, "output", "grad_output")
    checks.check_same_shape("add_relu_backward", grad_output, output, "grad_output", "output")
    return elementwise.add_relu_backward(grad_output, output)


def _register():
    from .. import op_meta, op_table
    from .autograd import register_autograd
    register_autograd(NS)
    op_meta.register_flops(NS)
    return op_table.Ops(NS)


#: The triton backend's op table (see cnnops.op_table.Ops).
TRITON = _register()

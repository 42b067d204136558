"""Memory-lean training of conv -> BN (-> + residual) (-> ReLU): ``memory="lean"``.

A training-mode conv_bn_relu keeps for its backward the block's input, the weights, the
output (with a ReLU: its sign is the mask) and the conv output, the BN's input. The input is
the previous block's output and the output is the next block's input, which autograd keeps
anyway; the conv output is the one tensor kept for this op alone, as large as the output.
The lean mode drops it, and the backward recomputes it from the saved input and weight
(one more convolution forward per layer and step), then runs the same backward op:

    saved, fast (default)   input, weight, output (relu only), conv output, mean, invstd
    saved, lean             input, weight, output (relu only), mean [C], invstd [C]

The statistics are those of the forward (never recomputed), so the running statistics and
num_batches_tracked change once per step, as in the fast mode; the gradients are the fast
mode's to float rounding (the recomputed convolution may sum in another order). bn_relu
has nothing of its own to drop: its input and output are its neighbours' too, so its lean
mode is the fast one. The reference backend keeps what autograd keeps.

Which sites recompute. Recomputing a conv output costs in_channels/groups * KH * KW
multiply-adds per element it saves, so the deep 3x3 layers save the fewest bytes for the
most work: a ResNet's last stage is a quarter of its convolution work and an eighth of its
conv outputs. ``cnnops.fuse(model, memory="lean")`` therefore keeps the conv output of the
sites above RECOMPUTE_MAX_MACS (``recomputes(conv)``) and says so in its report; measured on
ResNet-18/50 (bench memory group) that costs 2-3% of the saving and a fifth of the extra
time. FusedConvBNReLU(memory="lean") and the functional op do as told at every layer.
"""
import torch

__all__ = ["MODES", "RECOMPUTE_MAX_MACS", "check_memory", "conv_bn_relu", "recompute_cost",
           "recomputes"]

#: The memory modes of the fused training ops: "fast" (the default) and "lean".
MODES = ("fast", "lean")

#: fuse(memory="lean") recomputes the conv outputs that cost at most this many multiply-adds
#: per element (a 3x3 convolution over 256 channels); the costlier ones are kept.
RECOMPUTE_MAX_MACS = 3 * 3 * 256


def recompute_cost(conv):
    """Multiply-adds per output element of nn.Conv2d ``conv``: in_channels/groups * KH * KW."""
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw


def recomputes(conv):
    """Whether fuse(memory="lean") recomputes the output of nn.Conv2d ``conv`` in backward."""
    return recompute_cost(conv) <= RECOMPUTE_MAX_MACS


def check_memory(memory):
    if memory not in MODES:
        raise ValueError("expected memory to be 'fast' or 'lean', got %r" % (memory,))
    return memory


class _LeanConvBNReLU(torch.autograd.Function):
    """Training-mode conv_bn_relu of backend ``ops`` that recomputes the conv output in its
    backward instead of keeping it.

    forward(input [N, C, H, W], weight [OC, C/g, KH, KW], conv_bias [OC] or None, bn_weight,
    bn_bias [OC] or None, residual [N, OC, OH, OW] or None, ops, geometry (stride, padding,
    dilation, groups), eps, relu) -> (output [N, OC, OH, OW], save_mean [OC], save_invstd [OC])
    """

    @staticmethod
    def forward(ctx, input, weight, conv_bias, bn_weight, bn_bias, residual, ops, geometry, eps,
                relu):
        out, conv_out, mean, invstd = ops.conv_bn_relu(
            input, weight, conv_bias, bn_weight, bn_bias, None, None, residual, *geometry, True,
            eps, relu)
        del conv_out  # the point of the mode
        ctx.save_for_backward(input, weight, conv_bias, bn_weight, out if relu else None, mean,
                              invstd)
        ctx.ops, ctx.geometry, ctx.relu = ops, geometry, relu
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_invstd):
        input, weight, conv_bias, bn_weight, out, mean, invstd = ctx.saved_tensors
        conv_out = ctx.ops.conv2d(input, weight, conv_bias, *ctx.geometry)
        mask = list(ctx.needs_input_grad[:6])
        # (the backward op reads output only for the ReLU mask: any tensor of its shape else)
        grads = ctx.ops.conv_bn_relu_backward(
            grad, out if out is not None else conv_out, input, weight, conv_bias, conv_out,
            bn_weight, mean, invstd, *ctx.geometry, True, ctx.relu, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 4


def conv_bn_relu(ops, input, weight, conv_bias, bn_weight, bn_bias, residual, stride, padding,
                 dilation, groups, eps, relu):
    """The lean training-mode conv_bn_relu of backend ``ops`` (not the reference backend).
    -> (output, save_mean, save_invstd), as the fast mode's."""
    return _LeanConvBNReLU.apply(input, weight, conv_bias, bn_weight, bn_bias, residual, ops,
                                 (stride, padding, dilation, groups), eps, relu)

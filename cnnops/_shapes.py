"""Output-shape and output-layout rules, shared by argument checking (functional.py), the fake
kernels (ops.py) and the Triton launchers.

They mirror csrc/include/cnnops/common.h.
"""
import torch
from torch._prims_common import suggest_memory_format


def memory_format(t):
    """Output layout rule of every op (output_memory_format): channels_last in (and not also
    contiguous), channels_last out; anything else gives an NCHW-contiguous output."""
    if (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def conv_memory_format(input, weight):
    """A convolution's output layout (conv_memory_format): the rule above, and channels_last
    too when the weight suggests it, as PyTorch decides."""
    if memory_format(input) == torch.channels_last or (
            weight.dim() == 4 and suggest_memory_format(weight) == torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def weight_grad_memory_format(weight):
    """A convolution's weight gradient's layout (weight_grad_memory_format): the weight's own, as
    autograd stores it in .grad."""
    return suggest_memory_format(weight)


def conv_output_size(size, kernel, padding, stride, dilation):
    """floor((size + 2p - d(k-1) - 1) / s) + 1"""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel, padding, stride, dilation, ceil_mode):
    """PyTorch's pooling output size: a ceil-mode window starting in the right padding is dropped."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) \
        // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_shape(input, weight, stride, padding, dilation):
    """[N, OC, OH, OW] of conv2d(input [N, C, H, W], weight [OC, C/g, KH, KW])."""
    N, _, H, W = input.shape
    OC, _, KH, KW = weight.shape
    return (N, OC, conv_output_size(H, KH, padding[0], stride[0], dilation[0]),
            conv_output_size(W, KW, padding[1], stride[1], dilation[1]))


def pool_output_shape(input, kernel_size, stride, padding, dilation, ceil_mode):
    """[N, C, OH, OW] of a pooling window over input [N, C, H, W]."""
    N, C, H, W = input.shape
    return (N, C,
            pool_output_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode),
            pool_output_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode))

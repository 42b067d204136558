"""Output-shape rules, shared by argument checking (functional.py) and the fake kernels (ops.py).

They mirror csrc/include/cnnops/common.h.
"""


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

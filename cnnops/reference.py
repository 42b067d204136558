"""Pure-PyTorch implementations of every cnnops op.

This module is the test oracle and the last-resort fallback backend, and a readable account of
how each layer is computed. It is built from primitives (unfold, matmul, indexing, reductions)
rather than from the torch.nn.functional ops it is compared with, so a match means something.
Gradients come from autograd, so every function is written with differentiable operations.

Conventions: tensors are NCHW in shape (any memory layout, any device, float16/bfloat16/
float32/float64); arguments arrive normalised: pairs are tuples of two ints; nothing is
validated here. No function mutates its arguments but update_running_stats: batch_norm returns
the batch statistics and the caller updates the running ones with it.
"""
import torch
import torch.nn.functional as F

from ._shapes import conv_output_shape, pool_output_size

__all__ = [
    "conv2d",
    "batch_norm",
    "update_running_stats",
    "bn_relu",
    "batch_norm_stats",
    "bn_relu_backward_elemt",
    "conv_bn_relu",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "add_relu",
]


def conv2d(input, weight, bias, stride, padding, dilation, groups):
    """2-D cross-correlation computed as im2col + grouped matrix multiply.

    input [N, C, H, W], weight [OC, C/groups, KH, KW], bias [OC] or None
    -> output [N, OC, OH, OW], OH = floor((H + 2*ph - dh*(KH-1) - 1) / sh) + 1 (same for OW).
    """
    n, _, h, w = input.shape
    oc, cg, kh, kw = weight.shape
    _, _, oh, ow = conv_output_shape(input, weight, stride, padding, dilation)
    # cols[n, c*KH*KW + i*KW + j, l]: tap (i, j) of channel c in window l. Channels are the
    # slowest index, so each group's channels form one contiguous block of rows.
    cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow)
    kernels = weight.reshape(groups, oc // groups, cg * kh * kw)
    out = torch.matmul(kernels, cols).reshape(n, oc, oh, ow)  # [N, groups, OC/groups, L]
    if bias is not None:
        out = out + bias.reshape(1, oc, 1, 1)
    return out


def conv2d_relu(input, weight, bias, residual, stride, padding, dilation, groups):
    """relu(conv2d(input) + residual); residual [N, OC, OH, OW] or None."""
    out = conv2d(input, weight, bias, stride, padding, dilation, groups)
    return torch.relu(out if residual is None else out + residual)


def _stat_dtype(t):
    """The dtype of BN statistics for activations like t: float32 for half types."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def batch_norm(input, running_mean, running_var, weight, bias, training, eps):
    """Batch normalisation over (N, H, W) per channel.

    input [N, C, H, W]; running_mean, running_var [C] (used only when not training); weight,
    bias [C] or None (affine off). The arguments are in torch.nn.functional.batch_norm's order.
    -> (output [N, C, H, W] in input's dtype, save_mean [C], save_invstd [C]); the statistics are
    float32 for float16/bfloat16 input, else input's dtype.

    Training normalises with the batch mean and the biased batch variance, and returns them as
    save_mean and save_invstd = 1/sqrt(var + eps). Otherwise the running statistics are used
    and returned. With an empty batch the batch statistics are NaN (the mean of nothing):
    PyTorch leaves the running statistics alone in that case, and so must the caller.
    """
    # Half-precision sums over a whole batch lose too much, so statistics are kept in float32.
    stat_dtype = _stat_dtype(input)
    x = input.to(stat_dtype)
    if training:
        dims = (0, 2, 3)
        mean = x.mean(dims)
        var = (x - mean[:, None, None]).square().mean(dims)
        invstd = torch.rsqrt(var + eps)
    else:
        # Copies, not views: ops must not return aliases of their inputs.
        mean = running_mean.to(stat_dtype, copy=True)
        invstd = torch.rsqrt(running_var.to(stat_dtype) + eps)
    out = (x - mean[:, None, None]) * invstd[:, None, None]
    if weight is not None:
        out = out * weight.to(stat_dtype)[:, None, None]
    if bias is not None:
        out = out + bias.to(stat_dtype)[:, None, None]
    return out.to(input.dtype), mean, invstd


def update_running_stats(running_mean, running_var, save_mean, save_invstd, count, momentum,
                         eps):
    """running = (1 - momentum) * running + momentum * batch, in place (either may be None),
    from a training batch_norm's save_mean / save_invstd over ``count`` values per channel.
    The batch variance is recovered in float64 as 1/save_invstd^2 - eps and made unbiased
    (times count / (count - 1)), as torch.nn.BatchNorm2d's running_var is. count == 0 (an
    empty batch) changes nothing, as in PyTorch."""
    if count == 0:
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(save_mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            var = (save_invstd.double().reciprocal().square() - eps).clamp_min(0)
            unbiased = var * (count / (count - 1)) if count > 1 else var
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def bn_relu(input, running_mean, running_var, weight, bias, residual, training, eps, relu):
    """relu?(batch_norm(input) + residual?): the end of a residual block, or a pre-activation.

    input [N, C, H, W]; residual [N, C, H, W] or None; relu a bool; the rest as batch_norm.
    -> (output [N, C, H, W], save_mean [C], save_invstd [C])
    """
    out, mean, invstd = batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    return out, mean, invstd


def batch_norm_stats(input):
    """Per-channel batch mean and biased variance: input [N, C, H, W] -> (mean [C], var [C]) in
    the statistics dtype. The local half of a synchronised BatchNorm (cnnops.distributed), which
    merges every process's before normalising."""
    x = input.to(_stat_dtype(input))
    mean = x.mean((0, 2, 3))
    return mean, (x - mean[:, None, None]).square().mean((0, 2, 3))


def bn_relu_backward_elemt(grad_output, output, input, weight, save_mean, save_invstd, mean_dy,
                           mean_dy_xhat, relu, output_mask):
    """The input and residual gradients of relu?(batch_norm(input) + residual) in training, from
    the gradient means over the whole batch: mean_dy = mean(gy), mean_dy_xhat = mean(gy * xhat),
    where gy is grad_output through the ReLU (zero where output <= 0) and
    xhat = (input - save_mean) * save_invstd. Over one process's batch these are the means of
    its own gy; a synchronised BatchNorm sums them over every process first.

    grad_input = weight * save_invstd * (gy - mean_dy - xhat * mean_dy_xhat), grad_residual = gy.
    grad_output, output, input [N, C, H, W]; the rest [C]. -> (grad_input, grad_residual), None
    where output_mask says not wanted.
    """
    dtype = _stat_dtype(input)
    per_channel = lambda t: t.to(dtype)[:, None, None]
    gy = grad_output.to(dtype)
    if relu:
        gy = torch.where(output > 0, gy, torch.zeros_like(gy))
    gi = gr = None
    if output_mask[0]:
        xhat = (input.to(dtype) - per_channel(save_mean)) * per_channel(save_invstd)
        scale = save_invstd if weight is None else weight.to(dtype) * save_invstd.to(dtype)
        gi = (per_channel(scale) * (gy - per_channel(mean_dy) - xhat * per_channel(mean_dy_xhat))
              ).to(input.dtype)
    if output_mask[1]:
        gr = gy.to(input.dtype)
    return gi, gr


def conv_bn_relu(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                 residual, stride, padding, dilation, groups, training, eps, relu):
    """relu?(batch_norm(conv2d(input)) + residual?).

    input [N, C, H, W], weight [OC, C/groups, KH, KW], conv_bias [OC] or None;
    bn_weight, bn_bias [OC] or None; running_mean, running_var [OC]; residual [N, OC, OH, OW]
    or None. -> (output [N, OC, OH, OW], conv_output, save_mean [OC], save_invstd [OC]), as the
    op returns: conv_output is the convolution's output [N, OC, OH, OW] in training (what the
    op keeps for its backward), an empty tensor otherwise.
    """
    conv_output = conv2d(input, weight, conv_bias, stride, padding, dilation, groups)
    out, mean, invstd = bn_relu(conv_output, running_mean, running_var, bn_weight, bn_bias,
                                residual, training, eps, relu)
    return out, conv_output if training else input.new_empty(0), mean, invstd


def _pool_windows(input, kernel_size, stride, padding, dilation, ceil_mode, fill):
    """Every pooling window of input, with the padding filled with `fill`.

    input [N, C, H, W] -> (windows [N, C, OH, OW, KH*KW] with the taps in row-major kernel order,
    rows [OH, KH], cols [OW, KW]): the input coordinates of the taps, which lie outside
    [0, H) x [0, W) where a tap falls in the padding.
    """
    coords, pads = [], []
    for size, k, s, p, d in zip(input.shape[2:], kernel_size, stride, padding, dilation):
        out = pool_output_size(size, k, p, s, d, ceil_mode)
        starts = torch.arange(out, device=input.device) * s - p
        coords.append(starts[:, None] + torch.arange(k, device=input.device) * d)
        # The last ceil-mode window may reach past the padding: pad far enough to cover it.
        pads.append((p, max(p, (out - 1) * s + d * (k - 1) + 1 - size - p)))
    rows, cols = coords
    (top, bottom), (left, right) = pads
    padded = F.pad(input, (left, right, top, bottom), value=fill)
    windows = padded[:, :, (rows + top)[:, :, None, None], (cols + left)[None, None]]
    # [N, C, OH, KH, OW, KW] -> [N, C, OH, OW, KH*KW]
    return windows.permute(0, 1, 2, 4, 3, 5).flatten(-2), rows, cols


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Max pooling with PyTorch's choice of element.

    input [N, C, H, W] -> (output [N, C, OH, OW], indices [N, C, OH, OW] int64: the flat
    position h*W + w of the chosen element in its input plane).

    PyTorch scans each window in row-major order and takes an element if it is NaN or greater
    than the best so far. So: the last NaN if the window has one, else the first element equal
    to the maximum; a window of -inf picks its first real element, never the padding.
    """
    h, w = input.shape[2:]
    windows, rows, cols = _pool_windows(input, kernel_size, stride, padding, dilation,
                                        ceil_mode, float("-inf"))
    flat_index = (rows[:, None, :, None] * w + cols[None, :, None, :]).flatten(-2)
    real = (((rows >= 0) & (rows < h))[:, None, :, None]
            & ((cols >= 0) & (cols < w))[None, :, None, :]).flatten(-2)  # [OH, OW, K]

    # Rank the taps so that a single argmax makes PyTorch's choice: NaNs score K + tap (the last
    # wins), real maxima K - tap (the first wins, and any NaN beats them), everything else 0.
    taps = torch.arange(windows.shape[-1], device=input.device)
    is_max = (windows == windows.amax(-1, keepdim=True)) & real
    score = torch.where(windows.isnan(), len(taps) + taps,
                        torch.where(is_max, len(taps) - taps, 0))
    choice = score.argmax(-1, keepdim=True)

    # Gathering the value makes autograd send the gradient to exactly the chosen element.
    output = windows.gather(-1, choice).squeeze(-1)
    indices = flat_index.expand(windows.shape).gather(-1, choice).squeeze(-1)
    return output, indices


def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    """Average pooling with PyTorch's divisors.

    input [N, C, H, W] -> output [N, C, OH, OW] (output size as max_pool2d with dilation 1).

    Each window's sum is divided by divisor_override if given; else, with count_include_pad,
    by the number of taps in the padded input (the padding counts, a ceil-mode overhang past it
    does not); else by the number of taps on real input elements.
    """
    h, w = input.shape[2:]
    windows, rows, cols = _pool_windows(input, kernel_size, stride, padding, (1, 1),
                                        ceil_mode, 0.0)
    sums = windows.sum(-1)
    if divisor_override is not None:
        return sums / divisor_override
    ph, pw = padding if count_include_pad else (0, 0)
    # The counted region is a rectangle, so the count is a product of per-dimension counts.
    count_h = ((rows >= -ph) & (rows < h + ph)).sum(1)
    count_w = ((cols >= -pw) & (cols < w + pw)).sum(1)
    return sums / (count_h[:, None] * count_w[None, :]).to(input.dtype)


def _adaptive_average_matrix(in_size, out_size, like):
    """[out_size, in_size] matrix whose row o averages bin o = [floor(o*In/Out), ceil((o+1)*In/Out))."""
    o = torch.arange(out_size, device=like.device)[:, None]
    i = torch.arange(in_size, device=like.device)
    start = o * in_size // out_size
    end = ((o + 1) * in_size + out_size - 1) // out_size
    inside = ((i >= start) & (i < end)).to(like.dtype)
    return inside / (end - start).to(like.dtype)


def adaptive_avg_pool2d(input, output_size):
    """Adaptive average pooling: input [N, C, H, W] -> output [N, C, OH, OW].

    Bins may overlap and differ in size. Averaging is linear and separable, so it is
    A_h @ x @ A_w^T with one averaging matrix per dimension.
    """
    h, w = input.shape[2:]
    a_h = _adaptive_average_matrix(h, output_size[0], input)
    a_w = _adaptive_average_matrix(w, output_size[1], input)
    return a_h @ input @ a_w.T


def add_relu(input, other):
    """relu(input + other), e.g. the join of a residual block. input, other [N, C, H, W]."""
    return torch.relu(input + other)

"""Triton pooling kernels: max, average and adaptive average pooling, forward and backward.

Launchers take arguments normalised as the cnnops:: ops receive them (pairs are
sequences of two ints, ``input`` is [N, C, H, W]) and return new tensors.

Layout: every kernel walks its output in memory order, one flat block of output
elements per program, and reads its other operands through their strides. So
contiguous NCHW, channels_last (NHWC) and arbitrary strided views are read in
place, and for channels_last neighbouring lanes are neighbouring channels, which
keeps loads and stores coalesced in both layouts. Outputs are channels_last when
the input is channels_last (and not also contiguous), NCHW-contiguous otherwise;
gradients take the layout of ``input``.

Backward kernels gather: each program owns a block of grad_input elements and
sums the gradient of every output window that contains them, in a fixed order
(ascending output row, then column, as aten's sequential scatter adds). No
atomics, so the result is deterministic.

Sums accumulate in float32 (float64 for float64 inputs) and round once to the
input dtype.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._shapes import pool_output_size
from . import _common as common
from ._common import block_offsets as _block_offsets
from ._common import zeros as _zeros

_MAX_BLOCK = 512
# Triton's interpreter runs program instances one after another, each op costing
# mostly fixed Python overhead: fewer, larger blocks are much faster there.
_MAX_BLOCK_INTERPRETED = 4096


# ---------------------------------------------------------------------------
# Launch helpers (Python ints only: no data-dependent control flow).

def _block(total):
    """Elements per program: up to _MAX_BLOCK, but no larger than the problem.

    Small problems then run as one program instance and compile only a few
    block-size variants.
    """
    cap = _MAX_BLOCK_INTERPRETED if common.INTERPRET else _MAX_BLOCK
    return max(64, min(cap, triton.next_power_of_2(total)))


def _launch(kernel, total, *args, **meta):
    block = _block(total)
    wrap_triton(kernel)[(triton.cdiv(total, block),)](
        *args, BLOCK=block, num_warps=max(1, min(4, block // 128)), **meta)


# ---------------------------------------------------------------------------
# Shared kernel pieces.

@triton.jit
def _unravel(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of flat offsets into a dense [N, C, H, W] tensor in the given layout."""
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        w = offs % W
        t = offs // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, h, w


# ---------------------------------------------------------------------------
# max_pool2d

@triton.jit
def _max_pool2d_fwd_kernel(
        x_ptr, out_ptr, idx_ptr, total, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw,
        KH, KW, SH, SW, PH, PW, DH, DW,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, oh, ow = _unravel(offs, C, OH, OW, CHANNELS_LAST)
    base = x_ptr + n * sxn + c * sxc
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    best = _zeros(BLOCK, ACC_F64) - float("inf")
    # -1 until the window's first real tap: the marker of a window with no tap at all.
    best_idx = tl.full([BLOCK], -1, tl.int64)
    for kh in range(0, KH):
        ih = h0 + kh * DH
        row_ok = mask & (ih >= 0) & (ih < H)
        row_ptr = base + ih * sxh
        row_idx = ih.to(tl.int64) * W
        for kw in range(0, KW):
            iw = w0 + kw * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(row_ptr + iw * sxw, mask=ok, other=0.0).to(best.dtype)
            # aten's rule in row-major scan order: a strictly greater value or a NaN
            # replaces the best (first of equal maxima, last NaN); a window of -inf
            # reports its first real tap, never the padding.
            take = ok & ((v > best) | (v != v) | (best_idx < 0))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, row_idx + iw, best_idx)
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + offs, best_idx, mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(
        gout_ptr, idx_ptr, gin_ptr, total, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sin_, sic, sih, siw,
        KH, KW, SH, SW, PH, PW, DH, DW,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, ih, iw = _unravel(offs, C, H, W, CHANNELS_LAST)
    target = (ih * W + iw).to(tl.int64)
    g_base = gout_ptr + n * sgn + c * sgc
    i_base = idx_ptr + n * sin_ + c * sic
    acc = _zeros(BLOCK, ACC_F64)
    # Tap kh of window oh lies on row oh*SH - PH + kh*DH, so row ih is tap kh of
    # window (ih + PH - kh*DH) / SH when that divides; descending kh gives
    # ascending oh. Each window containing the element is met exactly once.
    for i in range(0, KH):
        th = ih + PH - (KH - 1 - i) * DH
        oh = th // SH
        row_ok = mask & (th >= 0) & (th % SH == 0) & (oh < OH)
        i_row = i_base + oh * sih
        g_row = g_base + oh * sgh
        for j in range(0, KW):
            tw = iw + PW - (KW - 1 - j) * DW
            ow = tw // SW
            ok = row_ok & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            chosen = tl.load(i_row + ow * siw, mask=ok, other=-1)
            hit = ok & (chosen == target)
            acc += tl.load(g_row + ow * sgw, mask=hit, other=0.0).to(acc.dtype)
    tl.store(gin_ptr + offs, acc.to(gin_ptr.dtype.element_ty), mask=mask)


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Max pooling with PyTorch's choice of element.

    input [N, C, H, W] -> (output [N, C, OH, OW] in input's dtype,
    indices [N, C, OH, OW] int64: the flat offset h*W + w of the chosen element in
    its input plane; -1 for a window holding no input element at all).

    Ties go to the first maximum in row-major window order, a NaN wins (the last
    NaN of the window), a window of -inf reports its first real element.
    """
    N, C, H, W = input.shape
    OH = pool_output_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode)
    OW = pool_output_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode)
    cl = common.channels_last(input)
    output = common.empty(input, (N, C, OH, OW))
    indices = common.empty(input, (N, C, OH, OW), torch.int64)
    total = output.numel()
    if total == 0:
        return output, indices
    _launch(_max_pool2d_fwd_kernel, total,
            input, output, indices, total, C, H, W, OH, OW, *input.stride(),
            kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1],
            CHANNELS_LAST=cl, IDX64=common.needs_int64(input, output), ACC_F64=common.is_fp64(input))
    return output, indices


def max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation):
    """Gradient of max_pool2d: grad_output [N, C, OH, OW] -> grad_input [N, C, H, W].

    indices [N, C, OH, OW] int64 are max_pool2d's, and kernel_size, stride, padding,
    dilation the pairs it was given. The kernel gathers: each input element visits
    only the KH*KW windows that can contain it and adds the gradient of those whose
    index names it; index -1 (a window with no input element) and any index outside
    the plane send nothing.
    """
    N, C, H, W = input.shape
    cl = common.channels_last(input)
    grad_input = common.empty(input, (N, C, H, W))
    if grad_input.numel() == 0:
        return grad_input
    if grad_output.numel() == 0:
        return grad_input.zero_()
    OH, OW = grad_output.shape[2:]
    total = grad_input.numel()
    _launch(_max_pool2d_bwd_kernel, total,
            grad_output, indices, grad_input, total, C, H, W, OH, OW,
            *grad_output.stride(), *indices.stride(),
            kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1],
            CHANNELS_LAST=cl, IDX64=common.needs_int64(grad_output, indices, grad_input),
            ACC_F64=common.is_fp64(input))
    return grad_input


# ---------------------------------------------------------------------------
# avg_pool2d

@triton.jit
def _avg_window(start, size, pad, K, COUNT_INCLUDE_PAD: tl.constexpr):
    """Length along one dimension of avg_pool2d windows starting at `start`, aten's rule.

    With count_include_pad: the length in the padded input, so the padding counts
    but a ceil-mode overhang past the padded border does not; else the number of
    real input elements.
    """
    end = tl.minimum(start + K, size + pad)
    if COUNT_INCLUDE_PAD:
        n = end - start
    else:
        n = tl.minimum(end, size) - tl.maximum(start, 0)
    return n


@triton.jit
def _avg_pool2d_fwd_kernel(
        x_ptr, out_ptr, total, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw,
        KH, KW, SH, SW, PH, PW, DIVISOR,
        COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, oh, ow = _unravel(offs, C, OH, OW, CHANNELS_LAST)
    base = x_ptr + n * sxn + c * sxc
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    acc = _zeros(BLOCK, ACC_F64)
    for kh in range(0, KH):
        ih = h0 + kh
        row_ok = mask & (ih >= 0) & (ih < H)
        row_ptr = base + ih * sxh
        for kw in range(0, KW):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            acc += tl.load(row_ptr + iw * sxw, mask=ok, other=0.0).to(acc.dtype)
    if HAS_DIVISOR:
        out = acc / DIVISOR
    else:
        divisor = (_avg_window(h0, H, PH, KH, COUNT_INCLUDE_PAD)
                   * _avg_window(w0, W, PW, KW, COUNT_INCLUDE_PAD))
        # The padding rules leave no window without input; should one occur, it
        # averages to 0 as in the CPU kernels instead of dividing by zero.
        out = tl.where(divisor > 0, acc / tl.maximum(divisor, 1).to(acc.dtype), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _avg_pool2d_bwd_kernel(
        gout_ptr, gin_ptr, total, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw,
        KH, KW, SH, SW, PH, PW, DIVISOR,
        COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, ih, iw = _unravel(offs, C, H, W, CHANNELS_LAST)
    g_base = gout_ptr + n * sgn + c * sgc
    acc = _zeros(BLOCK, ACC_F64)
    # As in max_pool2d's backward: row ih is tap kh of window (ih + PH - kh) / SH.
    # A window's taps past the padded border are never real elements, so every
    # window found this way holds the element and counts it.
    for i in range(0, KH):
        th = ih + PH - (KH - 1 - i)
        oh = th // SH
        row_ok = mask & (th >= 0) & (th % SH == 0) & (oh < OH)
        g_row = g_base + oh * sgh
        if not HAS_DIVISOR:
            div_h = _avg_window(oh * SH - PH, H, PH, KH, COUNT_INCLUDE_PAD)
        for j in range(0, KW):
            tw = iw + PW - (KW - 1 - j)
            ow = tw // SW
            ok = row_ok & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            g = tl.load(g_row + ow * sgw, mask=ok, other=0.0).to(acc.dtype)
            if HAS_DIVISOR:
                acc += g
            else:
                div_w = _avg_window(ow * SW - PW, W, PW, KW, COUNT_INCLUDE_PAD)
                # Lanes that are not a window of this element may have a zero divisor.
                acc += g / tl.where(ok, div_h * div_w, 1).to(acc.dtype)
    if HAS_DIVISOR:
        acc = acc / DIVISOR
    tl.store(gin_ptr + offs, acc.to(gin_ptr.dtype.element_ty), mask=mask)


def _avg_args(kernel_size, stride, padding, count_include_pad, divisor_override):
    """Positional geometry and the divisor-mode constexprs of the avg_pool2d kernels."""
    args = (kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
            1 if divisor_override is None else int(divisor_override))
    meta = dict(COUNT_INCLUDE_PAD=bool(count_include_pad),
                HAS_DIVISOR=divisor_override is not None)
    return args, meta


def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    """Average pooling with PyTorch's divisors.

    input [N, C, H, W] -> output [N, C, OH, OW] (the max_pool2d output size with
    dilation 1). Each window's sum is divided by divisor_override if given (an int
    > 0, else None); else, with count_include_pad, by its size in the padded input
    (a ceil-mode overhang past the padding does not count); else by the number of
    real input elements in it.
    """
    N, C, H, W = input.shape
    OH = pool_output_size(H, kernel_size[0], padding[0], stride[0], 1, ceil_mode)
    OW = pool_output_size(W, kernel_size[1], padding[1], stride[1], 1, ceil_mode)
    cl = common.channels_last(input)
    output = common.empty(input, (N, C, OH, OW))
    total = output.numel()
    if total == 0:
        return output
    args, meta = _avg_args(kernel_size, stride, padding, count_include_pad, divisor_override)
    _launch(_avg_pool2d_fwd_kernel, total,
            input, output, total, C, H, W, OH, OW, *input.stride(),
            *args, CHANNELS_LAST=cl, IDX64=common.needs_int64(input, output),
            ACC_F64=common.is_fp64(input), **meta)
    return output


def avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override):
    """Gradient of avg_pool2d: grad_output [N, C, OH, OW] -> grad_input [N, C, H, W].

    The pooling arguments are avg_pool2d's; input supplies the shape, dtype and layout.
    """
    N, C, H, W = input.shape
    cl = common.channels_last(input)
    grad_input = common.empty(input, (N, C, H, W))
    total = grad_input.numel()
    if total == 0:
        return grad_input
    OH, OW = grad_output.shape[2:]
    if OH == 0 or OW == 0:
        return grad_input.zero_()
    args, meta = _avg_args(kernel_size, stride, padding, count_include_pad, divisor_override)
    _launch(_avg_pool2d_bwd_kernel, total,
            grad_output, grad_input, total, C, H, W, OH, OW, *grad_output.stride(),
            *args, CHANNELS_LAST=cl, IDX64=common.needs_int64(grad_output, grad_input),
            ACC_F64=common.is_fp64(input), **meta)
    return grad_input


# ---------------------------------------------------------------------------
# adaptive_avg_pool2d

@triton.jit
def _adaptive_bin(o, size, out_size):
    """aten's bin o of `size` inputs split `out_size` ways.

    [floor(o*size/out_size), ceil((o+1)*size/out_size)).
    """
    # o*size can pass 2^31 while both factors fit in int32; the bounds themselves fit.
    o64 = o.to(tl.int64)
    start = (o64 * size) // out_size
    end = ((o64 + 1) * size + out_size - 1) // out_size
    return start.to(o.dtype), end.to(o.dtype)


@triton.jit
def _adaptive_avg_pool2d_fwd_kernel(
        x_ptr, out_ptr, total, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw, MAX_KH, MAX_KW,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, oh, ow = _unravel(offs, C, OH, OW, CHANNELS_LAST)
    base = x_ptr + n * sxn + c * sxc
    h_start, h_end = _adaptive_bin(oh, H, OH)
    w_start, w_end = _adaptive_bin(ow, W, OW)
    acc = _zeros(BLOCK, ACC_F64)
    # Bins differ in size; loop to the largest and mask the rest.
    for i in range(0, MAX_KH):
        ih = h_start + i
        row_ok = mask & (ih < h_end)
        for j in range(0, MAX_KW):
            iw = w_start + j
            ok = row_ok & (iw < w_end)
            acc += tl.load(base + ih * sxh + iw * sxw, mask=ok, other=0.0).to(acc.dtype)
    count = ((h_end - h_start) * (w_end - w_start)).to(acc.dtype)
    tl.store(out_ptr + offs, (acc / count).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_avg_pool2d_bwd_kernel(
        gout_ptr, gin_ptr, total, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, MAX_OKH, MAX_OKW,
        CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ACC_F64: tl.constexpr,
        BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    n, c, ih, iw = _unravel(offs, C, H, W, CHANNELS_LAST)
    g_base = gout_ptr + n * sgn + c * sgc
    # The bins holding input row ih are the outputs [floor(ih*OH/H), ceil((ih+1)*OH/H)):
    # the same formula with the roles of the sizes swapped.
    oh_start, oh_end = _adaptive_bin(ih, OH, H)
    ow_start, ow_end = _adaptive_bin(iw, OW, W)
    acc = _zeros(BLOCK, ACC_F64)
    for i in range(0, MAX_OKH):
        oh = oh_start + i
        row_ok = mask & (oh < oh_end)
        h_start, h_end = _adaptive_bin(oh, H, OH)
        for j in range(0, MAX_OKW):
            ow = ow_start + j
            ok = row_ok & (ow < ow_end)
            w_start, w_end = _adaptive_bin(ow, W, OW)
            count = tl.where(ok, (h_end - h_start) * (w_end - w_start), 1).to(acc.dtype)
            g = tl.load(g_base + oh * sgh + ow * sgw, mask=ok, other=0.0).to(acc.dtype)
            acc += g / count
    tl.store(gin_ptr + offs, acc.to(gin_ptr.dtype.element_ty), mask=mask)


def _max_bin(size, out_size):
    """The most elements one adaptive bin of `size` split `out_size` ways can hold."""
    return -(-size // out_size) + (0 if size % out_size == 0 else 1)


def adaptive_avg_pool2d(input, output_size):
    """Adaptive average pooling: input [N, C, H, W] -> output [N, C, OH, OW].

    Output (oh, ow) averages rows [floor(oh*H/OH), ceil((oh+1)*H/OH)) and the same
    for columns; bins may overlap, differ in size and repeat (OH > H).
    """
    N, C, H, W = input.shape
    OH, OW = output_size
    cl = common.channels_last(input)
    output = common.empty(input, (N, C, OH, OW))
    total = output.numel()
    if total == 0:
        return output
    _launch(_adaptive_avg_pool2d_fwd_kernel, total,
            input, output, total, C, H, W, OH, OW, *input.stride(),
            _max_bin(H, OH), _max_bin(W, OW),
            CHANNELS_LAST=cl, IDX64=common.needs_int64(input, output), ACC_F64=common.is_fp64(input))
    return output


def adaptive_avg_pool2d_backward(grad_output, input):
    """Gradient of adaptive_avg_pool2d: grad_output [N, C, OH, OW] -> grad_input [N, C, H, W]."""
    N, C, H, W = input.shape
    cl = common.channels_last(input)
    grad_input = common.empty(input, (N, C, H, W))
    total = grad_input.numel()
    if total == 0:
        return grad_input
    OH, OW = grad_output.shape[2:]
    if OH == 0 or OW == 0:
        return grad_input.zero_()
    _launch(_adaptive_avg_pool2d_bwd_kernel, total,
            grad_output, grad_input, total, C, H, W, OH, OW, *grad_output.stride(),
            _max_bin(OH, H), _max_bin(OW, W),
            CHANNELS_LAST=cl, IDX64=common.needs_int64(grad_output, grad_input),
            ACC_F64=common.is_fp64(input))
    return grad_input

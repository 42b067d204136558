"""Triton elementwise kernels: add + ReLU (the residual join) and the ReLU-mask backward.

Layout: the output is channels_last when the layout-giving operand is a
channels_last 4-D tensor (and not also contiguous), contiguous otherwise. The
kernels walk the output in memory order; an operand laid out like the output is
read at the same flat offset, any other (strided view, expanded broadcast,
other layout) through its strides, so nothing is copied. Tensors of fewer than
4 dimensions are handled as 4-D with leading size-1 dimensions.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _common as common
from ._common import block_offsets as _block_offsets

_MAX_BLOCK = 1024
_MAX_BLOCK_INTERPRETED = 16384  # see pool.py


def _memory_order_4d(t, channels_last):
    """A 4-D view of `t` whose dimensions run in the output's memory order (outermost first)."""
    if channels_last:
        return t.permute(0, 2, 3, 1)
    if t.dim() > 4:
        # Rare (the ops see [N, C, H, W] activations): merge the leading dimensions,
        # which copies only an operand whose strides do not allow it.
        return t.reshape((-1,) + tuple(t.shape[-3:]))
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


@triton.jit
def _offsets(offs, D1, D2, D3, s0, s1, s2, s3, DENSE: tl.constexpr):
    """Element offsets of a 4-D operand at the flat output offsets `offs`."""
    if DENSE:
        off = offs
    else:
        i3 = offs % D3
        t = offs // D3
        i2 = t % D2
        t = t // D2
        i1 = t % D1
        i0 = t // D1
        off = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
    return off


@triton.jit
def _add_relu_kernel(
        a_ptr, b_ptr, out_ptr, total, D1, D2, D3,
        sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
        A_DENSE: tl.constexpr, B_DENSE: tl.constexpr, UPCAST: tl.constexpr,
        IDX64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    a = tl.load(a_ptr + _offsets(offs, D1, D2, D3, sa0, sa1, sa2, sa3, A_DENSE), mask=mask)
    b = tl.load(b_ptr + _offsets(offs, D1, D2, D3, sb0, sb1, sb2, sb3, B_DENSE), mask=mask)
    if UPCAST:  # half / bfloat16: add in float32 and round once, as torch does
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    s = a + b
    # '<' rather than '<=' keeps NaN and -0.0, as torch.relu does.
    out = tl.where(s < 0, 0.0, s)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_backward_kernel(
        g_ptr, y_ptr, out_ptr, total, D1, D2, D3,
        sg0, sg1, sg2, sg3, sy0, sy1, sy2, sy3,
        G_DENSE: tl.constexpr, Y_DENSE: tl.constexpr,
        IDX64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, IDX64, BLOCK)
    g = tl.load(g_ptr + _offsets(offs, D1, D2, D3, sg0, sg1, sg2, sg3, G_DENSE), mask=mask)
    y = tl.load(y_ptr + _offsets(offs, D1, D2, D3, sy0, sy1, sy2, sy3, Y_DENSE), mask=mask)
    # aten's threshold_backward: a select, not a product, so an inf gradient is not
    # turned into NaN where the output is 0, and a NaN output passes its gradient.
    out = tl.where(y <= 0, 0.0, g)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _binary(kernel, layout_of, first, second, **meta):
    """Launches `kernel(first, second) -> out` over the elements of `layout_of`'s shape."""
    cl = common.channels_last(layout_of)
    out = torch.empty(layout_of.shape, dtype=layout_of.dtype, device=layout_of.device,
                      memory_format=common.memory_format(layout_of))
    total = out.numel()
    if total == 0:
        return out
    o4, x4, y4 = (_memory_order_4d(t, cl) for t in (out, first, second))
    cap = _MAX_BLOCK_INTERPRETED if common.INTERPRET else _MAX_BLOCK
    block = max(128, min(cap, triton.next_power_of_2(total)))
    wrap_triton(kernel)[(triton.cdiv(total, block),)](
        x4, y4, out, total, o4.shape[1], o4.shape[2], o4.shape[3],
        *x4.stride(), *y4.stride(), x4.is_contiguous(), y4.is_contiguous(),
        IDX64=common.needs_int64(out, x4, y4), BLOCK=block, num_warps=4, **meta)
    return out


def add_relu(input, other):
    """relu(input + other).

    input, other: the same shape (typically [N, C, H, W]) and floating dtype, any
    strides -> output of that shape and dtype, laid out as input (see module doc).
    """
    return _binary(_add_relu_kernel, input, input, other,
                   UPCAST=input.dtype in (torch.float16, torch.bfloat16))


def add_relu_backward(grad_output, output):
    """Gradient through a ReLU given its result: grad_output where output > 0, else 0.

    grad_output, output: the same shape and dtype, any strides -> grad_input of that
    shape, laid out as output. Used for add_relu (both operands get it) and for the
    ReLU of the fused convolutions.
    """
    return _binary(_relu_backward_kernel, output, grad_output, output)

"""What every launcher shares: output layouts, accumulator precision, launch configs."""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from .._shapes import (conv_memory_format, conv_output_shape,  # noqa: F401 (shared rules)
                       memory_format, weight_grad_memory_format)

_HALF = (torch.float16, torch.bfloat16)


def channels_last(t):
    """The project's layout rule: channels_last in (and not also contiguous), channels_last out."""
    return memory_format(t) == torch.channels_last


def empty(like, shape, dtype=None, fmt=None):
    """An uninitialised [N, C, H, W] tensor on like's device, in like's layout (or ``fmt``)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                       memory_format=fmt or memory_format(like))


def stat_dtype(dtype):
    """Batch statistics and other per-channel sums: float32 for half types, else the dtype."""
    return torch.float32 if dtype in _HALF else dtype


def is_fp64(t):
    return t.dtype == torch.float64


def dot_precision(dtype):
    """tl.dot's input_precision: TF32 only for float32 and only when torch allows it for
    convolutions (torch.backends.cudnn.conv.fp32_precision / allow_tf32)."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is not None and precision != "none":
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def dot_upcast(dtype):
    """Whether tl.dot operands are widened to float32 first.

    Triton's CPU interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16);
    widening gives the same float32-accumulated result. Compiled kernels keep bf16 MMA.
    """
    return INTERPRET and dtype == torch.bfloat16


def configs(gpu, interpreted):
    """Autotuning configs: a small set on the GPU, one config under the interpreter.

    gpu: (meta dict, num_warps, num_stages) tuples; interpreted: one meta dict.
    """
    if INTERPRET:
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu]


def size_bucket(n):
    """A coarse power-of-two bucket of a problem size, used as an autotuning key so that
    tuning is redone per size class rather than per shape."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 20)


# Flat offsets stay in int32 (cheaper division on GPUs) unless some offset a kernel
# forms could pass this; the margin covers a block's overhang past the end.
_INT32_LIMIT = 2**31 - 2**16


def _span(t):
    """One past the largest element offset ``t`` addresses (its storage extent)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def needs_int64(*tensors):
    """Whether flat offsets into these tensors need 64 bits."""
    return any(max(t.numel(), _span(t)) > _INT32_LIMIT for t in tensors)


@triton.jit
def block_offsets(total, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat offsets of a 1-D launch over ``total`` elements, and their mask."""
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < total


@triton.jit
def zeros(BLOCK: tl.constexpr, FP64: tl.constexpr):
    """A [BLOCK] vector of zeros in the accumulator type (float64 for float64 data)."""
    if FP64:
        z = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        z = tl.zeros((BLOCK,), dtype=tl.float32)
    return z

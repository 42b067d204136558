"""The backends' op tables: what cnnops.functional calls.

cnnops.functional calls a backend's ops through one object with the normalised signatures of
cnnops.reference (the reference backend is that module itself): ``Ops(ns)`` for the compiled
ops (namespace ``cnnops``: the cpu and cuda backends, the dispatcher picking the kernel by
device) and the Triton ops (``cnnops_triton``), and ``BFloat16Ops`` for bfloat16 tensors on
the cpu backend.
"""
import torch

from . import _ext
from . import op_meta  # noqa: F401  (the compiled ops' fake kernels and FLOP formulas)


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
        # -> (output, conv_output, save_mean, save_invstd), conv_output kept for the backward
        self.conv_bn_relu = lib.conv_bn_relu
        # The lean mode's (cnnops.lean), which recomputes conv_output in its own backward
        self.conv_bn_relu_backward = lib.conv_bn_relu_backward


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


if _ext.LOADED:
    COMPILED = Ops("cnnops")
    COMPILED_BFLOAT16_CPU = BFloat16Ops(COMPILED)

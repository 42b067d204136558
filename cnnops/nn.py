"""Modules backed by cnnops ops.

Each subclasses its torch.nn twin, so constructor arguments, attributes and
state_dict keys are identical and checkpoints load both ways.
FusedConvBNReLU holds a ``conv`` (Conv2d) and a ``bn`` (BatchNorm2d), like
an unfused conv -> BN -> ReLU whose modules are named conv and bn.
"""
import torch
from torch import nn

from . import _ext, backends, lean
from . import functional as F

__all__ = ["Conv2d", "BatchNorm2d", "SyncBatchNorm", "BNReLU", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d", "AddReLU", "FusedConvBNReLU", "apply_conv_bn_relu",
           "apply_bn_relu", "apply_conv_relu"]


def _conv_input_and_padding(conv, x):
    """Applies a non-zero padding_mode by explicit padding, as torch.nn.Conv2d does."""
    if conv.padding_mode != "zeros":
        return (torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice,
                                        mode=conv.padding_mode), (0, 0))
    return x, conv.padding


def _sync_group(bn):
    """The process group a SyncBatchNorm (torch's or cnnops') in training synchronises over
    (its own, else the default group), as nn.SyncBatchNorm.forward decides; None for any other
    BN, in eval mode, or without an initialised torch.distributed."""
    if not (bn.training and isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm))
            and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return bn.process_group or torch.distributed.group.WORLD


def _bn_mode(bn):
    """torch.nn.BatchNorm2d's forward logic, shared by BatchNorm2d and FusedConvBNReLU.

    Returns (training, momentum, running_mean, running_var) for the functional
    call and counts the batch in num_batches_tracked.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (training, momentum, bn.running_mean if keep else None,
            bn.running_var if keep else None)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d on cnnops.functional.conv2d. [N, C, H, W] -> [N, OC, OH, OW]"""

    def forward(self, input):
        x, padding = _conv_input_and_padding(self, input)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on cnnops.functional.batch_norm. [N, C, H, W] -> same"""

    def forward(self, input):
        self._check_input_dim(input)
        training, momentum, rm, rv = _bn_mode(self)
        return F.batch_norm(input, rm, rv, self.weight, self.bias, training, momentum, self.eps)


class SyncBatchNorm(BatchNorm2d):
    """nn.SyncBatchNorm for [N, C, H, W] inputs on cnnops' synchronised BN, on every device.

    In training with torch.distributed initialised, the batch statistics span every process
    of ``process_group`` (None: the default group), as nn.SyncBatchNorm's do; otherwise it is
    BatchNorm2d. Same constructor arguments and state_dict as nn.SyncBatchNorm (a BatchNorm2d
    subclass, not an nn.SyncBatchNorm one: DistributedDataParallel refuses CPU models holding
    nn.SyncBatchNorm layers, and this one runs on the CPU with gloo). cnnops.fuse fuses it
    with the conv before it and the add / ReLU after it, as it does torch's.

    forward(x [N, C, H, W]) -> [N, C, H, W]
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, input):
        self._check_input_dim(input)
        return apply_bn_relu(self, input, None, relu=False)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``module`` with every BatchNorm2d (torch's or cnnops') and nn.SyncBatchNorm in it
        replaced by a cnnops SyncBatchNorm that shares its parameters and buffers, as
        nn.SyncBatchNorm.convert_sync_batchnorm does. BatchNorm subclasses with a forward of
        their own (e.g. timm's BatchNormAct2d) are left as they are."""
        out = module
        if type(module) in (nn.BatchNorm2d, BatchNorm2d, nn.SyncBatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class BNReLU(nn.BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) as one op; a BatchNorm2d with the same state_dict.

    forward(x [N, C, H, W], residual [N, C, H, W] or None) -> [N, C, H, W]
    """

    def __init__(self, *args, relu=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = relu

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        return apply_bn_relu(self, input, residual, self.relu)


def apply_bn_relu(bn, x, residual=None, relu=True, memory="fast"):
    """relu(bn(x) + residual) for any nn.BatchNorm2d or nn.SyncBatchNorm ``bn``, as one op.

    Honours bn's mode and statistics settings exactly as bn(x) would (and
    updates its running statistics in training); an nn.SyncBatchNorm synchronises its
    statistics over its process group, as it would (cnnops.distributed).
    """
    training, momentum, rm, rv = _bn_mode(bn)
    return F.bn_relu(x, rm, rv, bn.weight, bn.bias, training, momentum, bn.eps, relu, residual,
                     _sync_group(bn), memory)


# cnnops' CPU inference ops (reached only where the extension loaded: see _inference_op)
_INFERENCE = _INTO_RESIDUAL = None
if _ext.LOADED:
    _INFERENCE = torch.ops.cnnops.conv_bn_relu_inference.default
    _INTO_RESIDUAL = torch.ops.cnnops.conv_bn_relu_into_residual.default
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def _inference_op(conv, bn, x, residual, relu, into=False):
    """relu(bn(conv(x)) + residual) with BN as in inference (from its running statistics,
    whatever bn.training says: the callers decide), as the cpu backend's one inference op
    (cnnops::conv_bn_relu_inference) -> the output; with ``into``, written over the residual
    (cnnops::conv_bn_relu_into_residual, for cnnops.fuse's residuals that nothing reads
    afterwards) -> residual.

    None, with nothing written, where the call needs the general path: autograd may record
    it (grad mode on), x is not a plain 4-D CPU tensor of a dtype the cpu backend runs,
    another backend is set, another tensor is not on the CPU, torch.autocast or
    torch.compile's tracing is on, the convolution pads other than with zeros or by a string
    ("same"), BN has no running statistics, or the op refuses an argument (the general
    path's checks then name it).

    One Python frame from the modules to the op, with no more checks than that: it runs once
    per layer of a model's inference, between two convolutions that have just evicted the
    interpreter's code and data from the caches, where each further call or attribute read
    costs microseconds. (ResNet-50 inference, batch 1, 64x64, 2 threads: the three calls and
    the checks that conv_bn_relu's general fast path puts before its op measured about 1 ms
    of 13.)
    """
    if (_grad_enabled() or type(x) is not torch.Tensor or not x.is_cpu or x.dim() != 4
            or x.dtype not in backends.CPU_DTYPES or not backends._cpu_takes_cpu_tensors
            or _any_autocast() or _compiling()
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        return None
    w, b, bw, bb = conv.weight, conv.bias, bn.weight, bn.bias
    rm, rv = bn.running_mean, bn.running_var
    if rm is None or rv is None or (into and not isinstance(residual, torch.Tensor)):
        return None
    for t in (w, b, bw, bb, rm, rv, residual):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_cpu):
            return None
    try:
        if into:
            _INTO_RESIDUAL(residual, x, w, b, bw, bb, rm, rv, conv.stride, conv.padding,
                           conv.dilation, conv.groups, bn.eps, relu)
            return residual
        return _INFERENCE(x, w, b, bw, bb, rm, rv, residual, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bn.eps, relu)
    except F._OP_ERRORS:
        return None


def apply_conv_bn_relu(conv, bn, x, residual=None, relu=True, memory="fast"):
    """relu(bn(conv(x)) + residual) for any nn.Conv2d ``conv`` and nn.BatchNorm2d ``bn``, as one op.

    Lets a model keep its own module names (and so its checkpoints) while
    running the fused op: e.g. a ResNet block calls
    ``apply_conv_bn_relu(self.conv2, self.bn2, out, residual=identity)``.
    memory: "fast" or "lean" (see cnnops.lean).
    """
    if not bn.training and memory == "fast":
        out = _inference_op(conv, bn, x, residual, relu)
        if out is not None:
            return out
    x, padding = _conv_input_and_padding(conv, x)
    training, momentum, rm, rv = _bn_mode(bn)
    return F.conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, conv.stride,
                          padding, conv.dilation, conv.groups, training, momentum, bn.eps, relu,
                          residual, _sync_group(bn), memory)


def apply_conv_relu(conv, x, residual=None):
    """relu(conv(x) + residual) for any nn.Conv2d ``conv`` (its bias included), as one op."""
    x, padding = _conv_input_and_padding(conv, x)
    return F.conv2d_relu(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                         conv.groups, residual)


class MaxPool2d(nn.MaxPool2d):
    """torch.nn.MaxPool2d on cnnops.functional.max_pool2d. [N, C, H, W] -> [N, C, OH, OW]"""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode, self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    """torch.nn.AvgPool2d on cnnops.functional.avg_pool2d. [N, C, H, W] -> [N, C, OH, OW]"""

    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d on cnnops.functional.adaptive_avg_pool2d."""

    def forward(self, input):
        return F.adaptive_avg_pool2d(input, self.output_size)


class AddReLU(nn.Module):
    """relu(input + other): the end of a residual block. Shapes broadcast as torch.add."""

    def forward(self, input, other):
        return F.add_relu(input, other)


class FusedConvBNReLU(nn.Module):
    """conv -> BatchNorm -> (+ residual) -> ReLU as one op.

    Same parameters, buffers and state_dict keys as an unfused block holding
    ``conv`` (an nn.Conv2d) and ``bn`` (an nn.BatchNorm2d): ``conv.weight``,
    ``conv.bias`` (when bias=True), ``bn.weight``, ``bn.bias``,
    ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``.
    Train mode normalises with batch statistics and updates the running ones;
    eval mode folds BN into the convolution. memory="lean" keeps no conv output for the
    backward, which recomputes it (cnnops.lean); "fast" (the default) keeps it.

    forward(x [N, C, H, W], residual [N, OC, OH, OW] or None) -> [N, OC, OH, OW]
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, eps=1e-5, momentum=0.1, relu=True, memory="fast"):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias)
        self.bn = BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = relu
        self.memory = lean.check_memory(memory)

    @classmethod
    def from_modules(cls, conv, bn, relu=True, memory="fast"):
        """A fused block that shares (does not copy) ``conv``'s and ``bn``'s parameters and buffers."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError("expected an nn.Conv2d and an nn.BatchNorm2d, got %s and %s"
                            % (type(conv).__name__, type(bn).__name__))
        if conv.out_channels != bn.num_features:
            raise ValueError("conv has %d output channels but bn normalises %d features"
                             % (conv.out_channels, bn.num_features))
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.conv, block.bn, block.relu = conv, bn, relu
        block.memory = lean.check_memory(memory)
        return block

    def extra_repr(self):
        return "relu=%s" % self.relu + (", memory=%r" % self.memory if self.memory != "fast"
                                        else "")

    def forward(self, x, residual=None):
        return apply_conv_bn_relu(self.conv, self.bn, x, residual, self.relu,
                                  getattr(self, "memory", "fast"))

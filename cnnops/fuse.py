"""cnnops.fuse: swap cnnops's fused ops into a model you already have.

    model = cnnops.fuse(model)              # a copy; fuse(model, inplace=True) changes model
    for r in cnnops.fusion_report(model):   # one record per candidate site
        print(r.name, r.pattern, r.status, r.reason)

What changes is only *how* forward runs. The module tree, parameters, buffers,
state_dict keys and values, class, attributes and hooks stay as they were, so
checkpoints load both ways (strict) and the model can be deep-copied, pickled,
moved with .to() and compiled.

How: each module's forward is traced with torch.fx (leaf modules such as
convolutions, BatchNorms, pools and activations are not traced through),
matched node groups are replaced by one call of a fused op that takes the
model's own modules as arguments, e.g.
``cnnops.nn.apply_conv_bn_relu(self.layer1[0].conv2, self.layer1[0].bn2, x, residual=identity)``
(so BN's running statistics are updated in place, as the module would), and
the generated code is installed as that module's forward (an instance
attribute, not a new module). A module whose forward cannot be traced keeps
it; the submodule that broke the trace is left as a call and fused inside on
its own, and so on down.

Patterns (module calls and functional spellings alike: nn.ReLU(inplace=True),
F.relu, torch.relu, x.relu(), ``x + y``, torch.add, ``out += identity``):

- conv -> BN (-> + residual) (-> ReLU)           cnnops conv_bn_relu
- BN (-> + residual) -> ReLU, BN -> + residual    cnnops bn_relu (pre-activation, DenseNet)
- conv (+ bias) (-> + residual) -> ReLU, no BN    cnnops conv2d_relu
- relu(x + y)                                     cnnops add_relu
- max / avg / adaptive-avg pooling (2-D)          cnnops pooling

nn.SyncBatchNorm and cnnops.nn.SyncBatchNorm fuse as BN does, their statistics synchronised
over their process group in training (cnnops.distributed); alone too, since torch's own runs on
GPUs only.
FrozenBatchNorm-style modules (fixed weight/bias/running_mean/running_var
buffers, torchvision detection backbones) fuse as inference-mode BN. timm's
BatchNormAct2d (a BatchNorm2d applying its own ``drop`` and ``act``; the ``bn``
of timm's ConvNormAct) fuses as BN -> ReLU when its act is ReLU, as a plain BN
when it is Identity, also alone; its drop must be Identity.

Exactness rules: a conv output used by anything but its BN/ReLU blocks the
fusion, so does a BN output used twice; an in-place add may only write into a
tensor nothing else reads; a chain is not fused across an in-place op that
could change its inputs; a conv->BN without ReLU is not fused when its output
is later modified in place (the fused op keeps its output for backward);
activations without a cnnops kernel (ReLU6, LeakyReLU, SiLU, ...),
modules with hooks and subclasses that override forward are left alone. Python
branches on ``self.training`` are honoured by tracing train and eval separately.
BatchNorm subclasses are not traced into (each is a site, fused or reported), and
a forward that writes into a tensor in place while traced (a buffer's ``add_``)
keeps its forward: tracing would run the write once, at fuse time, not each call.
Residual adds whose operands turn out at run time to need broadcasting or type
promotion run the original ops.
"""
import copy
import dataclasses
import functools
import keyword
import operator

import torch
import torch.fx as fx
import torch.nn.functional as TF
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from . import backends
from . import functional as CF
from . import nn as cnn
from ._shapes import conv_output_size
from . import lean as _lean
from .lean import check_memory
from .nn import _conv_input_and_padding, apply_bn_relu, apply_conv_bn_relu, apply_conv_relu

__all__ = ["fuse", "fusion_report", "FusionRecord"]


@dataclasses.dataclass(frozen=True)
class FusionRecord:
    """One candidate site.

    name: qualified name of the site's module (the BN for BN sites, the conv for
    conv-ReLU, the pool) or ``scope:op`` for a function call inside module
    ``scope`` (e.g. ``layer1.0:add``); pattern: e.g. ``conv-bn-add-relu``;
    status: ``fused`` or ``skipped``; reason: why (or a note for fused sites).
    """
    name: str
    pattern: str
    status: str
    reason: str = ""


_RECORDS_ATTR = "_cnnops_fusion_records"


# ---------------------------------------------------------------------------
# Run-time helpers: the targets of the rewritten graphs. Each takes the
# model's own modules and falls back to the original ops where the fused op's
# stricter contract (same shapes and dtypes, 4-D input) does not hold.

def _combine(t, residual, how):
    """The original residual add: t + r (how=0), t += r (1) or r += t (2)."""
    if how == 1:
        t += residual
        return t
    if how == 2:
        residual += t
        return residual
    return t + residual


def _conv_out_shape(conv, x):
    n, _, h, w = x.shape
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return (n, conv.out_channels, h, w)
        padding = (0, 0)
    else:
        padding = conv.padding
    out = [conv_output_size(size, k, p, s, d) for size, p, d, k, s in
           zip((h, w), padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (n, conv.out_channels, out[0], out[1])


def _fits(residual, x, shape):
    return (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
            and residual.device == x.device and residual.shape == shape)


def conv_bn_relu_residual(conv, bn, x, residual=None, relu=True, how=0, memory="fast"):
    """relu(bn(conv(x)) + residual) as one cnnops::conv_bn_relu when x is 4-D and shapes and
    dtypes match (the original modules otherwise: a SyncBatchNorm takes any input)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        return apply_conv_bn_relu(conv, bn, x, residual, relu, memory)
    out = bn(conv(x))
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def bn_relu_residual(bn, x, residual=None, relu=True, how=0):
    """relu(bn(x) + residual) as one cnnops::bn_relu when x is 4-D and shapes and dtypes match
    (the original modules otherwise: a SyncBatchNorm takes any input)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, x.shape)):
        return apply_bn_relu(bn, x, residual, relu)
    out = bn(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def conv_frozen_bn_relu(conv, bn, x, residual=None, relu=True, how=0):
    """conv -> FrozenBatchNorm (inference-mode BN from its buffers) (-> + residual) (-> ReLU)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        xp, padding = _conv_input_and_padding(conv, x)
        return CF.conv_bn_relu(xp, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                               bn.running_var, conv.stride, padding, conv.dilation, conv.groups,
                               False, 0.0, bn.eps, relu, residual)
    out = bn(conv(x))
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def frozen_bn_relu(bn, x, residual=None, relu=True, how=0):
    """FrozenBatchNorm (-> + residual) (-> ReLU) as one inference-mode cnnops::bn_relu."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, x.shape)):
        return CF.bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                          bn.eps, relu, residual)
    out = bn(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out) if relu else out


def conv_relu(conv, x, residual=None, how=0):
    """relu(conv(x) + residual) as one cnnops::conv2d_relu (4-D input; else the original ops)."""
    if x.dim() == 4 and (residual is None or _fits(residual, x, _conv_out_shape(conv, x))):
        return apply_conv_relu(conv, x, residual)
    out = conv(x)
    if residual is not None:
        out = _combine(out, residual, how)
    return torch.relu(out)


def add_relu(input, other, how=0):
    """relu(input + other) as one cnnops::add_relu; an in-place add must keep input's shape."""
    if (isinstance(input, torch.Tensor) and isinstance(other, torch.Tensor)
            and input.dtype == other.dtype and input.is_floating_point()
            and input.device == other.device
            and (how == 0 or input.shape == other.shape)):
        return CF.add_relu(input, other)
    if how == 1:
        input += other
        return torch.relu(input)
    if how == 2:
        other += input
        return torch.relu(other)
    return torch.relu(input + other)


def activation(act, x):
    """An activation module's forward, out of place (for an in-place module whose input is a
    fused op's output, which that op keeps for backward)."""
    if isinstance(act, nn.Hardtanh):  # ReLU6 too
        return TF.hardtanh(x, act.min_val, act.max_val)
    if isinstance(act, nn.LeakyReLU):
        return TF.leaky_relu(x, act.negative_slope)
    if isinstance(act, nn.ELU):
        return TF.elu(x, act.alpha)
    if isinstance(act, nn.CELU):
        return TF.celu(x, act.alpha)
    if isinstance(act, nn.SELU):
        return TF.selu(x)
    if isinstance(act, nn.SiLU):
        return TF.silu(x)
    if isinstance(act, nn.Mish):
        return TF.mish(x)
    if isinstance(act, nn.Hardswish):
        return TF.hardswish(x)
    if isinstance(act, nn.Hardsigmoid):
        return TF.hardsigmoid(x)
    return act(x)


_OUT_OF_PLACE_ACTIVATIONS = (nn.Hardtanh, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
                             nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid)


def _poolable(x):
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """cnnops max_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode,
                             return_indices)
    return TF.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                         return_indices=return_indices)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """cnnops avg_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                             divisor_override)
    return TF.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)


def adaptive_avg_pool2d(input, output_size):
    """cnnops adaptive_avg_pool2d for 4-D floating input, torch's otherwise."""
    if _poolable(input):
        return CF.adaptive_avg_pool2d(input, output_size)
    return TF.adaptive_avg_pool2d(input, output_size)


def max_pool2d_module(pool, x):
    """An nn.MaxPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                             pool.ceil_mode, pool.return_indices)
    return pool(x)


def avg_pool2d_module(pool, x):
    """An nn.AvgPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                             pool.count_include_pad, pool.divisor_override)
    return pool(x)


def adaptive_avg_pool2d_module(pool, x):
    """An nn.AdaptiveAvgPool2d's forward on cnnops (4-D floating input)."""
    if _poolable(x):
        return CF.adaptive_avg_pool2d(x, pool.output_size)
    return pool(x)


# cnnops's own fused ops, kept as calls by tracing and reported as fused:
# function: (pattern, index of its relu argument, index of its residual argument)
_ALREADY = {
    apply_conv_bn_relu: ("conv-bn", 4, 3), apply_bn_relu: ("bn", 3, 2),
    apply_conv_relu: ("conv-relu", None, 2), CF.conv_bn_relu: ("conv-bn", 14, 15),
    CF.bn_relu: ("bn", 8, 9), CF.conv2d_relu: ("conv-relu", None, 7),
    CF.add_relu: ("add-relu", None, None), CF.max_pool2d: ("max_pool2d", None, None),
    CF.avg_pool2d: ("avg_pool2d", None, None),
    CF.adaptive_avg_pool2d: ("adaptive_avg_pool2d", None, None),
}
_HELPERS = (conv_bn_relu_residual, bn_relu_residual, conv_frozen_bn_relu, frozen_bn_relu,
            conv_relu, add_relu, activation, max_pool2d, avg_pool2d, adaptive_avg_pool2d,
            max_pool2d_module,
            avg_pool2d_module, adaptive_avg_pool2d_module)
_LEAF_FUNCTIONS = tuple(_ALREADY) + (CF.conv2d, CF.batch_norm) + _HELPERS


# ---------------------------------------------------------------------------
# Module classification

_CONV_FORWARDS = {nn.Conv2d.forward, cnn.Conv2d.forward}
_BN_FORWARDS = {_BatchNorm.forward, cnn.BatchNorm2d.forward}
_POOL_MODULES = {nn.MaxPool2d: (nn.MaxPool2d.forward, max_pool2d_module, "max_pool2d"),
                 nn.AvgPool2d: (nn.AvgPool2d.forward, avg_pool2d_module, "avg_pool2d"),
                 nn.AdaptiveAvgPool2d: (nn.AdaptiveAvgPool2d.forward, adaptive_avg_pool2d_module,
                                        "adaptive_avg_pool2d")}
_CNNOPS_POOLS = {cnn.MaxPool2d: "max_pool2d", cnn.AvgPool2d: "avg_pool2d",
                 cnn.AdaptiveAvgPool2d: "adaptive_avg_pool2d"}
_NO_KERNEL_POOLS = (nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d)
_ACTIVATION_MODULES = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
                       nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                       nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Threshold, nn.LogSigmoid, nn.Softsign,
                       nn.Tanhshrink)
_ACTIVATION_FUNCTIONS = {TF.relu6: "relu6", TF.leaky_relu: "leaky_relu", TF.prelu: "prelu",
                         TF.rrelu: "rrelu", TF.elu: "elu", TF.selu: "selu", TF.celu: "celu",
                         TF.gelu: "gelu", TF.silu: "silu", TF.mish: "mish",
                         TF.hardswish: "hardswish", TF.hardsigmoid: "hardsigmoid",
                         TF.hardtanh: "hardtanh", torch.sigmoid: "sigmoid", TF.sigmoid: "sigmoid",
                         torch.tanh: "tanh", TF.tanh: "tanh", TF.softplus: "softplus",
                         TF.threshold: "threshold"}
_ACTIVATION_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
_RELU_FUNCTIONS = {TF.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_POOL_FUNCTIONS = {
    # target: (cnnops.fuse helper, argument names of the original)
    TF.max_pool2d: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                 "ceil_mode", "return_indices")),
    TF._max_pool2d: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                  "ceil_mode", "return_indices")),
    TF.max_pool2d_with_indices: (max_pool2d, ("input", "kernel_size", "stride", "padding",
                                              "dilation", "ceil_mode", "return_indices")),
    torch.max_pool2d: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                    "ceil_mode")),
    TF.avg_pool2d: (avg_pool2d, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad", "divisor_override")),
    TF.adaptive_avg_pool2d: (adaptive_avg_pool2d, ("input", "output_size")),
    torch._C._nn.adaptive_avg_pool2d: (adaptive_avg_pool2d, ("input", "output_size")),
}
_NO_KERNEL_POOL_FUNCTIONS = {TF.adaptive_max_pool2d: "adaptive_max_pool2d",
                             TF.lp_pool2d: "lp_pool2d"}
_PURE_FUNCTION_MODULES = ("torch", "_operator", "operator", "builtins", "math", "cnnops")
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "narrow",
                 "select", "transpose", "permute", "squeeze", "unsqueeze", "expand", "expand_as",
                 "chunk", "split", "unbind", "t", "contiguous", "detach", "to", "type_as", "float",
                 "double", "half", "bfloat16", "movedim", "swapaxes", "diagonal", "unfold",
                 "as_strided", "__getitem__", "split_with_sizes", "tensor_split", "cpu", "cuda",
                 "type"}


def _has_hooks(m):
    """Hooks on m, or global module hooks (which would not run for a fused module call)."""
    from torch.nn.modules import module as _module
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks
                or getattr(_module, "_global_backward_pre_hooks", None))


def _is_lazy(m):
    return isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()


def _frozen_bn_like(m):
    """FrozenBatchNorm2d (torchvision.ops, detectron2): weight/bias/running_mean/running_var
    buffers, an eps, no parameters and a class name that says so."""
    name = type(m).__name__.lower()
    if isinstance(m, _BatchNorm) or "frozen" not in name or not ("norm" in name or "bn" in name):
        return False
    buffers = m._buffers
    need = ("weight", "bias", "running_mean", "running_var")
    return (all(isinstance(buffers.get(k), torch.Tensor) and buffers[k].dim() == 1 for k in need)
            and not m._parameters and not m._modules
            and isinstance(getattr(m, "eps", None), (int, float)))


def _is_cnnops_module(m):
    return type(m).__module__ == cnn.__name__


def _bn_act_like(m):
    """timm's BatchNormAct2d (timm.layers): a BatchNorm2d whose forward is BatchNorm2d's,
    rewritten in Python, then its ``drop`` and ``act`` submodules. Known by its class name and
    children (timm is not a dependency); a subclass that overrides its forward is not it."""
    if not isinstance(m, nn.BatchNorm2d) or set(m._modules) != {"drop", "act"}:
        return False
    for cls in type(m).__mro__:
        if cls.__name__ == "BatchNormAct2d":
            return type(m).forward is cls.__dict__.get("forward")
    return False


def _known_forward(m):
    """Whether m's forward is torch.nn's or cnnops's (so what it reads and writes is known)."""
    forward_module = getattr(type(m).forward, "__module__", "") or ""
    return (type(m).__module__.startswith(_TORCH_NN) or forward_module.startswith(_TORCH_NN)
            or _is_cnnops_module(m))


def _conv_reason(m):
    """Why conv module m cannot be fused (None if it can)."""
    if _has_hooks(m):
        return "conv has hooks"
    if (type(m).forward not in _CONV_FORWARDS
            or type(m)._conv_forward is not nn.Conv2d._conv_forward):
        return "%s overrides Conv2d.forward" % type(m).__name__
    if _is_lazy(m):
        return "conv parameters are not initialized (lazy)"
    return None


def _bn_kind(m):
    """('bn' | 'sync' | 'frozen' | 'act' | None, reason it is not fused or None) for a module
    call.

    'sync': an nn.SyncBatchNorm (statistics over its process group in training, see
    cnnops.distributed); 'act': a BatchNormAct2d whose drop is Identity and whose activation
    is ReLU (applied by the fused op) or Identity (a plain BN)."""
    if _frozen_bn_like(m):
        if _has_hooks(m):
            return None, "%s has hooks" % type(m).__name__
        return "frozen", None
    if not isinstance(m, _BatchNorm):
        return None, None
    if isinstance(m, (nn.SyncBatchNorm, cnn.SyncBatchNorm)):
        if type(m).forward not in (nn.SyncBatchNorm.forward, cnn.SyncBatchNorm.forward):
            return None, "%s overrides SyncBatchNorm.forward" % type(m).__name__
        if _has_hooks(m):
            return None, "BN has hooks"
        return "sync", None
    if not isinstance(m, nn.BatchNorm2d):
        return None, "%s is not a 2-D BatchNorm" % type(m).__name__
    if isinstance(m, cnn.BNReLU):
        return None, "already a cnnops BNReLU"
    act = _bn_act_like(m)
    if act:  # the fused op replaces its drop and act too
        if type(m.drop) is not nn.Identity:
            return None, ("%s applies %s after the BN; cnnops has no kernel for it"
                          % (type(m).__name__, type(m.drop).__name__))
        if type(m.act) not in (nn.ReLU, nn.Identity):
            return None, "%s has no cnnops kernel" % type(m.act).__name__
        if _has_hooks(m.drop) or _has_hooks(m.act):
            return None, "its act or drop has hooks"
    elif type(m).forward not in _BN_FORWARDS:
        return None, "%s overrides BatchNorm2d.forward" % type(m).__name__
    if _has_hooks(m):
        return None, "BN has hooks"
    if _is_lazy(m):
        return None, "BN parameters are not initialized (lazy)"
    return ("act" if act else "bn"), None


_TORCH_NN = ("torch.nn", "torch.ao.nn")


def _bn_act_suffix(m):
    """'-relu', '-silu', ... for a BatchNormAct2d's own activation ('' for Identity or not one)."""
    if not _bn_act_like(m) or type(m.act) is nn.Identity:
        return ""
    return "-" + type(m.act).__name__.lower()


def _is_leaf_type(m):
    """Modules tracing does not enter: torch.nn's own and subclasses that keep their forward
    (but containers), cnnops.nn's, frozen BN, and every BatchNorm subclass (timm's
    BatchNormAct2d, ...): a BN is a site to fuse or report, and its forward's Python is of no
    use traced (BatchNorm's counts the batch in place, see _ForbidInplaceWrites)."""
    if isinstance(m, torch.jit.ScriptModule):
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return _known_forward(m) or _frozen_bn_like(m) or isinstance(m, _BatchNorm)


# ---------------------------------------------------------------------------
# Tracing

class _InplaceProxyOps:
    """Records ``a += b`` as operator.iadd (fx's default turns it into ``a = a + b``, which
    would stop mutating tensors that other code sees)."""

    NAMES = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
             "iand", "ior", "ixor", "ilshift", "irshift")

    def __enter__(self):
        self.saved = {}
        for name in self.NAMES:
            dunder = "__%s__" % name
            self.saved[dunder] = fx.Proxy.__dict__.get(dunder)
            target = getattr(operator, name)

            def impl(self_, other, target=target):
                return self_.tracer.create_proxy("call_function", target, (self_, other), {})
            setattr(fx.Proxy, dunder, impl)
        return self

    def __exit__(self, *exc):
        for dunder, old in self.saved.items():
            if old is None:
                delattr(fx.Proxy, dunder)
            else:
                setattr(fx.Proxy, dunder, old)
        return False


class _Tracer(fx.Tracer):
    def __init__(self, opaque):
        super().__init__()
        self._autowrap_function_ids.update(id(f) for f in _LEAF_FUNCTIONS)
        self._autowrap_search = list(self._autowrap_search) + [CF, cnn]
        self.opaque = opaque
        self.traced_through = {}

    def is_leaf_module(self, m, module_qualified_name):
        return (id(m) in self.opaque or _is_leaf_type(m) or _has_hooks(m)
                or "forward" in m.__dict__)

    def call_module(self, m, forward, args, kwargs):
        if not self.is_leaf_module(m, ""):
            self.traced_through[id(m)] = m
        return super().call_module(m, forward, args, kwargs)


class _TraceFailure(Exception):
    pass


def _set_training(module, mode):
    saved = [(m, m.training) for m in module.modules()]
    for m, _ in saved:
        m.training = mode
    return saved


class _ModeChange(RuntimeError):
    pass


class _ForbidModeChanges:
    """no_grad / enable_grad / set_grad_enabled / inference_mode / autocast inside a forward
    would not survive tracing (the generated code would run without them): refuse them, so
    the module doing it keeps its forward."""

    def _patches(self):
        from torch.autograd import grad_mode
        from torch.amp import autocast_mode
        return [(grad_mode.no_grad, "__enter__"), (grad_mode.enable_grad, "__enter__"),
                (grad_mode.set_grad_enabled, "__init__"), (grad_mode.inference_mode, "__enter__"),
                (autocast_mode.autocast, "__enter__")]

    def __enter__(self):
        self.saved = []
        for cls, name in self._patches():
            self.saved.append((cls, name, cls.__dict__.get(name)))

            def refuse(*args, _what=cls.__name__, **kwargs):
                raise _ModeChange("forward uses %s, which tracing cannot keep" % _what)
            setattr(cls, name, refuse)
        return self

    def __exit__(self, *exc):
        for cls, name, old in self.saved:
            if old is None:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
        return False


class _InplaceWrite(RuntimeError):
    pass


class _ForbidInplaceWrites(TorchDispatchMode):
    """Tracing runs a forward's Python once, on proxies for its inputs and parameters, but
    its buffers and other tensor attributes reach that code as the real tensors: an in-place
    op on one (BatchNorm's ``self.num_batches_tracked.add_(1)``, ``self.count += 1``) would
    change the model now, at fuse time, and be missing from the traced code that replaces the
    forward. Only real tensors get here (ops on proxies are recorded, not run): refuse every
    write, so the module doing it keeps its forward."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            raise _InplaceWrite("forward writes into a tensor in place (%s), which tracing "
                                "cannot keep" % func)
        return func(*args, **(kwargs or {}))


def _snapshot(module):
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for m in module.modules()]


def _restore(snapshot):
    """Puts back every module's attributes; returns the modules whose attributes tracing
    changed (a forward that stores things on a module cannot be replaced by traced code)."""
    changed = []
    for m, d, params, buffers, mods in snapshot:
        extra = set(m.__dict__) - set(d)
        differs = any(k not in m.__dict__ or m.__dict__[k] is not v for k, v in d.items())
        for saved, now in ((params, m._parameters), (buffers, m._buffers), (mods, m._modules)):
            if saved.keys() != now.keys() or any(now[k] is not v for k, v in saved.items()):
                differs = True
                now.clear()
                now.update(saved)
        if differs or any(not k.startswith(("_tensor_constant", "_torchbind_obj"))
                          for k in extra):
            changed.append(m)
        m.__dict__.clear()
        m.__dict__.update(d)
    return changed


def _trace(module, mode, opaque, failed):
    """The fx graph of module.forward with every module in ``mode``.

    A submodule whose own forward breaks the trace (or changes module
    attributes, or grad/autocast mode) is added to ``opaque`` (kept as a call,
    reported in ``failed``) and the trace retried; a failure in module's own code
    raises _TraceFailure.
    """
    paths = {id(m): name for name, m in module.named_modules()}
    saved = _set_training(module, mode)
    try:
        for _ in range(len(paths) + 1):
            tracer = _Tracer(opaque)
            snapshot = _snapshot(module)
            error = None
            try:
                with _InplaceProxyOps(), _ForbidModeChanges(), _ForbidInplaceWrites():
                    graph = tracer.trace(module)
            except Exception as e:  # noqa: BLE001 - any error in user code under tracing
                error = e
            changed = _restore(snapshot)
            if error is None and not changed:
                for node in graph.nodes:
                    if node.op == "get_attr" and node.target.startswith(("_tensor_constant",
                                                                          "_torchbind_obj")):
                        raise _TraceFailure("forward creates tensors while tracing (constants)")
                return graph, tracer.traced_through
            culprit = None
            if error is not None:
                reason = _short(error)
                for qualname, _ in reversed(list(tracer.module_stack.values())):
                    sub = module.get_submodule(qualname) if qualname else module
                    if sub is not module and id(sub) not in opaque and not _is_leaf_type(sub):
                        culprit = sub
                        break
            else:
                reason = "forward sets module attributes, which tracing cannot keep"
                for sub in changed:
                    if sub is not module and id(sub) not in opaque and not _is_leaf_type(sub):
                        culprit = sub
                        break
            if culprit is None:
                raise _TraceFailure(reason) from error
            opaque.add(id(culprit))
            failed.setdefault(paths[id(culprit)], reason)
        raise _TraceFailure("could not isolate the untraceable submodules")
    finally:
        for m, training in saved:
            m.training = training


def _short(e):
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")


# ---------------------------------------------------------------------------
# Graph analysis helpers

def _only_node_args(node, n):
    return len(node.args) == n and all(isinstance(a, fx.Node) for a in node.args)


class _Rewriter:
    """Matches and replaces the fusable node groups of one traced graph."""

    def __init__(self, graph, root, prefix, memory):
        self.graph = graph
        self.memory = memory  # fuse's memory mode, passed to the conv-BN sites
        self.root = root
        self.prefix = prefix
        self.mods = dict(root.named_modules())
        self.records = []
        self.consumed = set()
        self.changed = False
        self.site_names = {}
        module_calls, scope_calls = {}, {}
        for node in graph.nodes:
            if node.op == "call_module":
                k = module_calls.get(node.target, 0)
                module_calls[node.target] = k + 1
                self.site_names[node] = self._qual(node.target) + ("@%d" % k if k else "")
            elif node.op in ("call_function", "call_method"):
                stack = node.meta.get("nn_module_stack") or {}
                scope = list(stack.values())[-1][0] if stack else ""
                op = node.target if isinstance(node.target, str) else getattr(
                    node.target, "__name__", "call")
                key = (scope, op)
                k = scope_calls.get(key, 0)
                scope_calls[key] = k + 1
                full = self._qual(scope)
                self.site_names[node] = ("%s:%s" % (full, op) if full else op) + (
                    "_%d" % k if k else "")

    # -- naming / records --------------------------------------------------
    def _qual(self, target):
        return ".".join(p for p in (self.prefix, target) if p)

    def record(self, name, pattern, status, reason=""):
        self.records.append(FusionRecord(name, pattern, status, reason))

    # -- node classification ----------------------------------------------
    def module(self, node):
        return self.mods.get(node.target) if node.op == "call_module" else None

    def conv(self, node):
        """The nn.Conv2d module of a single-input call, or None."""
        m = self.module(node)
        if isinstance(m, nn.Conv2d) and _only_node_args(node, 1) and not node.kwargs:
            return m
        return None

    def bn(self, node):
        m = self.module(node)
        if m is not None and _only_node_args(node, 1) and not node.kwargs:
            kind, reason = _bn_kind(m)
            if kind or reason:
                return m, kind, reason
        return None

    def relu(self, node):
        """(input node, inplace) of a ReLU in any spelling, or None."""
        if node.op == "call_module":
            m = self.module(node)
            if (type(m) is nn.ReLU and not _has_hooks(m) and _only_node_args(node, 1)
                    and not node.kwargs):
                return node.args[0], m.inplace
        elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
            args = list(node.args)
            if not args or not isinstance(args[0], fx.Node) or set(node.kwargs) - {"inplace"}:
                return None
            if node.target is TF.relu:
                inplace = node.kwargs.get("inplace", args[1] if len(args) > 1 else False)
                if len(args) > 2 or not isinstance(inplace, bool):
                    return None
                return args[0], inplace
            if len(args) != 1 or node.kwargs:
                return None
            return args[0], node.target is torch.relu_
        elif node.op == "call_method" and node.target in ("relu", "relu_"):
            if _only_node_args(node, 1) and not node.kwargs:
                return node.args[0], node.target == "relu_"
        return None

    def add(self, node):
        """(a, b, mutates_a) of a tensor add in any spelling, or None."""
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            mutates = node.target is operator.iadd
        elif node.op == "call_method" and node.target in ("add", "add_"):
            mutates = node.target == "add_"
        else:
            return None
        if not _only_node_args(node, 2) or set(node.kwargs) - {"alpha"}:
            return None
        if node.kwargs.get("alpha", 1) != 1 or isinstance(node.kwargs.get("alpha", 1), bool):
            return None
        a, b = node.args
        if a is b:
            return None
        return a, b, mutates

    def activation(self, node):
        """Name of an activation cnnops has no kernel for, or None."""
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, _ACTIVATION_MODULES):
                return type(m).__name__
        elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            return _ACTIVATION_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            return node.target.rstrip("_")
        return None

    def mutates(self, node):
        """Whether node may modify a tensor in place (conservatively)."""
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.endswith("__")
        if node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", "")
            if target is operator.setitem or name in _InplaceProxyOps.NAMES:
                return True
            if name.endswith("_") and not name.endswith("__"):
                return True
            if node.kwargs.get("inplace") is True:
                return True
            if target is TF.relu and len(node.args) > 1 and node.args[1] is True:
                return True
            if isinstance(target, type):  # e.g. a namedtuple
                return False
            module = getattr(target, "__module__", None) or ""
            return not module.startswith(_PURE_FUNCTION_MODULES)
        if node.op == "call_module":
            m = self.module(node)
            if m is None:
                return True
            if getattr(m, "inplace", False) is True:
                return True
            if isinstance(m, _BatchNorm) and not (_known_forward(m) or _bn_act_like(m)):
                return True  # a BN subclass's forward of its own, not traced
            return not _is_leaf_type(m)
        return False

    def fresh(self, node):
        """Whether node's value is a new tensor no other value aliases (safe to write into)."""
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, _BatchNorm):
                return _known_forward(m) or _bn_act_like(m)
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d,
                              nn.AdaptiveAvgPool2d)) or _frozen_bn_like(m):
                return True
            if type(m) is nn.ReLU:
                return (not m.inplace) or (self.fresh(node.args[0])
                                           and len(node.args[0].users) == 1)
            return False
        if node.op == "call_function":
            if node.target in (operator.add, operator.sub, operator.mul, operator.truediv,
                               torch.add, torch.cat, torch.relu) or node.target in _LEAF_FUNCTIONS:
                return True
            if node.target is TF.relu:
                return not node.kwargs.get("inplace", False)
        return False

    def mutated_later(self, node):
        """Whether node's value (or a view of it) is modified in place by a later node."""
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            for u in n.users:
                if u.op == "output":
                    continue
                if self.mutates(u) and u.args and u.args[0] is n:
                    return True
                if u.op == "call_module" and getattr(self.module(u), "inplace", False) is True:
                    return True
                if (u.op == "call_method" and u.target in _VIEW_METHODS) or (
                        u.op == "call_function" and (u.target is operator.getitem or getattr(
                            u.target, "__name__", "") in _VIEW_METHODS)):
                    todo.append(u)
                elif u.op == "call_module" and isinstance(self.module(u), (
                        nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout)):
                    todo.append(u)
        return False

    def clear_between(self, first, last, chain, bns=()):
        """No node strictly between first and last (outside chain) may mutate tensors or run
        one of the chain's BNs (the fused op runs at last's place)."""
        n = first.next
        while n is not last and n.op != "root":
            if n not in chain:
                if self.mutates(n):
                    return False
                if n.op == "call_module" and any(self.module(n) is b for b in bns):
                    return False
                if n.op == "call_function" and any(
                        isinstance(a, fx.Node) and a.op == "get_attr"
                        and any(self.mods.get(a.target) is b for b in bns) for a in n.args):
                    return False
            n = n.next
        return True

    # -- replacement -------------------------------------------------------
    def replace(self, chain, fn, args, kwargs=None):
        """Replace the node chain (in graph order) by fn(*args, **kwargs) at the last node."""
        end = chain[-1]
        with self.graph.inserting_before(end):
            args = tuple(self.graph.get_attr(a.target) if isinstance(a, _Module) else a
                         for a in args)
            new = self.graph.call_function(fn, args, kwargs or {})
        new.meta = dict(end.meta)
        end.replace_all_uses_with(new)
        for n in reversed(chain):
            self.graph.erase_node(n)
        self.consumed.update(chain)
        self.consumed.add(new)
        self.changed = True
        return new

    # -- passes ------------------------------------------------------------
    def run(self):
        nodes = list(self.graph.nodes)
        self.pass_already(nodes)
        self.pass_activations(nodes)
        for node in nodes:
            if node not in self.consumed and node.graph is self.graph and self.bn(node):
                self.fuse_bn(node)
        for node in list(self.graph.nodes):
            if node not in self.consumed and self.relu(node):
                self.fuse_relu(node)
        for node in list(self.graph.nodes):
            if node not in self.consumed:
                self.fuse_pool(node)
        self.graph.lint()
        return self.records, self.changed

    def pass_already(self, nodes):
        """Calls of cnnops's own fused ops and modules: reported as fused, left alone."""
        def arg(node, index, name, default):
            if name in node.kwargs:
                return node.kwargs[name]
            return node.args[index] if index is not None and len(node.args) > index else default

        for node in nodes:
            pattern = None
            if node.op == "call_function" and node.target in _ALREADY:
                base, i_relu, i_residual = _ALREADY[node.target]
                residual = arg(node, i_residual, "residual", None) is not None
                relu = arg(node, i_relu, "relu", True) if i_relu is not None else True
                if base in ("conv-bn", "bn"):
                    pattern = base + ("-add" if residual else "") + ("-relu" if relu else "")
                elif base == "conv-relu" and residual:
                    pattern = "conv-add-relu"
                else:
                    pattern = base
                mods = [a.target for a in node.args if isinstance(a, fx.Node)
                        and a.op == "get_attr" and isinstance(self.mods.get(a.target), nn.Module)]
                name = self._qual(mods[-1]) if mods else self.site_names[node]
            elif node.op == "call_module":
                m = self.module(node)
                residual = len(node.args) > 1 or node.kwargs.get("residual") is not None
                name = self.site_names[node]
                if isinstance(m, cnn.FusedConvBNReLU):
                    name += ".bn"
                    pattern = "conv-bn" + ("-add" if residual else "") + (
                        "-relu" if m.relu else "")
                elif isinstance(m, cnn.BNReLU):
                    pattern = "bn" + ("-add" if residual else "") + ("-relu" if m.relu else "")
                elif type(m) in _CNNOPS_POOLS:
                    pattern = _CNNOPS_POOLS[type(m)]
                elif isinstance(m, cnn.AddReLU):
                    pattern = "add-relu"
            if pattern is not None:
                self.record(name, pattern, "fused", "already a cnnops op")
                self.consumed.add(node)

    def pass_activations(self, nodes):
        """Activations without a cnnops kernel after a conv, BN or add: reported, left alone."""
        for node in nodes:
            act = self.activation(node)
            if act is None or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            bn = self.bn(src)
            if bn:
                inner = src.args[0]
                what = ("conv-bn" if self.conv(inner) else "bn") + _bn_act_suffix(bn[0])
            elif self.conv(src):
                what = "conv"
            elif self.add(src):
                what = "add"
            else:
                continue
            reason = "%s has no cnnops kernel" % act
            if act.lower() in ("relu6", "hardtanh"):
                reason += " (ReLU6 is not ReLU: it clips at 6)"
            if what.startswith("conv-bn"):
                reason += "; conv-BN fused without it"
            elif bn and bn[1] == "act":
                reason += "; the BN fused without it"
            elif what == "bn":
                reason += "; the BN stays unfused"
            self.record(self.site_names[node], "%s-%s" % (what, act.lower()), "skipped", reason)

    def fuse_bn(self, b):
        bn_m, kind, reason = self.bn(b)
        name = self.site_names[b]
        src = b.args[0]
        conv_m = self.conv(src)
        if reason:
            self.record(name, ("conv-bn" if conv_m is not None else "bn") + _bn_act_suffix(bn_m),
                        "skipped", reason)
            return
        # a BatchNormAct2d applies its ReLU itself: nothing after it joins the pattern
        own_relu = kind == "act" and type(bn_m.act) is nn.ReLU
        notes = []
        conv = None
        if conv_m is not None and src not in self.consumed:
            r = _conv_reason(conv_m)
            nfeat = bn_m.weight.shape[0] if kind == "frozen" else bn_m.num_features
            if r is None and len(src.users) != 1:
                r = "conv output used %d times" % len(src.users)
            if r is None and conv_m.out_channels != nfeat:
                r = "conv has %d output channels, BN %d" % (conv_m.out_channels, nfeat)
            if r is None and not self.clear_between(src, b, {src, b}):
                r = "an in-place op runs between conv and BN"
            if r is None:
                conv = src
            else:
                self.record(self.site_names[src], "conv-bn", "skipped", r)
                notes.append(r)
        chain = ([conv] if conv is not None else []) + [b]
        residual, how, relu = None, 0, own_relu
        users = [] if own_relu else list(b.users)
        if len(users) == 1:
            u = users[0]
            add = self.add(u)
            rl = self.relu(u)
            if add is not None:
                a, c, mut = add
                other = c if a is b else a
                how = (1 if a is b else 2) if mut else 0
                ok = True
                if how == 2 and not (self.fresh(other) and len(other.users) == 1):
                    ok = False
                    if not any(self.relu(n) for n in u.users):  # else the ReLU pass reports it
                        self.record(self.site_names[u], "bn-add", "skipped",
                                    "in-place add writes into %s, which is used elsewhere"
                                    % other.name)
                if ok:
                    chain.append(u)
                    residual = other
                    nxt = list(u.users)
                    if len(nxt) == 1 and self.relu(nxt[0]) and self.relu(nxt[0])[0] is u:
                        chain.append(nxt[0])
                        relu = True
                    elif len(nxt) > 1 and any(self.relu(n) for n in nxt):
                        notes.append("add output used %d times" % len(nxt))
            elif rl is not None and rl[0] is b:
                chain.append(u)
                relu = True
        elif len(users) > 1 and any(self.relu(u) or self.add(u) for u in users):
            r = "BN output used %d times" % len(users)
            notes.append(r)
        # alone, a BatchNormAct2d still becomes one op instead of its BN, drop and act calls,
        # and a SyncBatchNorm runs cnnops' synchronised BN (torch's runs on GPUs only)
        if len(chain) == 1 and kind not in ("act", "sync"):
            if not notes:
                notes.append("input is not a fusable conv output and no ReLU or add follows")
            self.record(name, "bn", "skipped", "; ".join(notes))
            return
        pattern = ("conv-bn" if conv is not None else "bn") + ("-add" if residual is not None
                                                                else "") + ("-relu" if relu else "")
        first, last = chain[0], chain[-1]
        if first is not last and not self.clear_between(first, last, set(chain), (bn_m,)):
            self.record(name, pattern, "skipped",
                        "an in-place op or another call of this BN runs inside the pattern")
            return
        swap = None
        if conv is not None and not relu and self.mutated_later(last):
            swap = self.inplace_activation(last)
            if swap is None:
                self.record(name, pattern, "skipped", "its output is modified in place later; "
                            "the fused op keeps it for backward")
                return
            notes.append("the in-place %s after it now runs out of place"
                         % (self.activation(swap) or swap.target))
        x = conv.args[0] if conv is not None else b.args[0]
        bn_ref = _Module(b.target)
        if kind == "sync":
            notes.append("SyncBatchNorm: statistics synchronised over its process group in "
                         "training")
        if kind == "frozen":
            notes.append("frozen BN fused as inference-mode BN")
            if conv is not None:
                self.replace(chain, conv_frozen_bn_relu,
                             (_Module(conv.target), bn_ref, x, residual, relu, how))
            else:
                self.replace(chain, frozen_bn_relu, (bn_ref, x, residual, relu, how))
        elif conv is not None:
            # (the default mode's calls do not spell it out; a synchronised BN has no lean mode)
            lean = {}
            if self.memory != "fast" and kind == "sync":
                notes.append("memory=%r is not implemented with a SyncBatchNorm: the default"
                             % self.memory)
            elif self.memory == "lean" and not _lean.recomputes(conv_m):
                notes.append("lean mode keeps its conv output: recomputing it costs %d "
                             "multiply-adds per element (> %d)"
                             % (_lean.recompute_cost(conv_m), _lean.RECOMPUTE_MAX_MACS))
            elif self.memory != "fast":
                lean = {"memory": self.memory}
                notes.append("memory=%r" % self.memory)
            # (a SyncBatchNorm takes inputs of any rank: the helpers check for a 4-D one)
            if residual is None and kind != "sync":
                self.replace(chain, apply_conv_bn_relu, (_Module(conv.target), bn_ref, x),
                             dict(relu=relu, **lean))
            else:
                self.replace(chain, conv_bn_relu_residual,
                             (_Module(conv.target), bn_ref, x, residual, relu, how), lean)
        else:
            if residual is None and kind != "sync":
                self.replace(chain, apply_bn_relu, (bn_ref, x), {"relu": relu})
            else:
                self.replace(chain, bn_relu_residual, (bn_ref, x, residual, relu, how))
        if swap is not None:
            self.out_of_place(swap)
        self.record(name, pattern, "fused", "; ".join(notes))

    def inplace_activation(self, node):
        """The sole user of node if it is an in-place activation that can run out of place."""
        users = list(node.users)
        if len(users) != 1:
            return None
        u = users[0]
        if not u.args or u.args[0] is not node or any(a is node for a in u.args[1:]):
            return None
        if u.op == "call_module":
            m = self.module(u)
            if (type(m) in _OUT_OF_PLACE_ACTIVATIONS and type(m).forward is getattr(
                    nn, type(m).__name__).forward and not _has_hooks(m)
                    and getattr(m, "inplace", False) is True and len(u.args) == 1
                    and not u.kwargs):
                return u
        elif u.op == "call_function":
            if (u.target in _ACTIVATION_FUNCTIONS and u.kwargs.get("inplace") is True
                    and self.activation(u)):
                return u
        elif u.op == "call_method" and u.target in ("sigmoid_", "tanh_") and len(u.args) == 1:
            return u
        return None

    def out_of_place(self, u):
        if u.op == "call_module":
            with self.graph.inserting_before(u):
                act = self.graph.get_attr(u.target)
                new = self.graph.call_function(activation, (act, u.args[0]))
            new.meta = dict(u.meta)
            u.replace_all_uses_with(new)
            self.graph.erase_node(u)
        elif u.op == "call_function":
            kwargs = dict(u.kwargs)
            kwargs["inplace"] = False
            u.kwargs = kwargs
        else:
            u.target = u.target[:-1]

    def fuse_relu(self, r):
        src, _ = self.relu(r)
        if src in self.consumed or src.op not in ("call_module", "call_function", "call_method"):
            return
        conv_m = self.conv(src)
        if conv_m is not None:
            reason = _conv_reason(conv_m)
            if reason is None and len(src.users) != 1:
                reason = "conv output used %d times" % len(src.users)
            if reason is None and not self.clear_between(src, r, {src, r}):
                reason = "an in-place op runs between conv and ReLU"
            if reason:
                self.record(self.site_names[src], "conv-relu", "skipped", reason)
                return
            self.replace([src, r], conv_relu, (_Module(src.target), src.args[0]))
            self.record(self.site_names[src], "conv-relu", "fused")
            return
        add = self.add(src)
        if add is None:
            return
        a, b, mut = add
        name = self.site_names[src]
        if len(src.users) != 1:
            self.record(name, "add-relu", "skipped", "add output used %d times" % len(src.users))
            return
        if mut and not (self.fresh(a) and len(a.users) == 1):
            self.record(name, "add-relu", "skipped",
                        "in-place add writes into %s, which is used elsewhere" % a.name)
            return
        if not self.clear_between(src, r, {src, r}):
            self.record(name, "add-relu", "skipped", "an in-place op runs between add and ReLU")
            return
        for c, other in ((b, a), (a, b)):
            cm = self.conv(c) if c not in self.consumed else None
            if (cm is not None and _conv_reason(cm) is None and len(c.users) == 1
                    and self.clear_between(c, r, {c, src, r})
                    and not (mut and c is b and not (self.fresh(other) and len(other.users) == 1))):
                how = (1 if c is a else 2) if mut else 0
                self.replace([c, src, r], conv_relu, (_Module(c.target), c.args[0], other, how))
                self.record(self.site_names[c], "conv-add-relu", "fused")
                return
        self.replace([src, r], add_relu, (a, b, 1 if mut else 0))
        self.record(name, "add-relu", "fused")

    def fuse_pool(self, node):
        if node.op == "call_module":
            m = self.module(node)
            spec = _POOL_MODULES.get(type(m))
            if spec is None:
                if isinstance(m, _NO_KERNEL_POOLS):
                    self.record(self.site_names[node], type(m).__name__, "skipped",
                                "no cnnops kernel for %s" % type(m).__name__)
                return
            forward, helper, pattern = spec
            if _has_hooks(m) or not _only_node_args(node, 1) or node.kwargs:
                self.record(self.site_names[node], pattern, "skipped",
                            "pool has hooks" if _has_hooks(m) else "unusual call")
                return
            self.replace([node], helper, (_Module(node.target), node.args[0]))
            self.record(self.site_names[node], pattern, "fused")
        elif node.op == "call_function":
            if node.target in _NO_KERNEL_POOL_FUNCTIONS:
                fn = _NO_KERNEL_POOL_FUNCTIONS[node.target]
                self.record(self.site_names[node], fn, "skipped", "no cnnops kernel for %s" % fn)
                return
            spec = _POOL_FUNCTIONS.get(node.target)
            if spec is None:
                return
            helper, names = spec
            if len(node.args) > len(names) or set(node.kwargs) - set(names):
                return
            kwargs = dict(zip(names, node.args))
            kwargs.update(node.kwargs)
            if node.target is TF.max_pool2d_with_indices:
                kwargs["return_indices"] = True
            elif node.target is torch.max_pool2d and kwargs.get("stride") in ((), []):
                kwargs["stride"] = None
            inp = kwargs.pop("input", None)
            if not isinstance(inp, fx.Node):
                return
            self.replace([node], helper, (inp,), kwargs)
            self.record(self.site_names[node], helper.__name__, "fused")


class _Module:
    """A reference to a submodule, turned into a get_attr node by _Rewriter.replace."""

    def __init__(self, target):
        self.target = target


# ---------------------------------------------------------------------------
# The installed forward

def _import_block(globals_):
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer
    return _format_import_block(globals_, sys_importer)


def _compile(source):
    from torch.fx.graph_module import _forward_from_src
    return _forward_from_src(source, {})


def _module_expr(path):
    """Python expression for the submodule at ``path`` of ``self``."""
    expr = "self"
    for part in path.split(".") if path else ():
        if part.isidentifier() and not keyword.iskeyword(part):
            expr = "%s.%s" % (expr, part)
        else:
            expr = "getattr(%s, %r)" % (expr, part)
    return expr


def _forward_source(codes, flag_paths):
    """One module's source for its fused forward.

    codes: the generated PythonCode for train mode and eval mode. When they
    differ (Python branches on ``self.training``), ``forward`` picks one by
    ``self.training``; if the modules it traced through disagree on their mode
    it runs the class's own forward.
    """
    globals_ = {}
    for code in codes:
        for name, obj in code.globals.items():
            if globals_.setdefault(name, obj) is not obj:
                raise RuntimeError("generated code binds %s to two objects" % name)
    lines = [_import_block(globals_)]
    if codes[0].src == codes[1].src:
        lines.append(codes[0].src)
        return "\n".join(lines)
    for code, mode in zip(codes, ("train", "eval")):
        lines.append(code.src.replace("def forward(", "def _cnnops_%s(" % mode, 1))
    checks = " or ".join("%s.training != mode" % _module_expr(p) for p in flag_paths if p)
    lines.append("def forward(self, *args, **kwargs):")
    lines.append("    mode = self.training")
    if checks:
        lines.append("    if %s:" % checks)
        lines.append("        return type(self).forward(self, *args, **kwargs)")
    lines.append("    if mode:")
    lines.append("        return _cnnops_train(self, *args, **kwargs)")
    lines.append("    return _cnnops_eval(self, *args, **kwargs)")
    return "\n".join(lines) + "\n"


class _FusedForward(functools.partial):
    """A module's fused forward: ``partial(generated_forward, module)``, set as the instance
    attribute ``forward`` (not a submodule: nothing in state_dict).

    The generated function is called directly (no Python frame of ours in
    between, so each fused module is its own code object for torch.compile).
    Pickles as its source text and recompiles; deep-copies with its module.
    """

    def __reduce__(self):
        return (_make_forward, (self.args[0], self.source))

    def __deepcopy__(self, memo):
        new = _FusedForward(self.func, copy.deepcopy(self.args[0], memo))
        new.source = self.source
        return new

    def __copy__(self):
        return self

    def __repr__(self):
        return "<cnnops fused forward of %s>" % type(self.args[0]).__name__


def _make_forward(owner, source):
    fn = _compile(source)
    fused = _FusedForward(fn, owner)
    fused.source = source
    return fused


# ---------------------------------------------------------------------------
# channels_last inference on the CPU

def to_channels_last(x):
    """x in channels_last where the CPU oneDNN core runs it natively (a 4-D float32 or
    bfloat16 CPU tensor on the cpu backend, oneDNN on, the core not forced to im2col);
    x itself otherwise."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and not x.is_contiguous(memory_format=torch.channels_last)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and backends.resolve(x) == "cpu" and backends.get_cpu_conv() != "im2col"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def restore_layout(out, *pairs):
    """out with its 4-D tensors back in the default layout when to_channels_last converted
    an input: pairs alternate each input and what to_channels_last returned for it."""
    if all(a is b for a, b in zip(pairs[::2], pairs[1::2])):
        return out
    return tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4
                    else t, out)


def conv_channels_last(conv, x):
    """conv(x) for an nn.Conv2d of a graph the channels_last pass rewrote. When x was taken
    to channels_last (a CPU tensor, see to_channels_last) it runs cnnops.functional.conv2d,
    whose oneDNN core keeps the weight packed in oneDNN's layout; nn.Conv2d would copy its
    NCHW weight to channels_last, and oneDNN reorder it, on every call. Otherwise conv(x)."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return conv(x)
    x, padding = _conv_input_and_padding(conv, x)
    return CF.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


# What the channels_last pass allows in a graph: ops whose results do not depend on the
# input's layout (a .view() of a channels_last activation raises, and other code may read
# strides, so any other op keeps the graph in the layout it was given).
_LAYOUT_FREE_FUNCTIONS = {torch.flatten, torch.cat, torch.relu, TF.relu, operator.add,
                          operator.iadd, TF.adaptive_avg_pool2d, TF.max_pool2d, TF.avg_pool2d,
                          TF.dropout, getattr}
_LAYOUT_FREE_MODULES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, _BatchNorm)


def _layout_free(node, mods):
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op == "call_function":
        return node.target in _LAYOUT_FREE_FUNCTIONS or getattr(
            node.target, "__module__", None) in (__name__, cnn.__name__)
    if node.op == "call_module":
        m = mods.get(node.target)
        return isinstance(m, _LAYOUT_FREE_MODULES) or _is_cnnops_module(m)
    return False


def _channels_last_inputs(graph, root):
    """Rewrites an eval-mode graph whose every op is layout-free to run its 4-D CPU inputs
    in channels_last (to_channels_last) and return its 4-D outputs in the default layout, as
    torch.compile's CPU freezing does. oneDNN runs channels_last convolutions without
    reordering the activations, and with a weight packed once (csrc/cpu/conv_core.h), and
    cnnops' CPU BatchNorm and pooling kernels read channels_last as it is: measured on
    ResNet-50 inference, batch 8, 2 cores, 1.14x -> 1.3x eager."""
    mods = dict(root.named_modules())
    if not all(_layout_free(n, mods) for n in graph.nodes):
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if not inputs:
        return False
    for node in list(graph.nodes):  # the convolutions fuse left as modules
        if (node.op == "call_module" and type(mods.get(node.target)) is nn.Conv2d
                and len(node.args) == 1 and not node.kwargs):
            with graph.inserting_before(node):
                conv = graph.call_function(conv_channels_last,
                                           (graph.get_attr(node.target), node.args[0]))
            conv.meta = dict(node.meta)
            node.replace_all_uses_with(conv)
            graph.erase_node(node)
    pairs = []
    with graph.inserting_after(inputs[-1]):
        for x in reversed(inputs):
            converted = graph.call_function(to_channels_last, (x,))
            x.replace_all_uses_with(converted, delete_user_cb=lambda u, c=converted: u is not c)
            pairs += [x, converted]
    with graph.inserting_before(output):
        restored = graph.call_function(restore_layout, (output.args[0], *pairs))
    output.args = (restored,)
    graph.lint()
    return True


# ---------------------------------------------------------------------------
# Driver

def _fuse_one(module, prefix, records, install, memory):
    """Trace module in train and eval mode, rewrite, install. Returns the submodules kept as
    calls that should be fused on their own."""
    opaque, failed = set(), {}
    results = []
    for mode in (True, False):
        graph, through = _trace(module, mode, opaque, failed)
        rewriter = _Rewriter(graph, module, prefix, memory)
        recs, changed = rewriter.run()
        if not mode and changed and not prefix:  # the model's own eval forward
            _channels_last_inputs(graph, module)
        code = graph.python_code(root_module="self")
        results.append((graph, through, recs, changed, code))
    # A submodule that broke the trace is kept as a call and reports itself in _process.
    seen = set()
    for _, _, recs, _, _ in results:
        for r in recs:
            if r not in seen:
                seen.add(r)
                records.append(r)
    if any(r[3] for r in results):
        paths = {id(m): name for name, m in module.named_modules()}
        through = {}
        for r in results:
            through.update(r[1])
        flag_paths = sorted({paths[i] for i in through if i in paths})
        forward = _make_forward(module, _forward_source([r[4] for r in results], flag_paths))
        if install:
            module.__dict__["forward"] = forward
    # Submodules left as calls (hooks, untraceable, instance forward) get fused on their own.
    mods = dict(module.named_modules())
    subs = {}
    for graph, _, _, _, _ in results:
        for node in graph.nodes:
            m = mods.get(node.target) if node.op in ("call_module", "get_attr") else None
            if isinstance(m, nn.Module) and m is not module and not _is_leaf_type(m):
                subs.setdefault(id(m), (node.target, m))
    return [(".".join(p for p in (prefix, t) if p), m) for t, m in subs.values()]


def _site(prefix):
    return prefix or "(root)"


def _untraced_children(module, prefix, records):
    """The children of a module whose forward is not traced, to be fused on their own. Its
    BN children are sites of that forward, which calls them as they are: reported here."""
    subs = []
    for n, child in module.named_children():
        name = ".".join(p for p in (prefix, n) if p)
        kind, reason = _bn_kind(child)
        if (kind or reason) and not isinstance(child, cnn.BNReLU):
            records.append(FusionRecord(name, "bn" + _bn_act_suffix(child), "skipped",
                                        reason or "in a module whose forward is not traced"))
        subs.append((name, child))
    return subs


def _process(module, prefix, records, install, done, memory="fast"):
    if id(module) in done:
        return
    done.add(id(module))
    if _is_leaf_type(module):
        # torch.nn's own containers (DataParallel, ...) are not traced, their children are
        subs = [] if isinstance(module, torch.jit.ScriptModule) else [
            (".".join(p for p in (prefix, n) if p), c) for n, c in module.named_children()]
    elif "forward" in module.__dict__:
        records.append(FusionRecord(_site(prefix), "trace", "skipped",
                                    "forward is replaced on the instance; fused inside instead"))
        subs = _untraced_children(module, prefix, records)
    else:
        saved_forward = module.__dict__.get("forward")
        n_records = len(records)
        try:
            subs = _fuse_one(module, prefix, records, install, memory)
        except _TraceFailure as e:
            del records[n_records:]
            records.append(FusionRecord(_site(prefix), "trace", "skipped",
                                        "forward cannot be traced (%s); fused inside instead"
                                        % e))
            subs = _untraced_children(module, prefix, records)
        except Exception as e:  # noqa: BLE001 - fusing must never break a working model
            del records[n_records:]
            if saved_forward is None:
                module.__dict__.pop("forward", None)
            records.append(FusionRecord(_site(prefix), "trace", "skipped",
                                        "not fused (%s); fused inside instead" % _short(e)))
            subs = _untraced_children(module, prefix, records)
    for name, sub in subs:
        _process(sub, name, records, install, done, memory)


def _strip(model):
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _FusedForward):
            del m.__dict__["forward"]
    model.__dict__.pop(_RECORDS_ATTR, None)


def _copy(model):
    """A deep copy of model that shares, not copies, the torch.distributed process groups its
    modules hold (a SyncBatchNorm's process_group: not copyable, and a copy would be another
    group)."""
    memo = {}
    if torch.distributed.is_available():
        for m in model.modules():
            for value in vars(m).values():
                if isinstance(value, torch.distributed.ProcessGroup):
                    memo[id(value)] = value
    return copy.deepcopy(model, memo)


def fuse(model, inplace=False, memory="fast"):
    """Return ``model`` (a deep copy unless inplace) running cnnops's fused ops.

    Same module tree, parameters, buffers and state_dict (keys and values), same
    outputs, gradients and running-statistic updates in train and eval mode.
    memory="lean": the fused conv-BN sites keep no conv output for the backward, which
    recomputes it (cnnops.lean): about half a conv-BN-ReLU network's activation memory in
    training, for one more convolution forward per site and step. Sites whose recomputation
    costs more than cnnops.lean.RECOMPUTE_MAX_MACS multiply-adds per element (3x3 convs over
    more than 256 channels) keep their conv output; the report says which. (cnnops' own
    FusedConvBNReLU modules keep their own setting.)
    On the CPU the eval forward runs a 4-D float32/bfloat16 input in channels_last, the
    layout oneDNN runs natively, and gives 4-D outputs back in the default layout, when every
    op of the traced graph is one whose result does not depend on the layout (else the graph
    runs in the layout it is given).
    Sites that could not be fused are left as they were;
    ``cnnops.fusion_report(fused)`` lists every candidate site and why.
    Never raises on a model that runs (the parts it cannot trace keep their
    forward).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("expected an nn.Module, got %s" % type(model).__name__)
    check_memory(memory)
    if not inplace:
        model = _copy(model)
    _strip(model)
    records = []
    _process(model, "", records, True, set(), memory)
    model.__dict__[_RECORDS_ATTR] = tuple(records)
    return model


def fusion_report(model):
    """One FusionRecord(name, pattern, status, reason) per candidate site.

    For a model returned by ``cnnops.fuse``, what that fusion did; for any other
    model, what ``fuse`` would do (the model is not modified).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("expected an nn.Module, got %s" % type(model).__name__)
    stored = model.__dict__.get(_RECORDS_ATTR)
    if stored is not None:
        return list(stored)
    try:
        work = _copy(model)
    except Exception:  # noqa: BLE001 - not copyable: analyse in place, installing nothing
        work = model
    records = []
    if work is not model:
        _strip(work)
    _process(work, "", records, False, set())
    return records

"""Which calls and modules are what: the pattern tables and module classification.

Lookup tables that tell calls and modules apart in a traced graph (cnnops's own fused ops,
ReLU and add spellings, activations and pools with and without a cnnops kernel, view
methods), and the predicates that classify a module (which BN kind, why a conv cannot be
fused, whether tracing enters it).
"""
import inspect
import operator

import torch
import torch.nn.functional as TF
from torch import nn

from .. import functional as CF
from .. import nn as cnn
from ..nn import apply_bn_relu, apply_conv_bn_relu, apply_conv_relu
from ._fx import (ADAPTIVE_AVG_POOL2D_C, MAX_POOL2D_NO_INDICES, BatchNormBase, conv_forward,
                  has_hooks, module_registries)
from .runtime import (activation, adaptive_avg_pool2d, adaptive_avg_pool2d_module, add_relu,
                      avg_pool2d, avg_pool2d_module, bn_relu_residual, conv_bn_relu_residual,
                      conv_frozen_bn_relu, conv_relu, frozen_bn_relu, max_pool2d,
                      max_pool2d_module)


def _arg_index(fn, name):
    """Index of fn's parameter ``name`` in its signature (None: fn has no such parameter)."""
    names = list(inspect.signature(fn).parameters)
    return names.index(name) if name in names else None


# cnnops's own fused ops, kept as calls by tracing and reported as fused:
# function: (pattern, index of its relu argument, index of its residual argument), the
# indices read off its signature (None: it has no such parameter)
_ALREADY = {fn: (pattern, _arg_index(fn, "relu"), _arg_index(fn, "residual"))
            for fn, pattern in (
                (apply_conv_bn_relu, "conv-bn"), (apply_bn_relu, "bn"),
                (apply_conv_relu, "conv-relu"), (CF.conv_bn_relu, "conv-bn"),
                (CF.bn_relu, "bn"), (CF.conv2d_relu, "conv-relu"),
                (CF.add_relu, "add-relu"), (CF.max_pool2d, "max_pool2d"),
                (CF.avg_pool2d, "avg_pool2d"),
                (CF.adaptive_avg_pool2d, "adaptive_avg_pool2d"))}
_HELPERS = (conv_bn_relu_residual, bn_relu_residual, conv_frozen_bn_relu, frozen_bn_relu,
            conv_relu, add_relu, activation, max_pool2d, avg_pool2d, adaptive_avg_pool2d,
            max_pool2d_module,
            avg_pool2d_module, adaptive_avg_pool2d_module)
_LEAF_FUNCTIONS = tuple(_ALREADY) + (CF.conv2d, CF.batch_norm) + _HELPERS


# ---------------------------------------------------------------------------
# Module classification

_CONV_FORWARDS = {nn.Conv2d.forward, cnn.Conv2d.forward}
_BN_FORWARDS = {BatchNormBase.forward, cnn.BatchNorm2d.forward}
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
# the in-place activation modules runtime.activation runs out of place
_OUT_OF_PLACE_ACTIVATIONS = (nn.Hardtanh, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
                             nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid)
_RELU_FUNCTIONS = {TF.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_POOL_FUNCTIONS = {
    # target: (cnnops.fuse helper, argument names of the original)
    TF.max_pool2d: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                 "ceil_mode", "return_indices")),
    MAX_POOL2D_NO_INDICES: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                  "ceil_mode", "return_indices")),
    TF.max_pool2d_with_indices: (max_pool2d, ("input", "kernel_size", "stride", "padding",
                                              "dilation", "ceil_mode", "return_indices")),
    torch.max_pool2d: (max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                    "ceil_mode")),
    TF.avg_pool2d: (avg_pool2d, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad", "divisor_override")),
    TF.adaptive_avg_pool2d: (adaptive_avg_pool2d, ("input", "output_size")),
    ADAPTIVE_AVG_POOL2D_C: (adaptive_avg_pool2d, ("input", "output_size")),
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
# the in-place operators (operator.iadd, ...: ``a += b``), which tracing records as such
_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                      "imatmul", "iand", "ior", "ixor", "ilshift", "irshift")


def _is_lazy(m):
    return isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()


def _frozen_bn_like(m):
    """FrozenBatchNorm2d (torchvision.ops, detectron2): weight/bias/running_mean/running_var
    buffers, an eps, no parameters and a class name that says so."""
    name = type(m).__name__.lower()
    if isinstance(m, BatchNormBase) or "frozen" not in name or not ("norm" in name or "bn" in name):
        return False
    parameters, buffers, children = module_registries(m)
    need = ("weight", "bias", "running_mean", "running_var")
    return (all(isinstance(buffers.get(k), torch.Tensor) and buffers[k].dim() == 1 for k in need)
            and not parameters and not children
            and isinstance(getattr(m, "eps", None), (int, float)))


def _is_cnnops_module(m):
    return type(m).__module__ == cnn.__name__


def _bn_act_like(m):
    """timm's BatchNormAct2d (timm.layers): a BatchNorm2d whose forward is BatchNorm2d's,
    rewritten in Python, then its ``drop`` and ``act`` submodules. Known by its class name and
    children (timm is not a dependency); a subclass that overrides its forward is not it."""
    if not isinstance(m, nn.BatchNorm2d) or set(module_registries(m)[2]) != {"drop", "act"}:
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
    if has_hooks(m):
        return "conv has hooks"
    if (type(m).forward not in _CONV_FORWARDS
            or conv_forward(type(m)) is not conv_forward(nn.Conv2d)):
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
        if has_hooks(m):
            return None, "%s has hooks" % type(m).__name__
        return "frozen", None
    if not isinstance(m, BatchNormBase):
        return None, None
    if isinstance(m, (nn.SyncBatchNorm, cnn.SyncBatchNorm)):
        if type(m).forward not in (nn.SyncBatchNorm.forward, cnn.SyncBatchNorm.forward):
            return None, "%s overrides SyncBatchNorm.forward" % type(m).__name__
        if has_hooks(m):
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
        if has_hooks(m.drop) or has_hooks(m.act):
            return None, "its act or drop has hooks"
    elif type(m).forward not in _BN_FORWARDS:
        return None, "%s overrides BatchNorm2d.forward" % type(m).__name__
    if has_hooks(m):
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
    use traced (BatchNorm's counts the batch in place, see trace._ForbidInplaceWrites)."""
    if isinstance(m, torch.jit.ScriptModule):
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return _known_forward(m) or _frozen_bn_like(m) or isinstance(m, BatchNormBase)



"""The private torch and torch.fx internals cnnops.fuse relies on, and nothing else.

Every use of an underscore name of torch (a private module, function, class or attribute)
by the fuse package goes through here, so a torch release that changes one breaks here.
"""
import torch
import torch.nn.functional as TF
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree
from torch.utils import _python_dispatch

# torch.nn.modules.batchnorm._BatchNorm: the base class of every torch BatchNorm (1-, 2-,
# 3-D, SyncBatchNorm, their subclasses), for isinstance checks and its forward.
BatchNormBase = _BatchNorm

# torch.utils._python_dispatch.TorchDispatchMode: the base class of a mode that sees every
# ATen op run on real tensors (tracing's in-place write guard is one).
TorchDispatchMode = _python_dispatch.TorchDispatchMode

# Private spellings of 2-D pools a traced graph may call: torch.nn.functional._max_pool2d
# (F.max_pool2d without return_indices) and torch._C._nn.adaptive_avg_pool2d.
MAX_POOL2D_NO_INDICES = TF._max_pool2d
ADAPTIVE_AVG_POOL2D_C = torch._C._nn.adaptive_avg_pool2d


# (a module's or the global hooks would not run for a fused module call)
def has_hooks(m):
    """Hooks on m (nn.Module's private _*_hooks dicts) or global ones (module._global_*_hooks)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks
                or getattr(_module, "_global_backward_pre_hooks", None))


def module_registries(m):
    """(m._parameters, m._buffers, m._modules): the dicts of m's own direct entries, as they are."""
    return m._parameters, m._buffers, m._modules


def conv_forward(cls):
    """cls._conv_forward: the private method through which nn.Conv2d.forward convolves."""
    return cls._conv_forward


def autowrap(tracer, functions, modules):
    """Adds to fx.Tracer's private _autowrap_function_ids and _autowrap_search (leaf calls)."""
    tracer._autowrap_function_ids.update(id(f) for f in functions)
    tracer._autowrap_search = list(tracer._autowrap_search) + list(modules)


def is_trace_constant(name):
    """Whether fx.Tracer named a constant it stored on the root so (_tensor_constant<n>, ...)."""
    return name.startswith(("_tensor_constant", "_torchbind_obj"))


def op_is_mutable(func):
    """func._schema.is_mutable: whether an ATen op overload writes into one of its arguments."""
    return func._schema.is_mutable


def tree_map(fn, tree):
    """torch.utils._pytree.tree_map: fn applied to every leaf of a nested structure."""
    return _pytree.tree_map(fn, tree)


def import_block(globals_):
    """torch.fx.graph_module._format_import_block: the import lines for generated code's globals."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer
    return _format_import_block(globals_, sys_importer)


def forward_from_source(source):
    """torch.fx.graph_module._forward_from_src: the function ``forward`` that source defines."""
    from torch.fx.graph_module import _forward_from_src
    return _forward_from_src(source, {})

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
- a convolution left alone (nothing after it to fuse with) runs cnnops conv2d where the call
  resolves to the cpu backend (its measured core choice), torch's conv elsewhere

On the CPU the eval forward runs in channels_last where the graph allows (layout.py), and a
conv -> BN -> + residual site whose residual nothing reads afterwards writes its result over
the residual in inference (reuse.py, cnnops conv_bn_relu_into_residual).

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
from torch import nn

from ..lean import check_memory
from . import runtime
from .codegen import _FusedForward, _make_forward
from .driver import _RECORDS_ATTR, _copy, _process, _strip
from .records import FusionRecord
# the run-time helpers (conv_bn_relu_residual, ..., to_channels_last, restore_layout): the
# generated forward's source imports them from here
from .runtime import *  # noqa: F401,F403

__all__ = ["fuse", "fusion_report", "FusionRecord"]


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
    runs in the layout it is given). In eval mode outside autograd, a conv-BN-add site whose
    residual nothing reads afterwards (a ResNet block's identity) writes its result over that
    residual instead of a new tensor, as torch.compile's freezing does (cnnops/fuse/reuse.py).
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


# Generated forwards (their source: ``from cnnops.fuse import conv_bn_relu_residual as
# cnnops_fuse_conv_bn_relu_residual``) and pickles (of a fused model: its FusionRecords, and
# cnnops.fuse._make_forward with that source) name these by reference, by the names they had
# when cnnops.fuse was one module. They keep them: importable from here, and with this
# module as theirs, so that pickles made before still load, and pickles and source made now
# do not depend on how this package is split into modules.
for _obj in (FusionRecord, _FusedForward, _make_forward) + tuple(
        getattr(runtime, _name) for _name in runtime.__all__):
    _obj.__module__ = __name__
del _obj

"""Driving the fusion over a model: each module traced, rewritten and given its fused forward,
then the submodules left as calls, down the tree.
"""
import copy

import torch
from torch import nn

from .. import nn as cnn
from .codegen import _FusedForward, _forward_source, _make_forward
from .layout import _channels_last_inputs
from .patterns import _bn_act_suffix, _bn_kind, _conv_reason, _is_leaf_type
from .records import FusionRecord
from .reuse import _reuse_dead_residuals
from .rewrite import _Rewriter
from .runtime import conv2d_on_cpu
from .trace import _TraceFailure, _short, _trace

# where fuse keeps a fused model's FusionRecords (an instance attribute)
_RECORDS_ATTR = "_cnnops_fusion_records"


def _lone_convs_to_cnnops(graph, module):
    """Rewrites the nn.Conv2d calls the fusion left (nothing after them to fuse with) to
    runtime.conv2d_on_cpu, which runs cnnops' conv2d on CPU tensors. Convolutions with hooks,
    an overridden forward or lazy parameters stay calls. -> whether any was rewritten."""
    mods = dict(module.named_modules())
    changed = False
    for node in list(graph.nodes):
        m = mods.get(node.target) if node.op == "call_module" else None
        if (isinstance(m, nn.Conv2d) and _conv_reason(m) is None and len(node.args) == 1
                and not node.kwargs):
            with graph.inserting_before(node):
                conv = graph.call_function(conv2d_on_cpu, (graph.get_attr(node.target),
                                                           node.args[0]))
            conv.meta = dict(node.meta)
            node.replace_all_uses_with(conv)
            graph.erase_node(node)
            changed = True
    return changed


def _fuse_one(module, prefix, records, install, memory):
    """Trace module in train and eval mode, rewrite, install. Returns the submodules kept as
    calls that should be fused on their own."""
    opaque, failed = set(), {}
    results = []
    for mode in (True, False):
        graph, through = _trace(module, mode, opaque, failed)
        rewriter = _Rewriter(graph, module, prefix, memory)
        recs, changed = rewriter.run()
        changed = _lone_convs_to_cnnops(graph, module) or changed
        _reuse_dead_residuals(graph)
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


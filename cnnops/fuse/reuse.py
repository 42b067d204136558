"""The residual-reuse pass: a fused conv-BN(-add)(-ReLU) whose residual nothing reads
afterwards is told so (reuse_residual=True), and in inference outside autograd writes its
result over the residual instead of into a new tensor (runtime.conv_bn_relu_residual,
runtime.conv_frozen_bn_relu), as torch.compile's CPU freezing reuses such a residual. Each
bottleneck of a ResNet then allocates one activation fewer, and its last convolution
accumulates into memory that is already mapped.

A residual qualifies when the graph shows that writing over it cannot be seen:
  * it is the result of a run-time helper that returns a new tensor (never one of its
    arguments), so no other name refers to its memory;
  * every other use of it is a call of such a helper that runs before the reusing op (so
    none of them returns it, keeps it, or reads it afterwards), and the reusing op takes it
    once.
"""
import inspect

from torch import fx

from .. import nn as cnn
from . import runtime as rt


def _position(fn, name):
    """The position of parameter ``name`` in fn's signature, None where it has none."""
    names = list(inspect.signature(fn).parameters)
    return names.index(name) if name in names else None


# The helpers that return a new tensor, never one of their arguments, with the position of
# their ``how`` argument where they take one: how=2 (``r += t`` in the original) can return
# the residual itself, so those calls do not count.
_FRESH = {fn: _position(fn, "how") for fn in (
    cnn.apply_conv_bn_relu, cnn.apply_bn_relu, cnn.apply_conv_relu, rt.conv_bn_relu_residual,
    rt.conv_frozen_bn_relu, rt.bn_relu_residual, rt.frozen_bn_relu, rt.conv_relu, rt.add_relu,
    rt.conv2d_on_cpu, rt.max_pool2d_module, rt.avg_pool2d_module, rt.adaptive_avg_pool2d_module)}

# The helpers that can reuse their residual, with the residual's position.
_REUSERS = {fn: _position(fn, "residual")
            for fn in (rt.conv_bn_relu_residual, rt.conv_frozen_bn_relu)}


def _fresh(node):
    """Whether node's value is a tensor no other value refers to (see the module doc)."""
    if node.op != "call_function" or node.target not in _FRESH:
        return False
    i = _FRESH[node.target]
    how = node.kwargs.get("how", node.args[i] if i is not None and i < len(node.args) else 0)
    return how != 2


def _reusable(node, order):
    i = _REUSERS[node.target]
    residual = node.args[i] if i < len(node.args) else None
    if not isinstance(residual, fx.Node) or not _fresh(residual):
        return False
    uses = list(node.args) + list(node.kwargs.values())
    if sum(a is residual for a in uses) != 1:
        return False
    return all(u is node or (_fresh(u) and order[u] < order[node]) for u in residual.users)


def _reuse_dead_residuals(graph):
    """Marks the graph's reusing helpers whose residual nothing reads afterwards. -> how many."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    marked = 0
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in _REUSERS
                and "reuse_residual" not in node.kwargs and _reusable(node, order)):
            node.kwargs = {**node.kwargs, "reuse_residual": True}
            marked += 1
    return marked

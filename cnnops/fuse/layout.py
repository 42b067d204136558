"""The channels_last pass: an eval-mode graph of layout-free ops rewritten to run its 4-D CPU
inputs in channels_last (the run-time side is runtime.to_channels_last and restore_layout).
"""
import operator

import torch
import torch.nn.functional as TF
from torch import nn

from .. import nn as cnn
from ._fx import BatchNormBase
from .patterns import _is_cnnops_module
from .runtime import restore_layout, to_channels_last


# What the channels_last pass allows in a graph: ops whose results do not depend on the
# input's layout (a .view() of a channels_last activation raises, and other code may read
# strides, so any other op keeps the graph in the layout it was given).
_LAYOUT_FREE_FUNCTIONS = {torch.flatten, torch.cat, torch.relu, TF.relu, operator.add,
                          operator.iadd, TF.adaptive_avg_pool2d, TF.max_pool2d, TF.avg_pool2d,
                          TF.dropout, getattr}
_LAYOUT_FREE_MODULES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, BatchNormBase)


def _layout_free(node, mods):
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op == "call_function":
        # (cnnops.fuse's run-time helpers, whose module is cnnops.fuse, see __init__.py)
        return node.target in _LAYOUT_FREE_FUNCTIONS or getattr(
            node.target, "__module__", None) in (__package__, cnn.__name__)
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

"""Rewriting one traced graph: its fusable node groups matched, decided on and replaced.

Three steps, each a class of its own:

- matching (_Matcher): which node is what (a conv call, a BN call and its kind, a ReLU or an
  add in any spelling, ...) and the candidate node groups around a BN, a ReLU, a pool;
- deciding (_Rules): the exactness rules, whether a candidate may be fused and as which call
  (a _Plan), or else why not (a skipped FusionRecord);
- replacing (_Replacer): the graph edit, a plan's node chain replaced by one call.

_Rewriter runs them pass by pass (cnnops's own ops, activations without a kernel, BN sites,
ReLU sites, pools), site by site: each site is decided on the graph as the sites before it
left it.
"""
import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as TF
from torch import nn

from .. import lean as _lean
from .. import nn as cnn
from ..nn import apply_bn_relu, apply_conv_bn_relu
from ._fx import BatchNormBase, has_hooks
from .patterns import (_ACTIVATION_FUNCTIONS, _ACTIVATION_METHODS, _ACTIVATION_MODULES,
                       _ADD_FUNCTIONS, _ALREADY, _CNNOPS_POOLS, _INPLACE_OPERATORS,
                       _LEAF_FUNCTIONS, _NO_KERNEL_POOL_FUNCTIONS, _NO_KERNEL_POOLS,
                       _OUT_OF_PLACE_ACTIVATIONS, _POOL_FUNCTIONS, _POOL_MODULES,
                       _PURE_FUNCTION_MODULES, _RELU_FUNCTIONS, _VIEW_METHODS, _bn_act_like,
                       _bn_act_suffix, _bn_kind, _conv_reason, _frozen_bn_like, _is_leaf_type,
                       _known_forward)
from .records import FusionRecord
from .runtime import (activation, add_relu, bn_relu_residual, conv_bn_relu_residual,
                      conv_frozen_bn_relu, conv_relu, frozen_bn_relu)


# ---------------------------------------------------------------------------
# Graph analysis helpers

def _only_node_args(node, n):
    return len(node.args) == n and all(isinstance(a, fx.Node) for a in node.args)


class _Module:
    """A reference to a submodule, turned into a get_attr node by _Replacer.replace."""

    def __init__(self, target):
        self.target = target


# ---------------------------------------------------------------------------
# Candidate sites (what matching finds) and plans (what deciding chooses)

@dataclasses.dataclass
class _BnSite:
    """A BN call and the nodes around it that could join it: the conv before, the add and
    the ReLU after."""
    node: fx.Node
    module: nn.Module
    kind: str                    # _bn_kind's: 'bn', 'sync', 'frozen', 'act' or None
    reason: str                  # why the BN cannot be fused at all (None if it can)
    conv_module: nn.Module       # the conv module of the BN's input call, or None
    conv: fx.Node = None         # that conv call, when it is not part of a fused call yet
    own_relu: bool = False       # a BatchNormAct2d that applies its ReLU itself
    add: fx.Node = None          # the BN output's only user, an add
    residual: fx.Node = None     # the add's other operand
    how: int = 0                 # the add: 0 out of place, 1 into the BN output, 2 into residual
    add_feeds_relu: bool = False  # a user of the add is a ReLU
    add_used: int = 0            # the add's number of users, when several and one is a ReLU
    relu: fx.Node = None         # the ReLU of the add (its only user) or of the BN (ditto)
    bn_used: int = 0             # the BN's number of users, when several and one a ReLU or add


@dataclasses.dataclass
class _ReluSite:
    """A ReLU of a conv call (conv-ReLU) or of an add (add-ReLU; conv-add-ReLU when an
    operand is a conv call)."""
    node: fx.Node
    src: fx.Node                 # the ReLU's input: the conv or the add
    conv_module: nn.Module = None  # the conv module when src is a conv call
    operands: tuple = ()         # the add's (a, b)
    mutates: bool = False        # the add writes into a
    convs: list = dataclasses.field(default_factory=list)  # (c, other, its conv module) for
    # each operand c, in the order (b, a), that is a conv call not part of a fused call yet


@dataclasses.dataclass
class _PoolSite:
    """A 2-D pooling call."""
    node: fx.Node
    pattern: str                 # what it is reported as
    helper: object = None        # the run-time helper that runs it on cnnops (None: no kernel)
    module: nn.Module = None     # the pool module of a module call
    input: fx.Node = None        # a function call's input
    kwargs: dict = None          # and its other arguments, by name


@dataclasses.dataclass
class _ActivationSite:
    """An activation without a cnnops kernel applied to a conv, BN or add output."""
    node: fx.Node
    act: str                     # its name
    what: str                    # what it follows: 'conv', 'conv-bn', 'bn', 'add' (+ BN's act)
    bn_kind: str = None          # the BN's _bn_kind when it follows a BN


@dataclasses.dataclass
class _Plan:
    """A fusion decided on: the node chain (in graph order) becomes fn(*args, **kwargs)."""
    chain: list
    fn: object
    args: tuple
    kwargs: dict
    name: str                    # the site's record: name, pattern and notes (its reason)
    pattern: str
    notes: list = dataclasses.field(default_factory=list)
    swap: fx.Node = None         # an in-place activation after it, to run out of place


# ---------------------------------------------------------------------------
# Matching

class _Matcher:
    """Tells what each node of one traced graph is, and finds the candidate sites."""

    def __init__(self, graph, root, prefix, consumed):
        self.prefix = prefix
        self.consumed = consumed  # nodes already part of a fused call
        self.mods = dict(root.named_modules())
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

    # -- naming ------------------------------------------------------------
    def _qual(self, target):
        return ".".join(p for p in (self.prefix, target) if p)

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
            if (type(m) is nn.ReLU and not has_hooks(m) and _only_node_args(node, 1)
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
                    nn, type(m).__name__).forward and not has_hooks(m)
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

    # -- candidate sites ---------------------------------------------------
    def already(self, node):
        """(name, pattern) of a call of cnnops's own fused ops or modules, or None."""
        def arg(node, index, name, default):
            if name in node.kwargs:
                return node.kwargs[name]
            return node.args[index] if index is not None and len(node.args) > index else default

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
        return None if pattern is None else (name, pattern)

    def activation_site(self, node):
        """An activation without a cnnops kernel after a conv, BN or add, or None."""
        act = self.activation(node)
        if act is None or not node.args or not isinstance(node.args[0], fx.Node):
            return None
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
            return None
        return _ActivationSite(node, act, what, bn[1] if bn else None)

    def bn_site(self, b):
        """The BN call b (self.bn(b) holds) and what could join it."""
        bn_m, kind, reason = self.bn(b)
        src = b.args[0]
        site = _BnSite(b, bn_m, kind, reason, self.conv(src))
        if reason:
            return site
        if site.conv_module is not None and src not in self.consumed:
            site.conv = src
        # a BatchNormAct2d applies its ReLU itself: nothing after it joins the pattern
        site.own_relu = kind == "act" and type(bn_m.act) is nn.ReLU
        users = [] if site.own_relu else list(b.users)
        if len(users) == 1:
            u = users[0]
            add = self.add(u)
            rl = self.relu(u)
            if add is not None:
                a, c, mut = add
                site.add = u
                site.residual = c if a is b else a
                site.how = (1 if a is b else 2) if mut else 0
                site.add_feeds_relu = any(self.relu(n) for n in u.users)
                nxt = list(u.users)
                if len(nxt) == 1 and self.relu(nxt[0]) and self.relu(nxt[0])[0] is u:
                    site.relu = nxt[0]
                elif len(nxt) > 1 and site.add_feeds_relu:
                    site.add_used = len(nxt)
            elif rl is not None and rl[0] is b:
                site.relu = u
        elif len(users) > 1 and any(self.relu(u) or self.add(u) for u in users):
            site.bn_used = len(users)
        return site

    def relu_site(self, r):
        """The ReLU r (self.relu(r) holds) with the conv or add it applies to, or None."""
        src, _ = self.relu(r)
        if src in self.consumed or src.op not in ("call_module", "call_function", "call_method"):
            return None
        conv_m = self.conv(src)
        if conv_m is not None:
            return _ReluSite(r, src, conv_m)
        add = self.add(src)
        if add is None:
            return None
        a, b, mut = add
        convs = []
        for c, other in ((b, a), (a, b)):
            cm = self.conv(c) if c not in self.consumed else None
            if cm is not None:
                convs.append((c, other, cm))
        return _ReluSite(r, src, None, (a, b), mut, convs)

    def pool_site(self, node):
        """A max / avg / adaptive-avg pooling call, or one cnnops has no kernel for, or None."""
        if node.op == "call_module":
            m = self.module(node)
            spec = _POOL_MODULES.get(type(m))
            if spec is None:
                if isinstance(m, _NO_KERNEL_POOLS):
                    return _PoolSite(node, type(m).__name__)
                return None
            forward, helper, pattern = spec
            return _PoolSite(node, pattern, helper, m)
        elif node.op == "call_function":
            if node.target in _NO_KERNEL_POOL_FUNCTIONS:
                return _PoolSite(node, _NO_KERNEL_POOL_FUNCTIONS[node.target])
            spec = _POOL_FUNCTIONS.get(node.target)
            if spec is None:
                return None
            helper, names = spec
            if len(node.args) > len(names) or set(node.kwargs) - set(names):
                return None
            kwargs = dict(zip(names, node.args))
            kwargs.update(node.kwargs)
            if node.target is TF.max_pool2d_with_indices:
                kwargs["return_indices"] = True
            elif node.target is torch.max_pool2d and kwargs.get("stride") in ((), []):
                kwargs["stride"] = None
            inp = kwargs.pop("input", None)
            if not isinstance(inp, fx.Node):
                return None
            return _PoolSite(node, helper.__name__, helper, None, inp, kwargs)
        return None


# ---------------------------------------------------------------------------
# Deciding

class _Rules:
    """The exactness rules: whether a candidate site may be fused, as which call (a _Plan),
    or why not (recorded as a skipped site)."""

    def __init__(self, matcher, memory, records):
        self.match = matcher
        self.memory = memory  # fuse's memory mode, passed to the conv-BN sites
        self.records = records
        self.site_names = matcher.site_names
        self.module = matcher.module

    def skip(self, name, pattern, reason):
        self.records.append(FusionRecord(name, pattern, "skipped", reason))

    # -- what in-place ops may do ----------------------------------------
    def mutates(self, node):
        """Whether node may modify a tensor in place (conservatively)."""
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.endswith("__")
        if node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", "")
            if target is operator.setitem or name in _INPLACE_OPERATORS:
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
            if isinstance(m, BatchNormBase) and not (_known_forward(m) or _bn_act_like(m)):
                return True  # a BN subclass's forward of its own, not traced
            return not _is_leaf_type(m)
        return False

    def fresh(self, node):
        """Whether node's value is a new tensor no other value aliases (safe to write into)."""
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, BatchNormBase):
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

    def writable(self, node):
        """Whether an in-place add may write into node's value: fresh and read by it alone."""
        return self.fresh(node) and len(node.users) == 1

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
                        and any(self.match.mods.get(a.target) is b for b in bns) for a in n.args):
                    return False
            n = n.next
        return True

    # -- the sites -------------------------------------------------------
    def activation(self, s):
        """An activation without a cnnops kernel: always skipped, with what it leaves fused."""
        reason = "%s has no cnnops kernel" % s.act
        if s.act.lower() in ("relu6", "hardtanh"):
            reason += " (ReLU6 is not ReLU: it clips at 6)"
        if s.what.startswith("conv-bn"):
            reason += "; conv-BN fused without it"
        elif s.bn_kind == "act":
            reason += "; the BN fused without it"
        elif s.what == "bn":
            reason += "; the BN stays unfused"
        self.skip(self.site_names[s.node], "%s-%s" % (s.what, s.act.lower()), reason)

    def conv_before_bn(self, s):
        """Why the conv call before BN site s cannot join it (None if it can)."""
        conv_m, src, b = s.conv_module, s.conv, s.node
        r = _conv_reason(conv_m)
        nfeat = s.module.weight.shape[0] if s.kind == "frozen" else s.module.num_features
        if r is None and len(src.users) != 1:
            r = "conv output used %d times" % len(src.users)
        if r is None and conv_m.out_channels != nfeat:
            r = "conv has %d output channels, BN %d" % (conv_m.out_channels, nfeat)
        if r is None and not self.clear_between(src, b, {src, b}):
            r = "an in-place op runs between conv and BN"
        return r

    def bn(self, s):
        """The plan for BN site s, or None (skipped)."""
        b, bn_m, kind = s.node, s.module, s.kind
        name = self.site_names[b]
        if s.reason:
            self.skip(name, ("conv-bn" if s.conv_module is not None else "bn")
                      + _bn_act_suffix(bn_m), s.reason)
            return None
        notes = []
        conv = None
        if s.conv is not None:
            r = self.conv_before_bn(s)
            if r is None:
                conv = s.conv
            else:
                self.skip(self.site_names[s.conv], "conv-bn", r)
                notes.append(r)
        chain = ([conv] if conv is not None else []) + [b]
        residual, how, relu = None, s.how, s.own_relu
        if s.add is not None:
            if s.how == 2 and not self.writable(s.residual):
                if not s.add_feeds_relu:  # else the ReLU pass reports it
                    self.skip(self.site_names[s.add], "bn-add",
                              "in-place add writes into %s, which is used elsewhere"
                              % s.residual.name)
            else:
                chain.append(s.add)
                residual = s.residual
                if s.relu is not None:
                    chain.append(s.relu)
                    relu = True
                elif s.add_used:
                    notes.append("add output used %d times" % s.add_used)
        elif s.relu is not None:
            chain.append(s.relu)
            relu = True
        elif s.bn_used:
            notes.append("BN output used %d times" % s.bn_used)
        # alone, a BatchNormAct2d still becomes one op instead of its BN, drop and act calls,
        # and a SyncBatchNorm runs cnnops' synchronised BN (torch's runs on GPUs only)
        if len(chain) == 1 and kind not in ("act", "sync"):
            if not notes:
                notes.append("input is not a fusable conv output and no ReLU or add follows")
            self.skip(name, "bn", "; ".join(notes))
            return None
        pattern = ("conv-bn" if conv is not None else "bn") + ("-add" if residual is not None
                                                                else "") + ("-relu" if relu else "")
        first, last = chain[0], chain[-1]
        if first is not last and not self.clear_between(first, last, set(chain), (bn_m,)):
            self.skip(name, pattern,
                      "an in-place op or another call of this BN runs inside the pattern")
            return None
        swap = None
        if conv is not None and not relu and self.mutated_later(last):
            swap = self.match.inplace_activation(last)
            if swap is None:
                self.skip(name, pattern, "its output is modified in place later; "
                          "the fused op keeps it for backward")
                return None
            notes.append("the in-place %s after it now runs out of place"
                         % (self.match.activation(swap) or swap.target))
        fn, args, kwargs = self.bn_call(s, conv, residual, relu, how, notes)
        return _Plan(chain, fn, args, kwargs, name, pattern, notes, swap)

    def bn_call(self, s, conv, residual, relu, how, notes):
        """(fn, args, kwargs) of the fused op for a BN site; adds its notes to ``notes``."""
        b, kind = s.node, s.kind
        x = conv.args[0] if conv is not None else b.args[0]
        bn_ref = _Module(b.target)
        if kind == "sync":
            notes.append("SyncBatchNorm: statistics synchronised over its process group in "
                         "training")
        if kind == "frozen":
            notes.append("frozen BN fused as inference-mode BN")
            if conv is not None:
                return (conv_frozen_bn_relu, (_Module(conv.target), bn_ref, x, residual, relu,
                                              how), None)
            return frozen_bn_relu, (bn_ref, x, residual, relu, how), None
        if conv is not None:
            # (the default mode's calls do not spell it out; a synchronised BN has no lean mode)
            lean = {}
            if self.memory != "fast" and kind == "sync":
                notes.append("memory=%r is not implemented with a SyncBatchNorm: the default"
                             % self.memory)
            elif self.memory == "lean" and not _lean.recomputes(s.conv_module):
                notes.append("lean mode keeps its conv output: recomputing it costs %d "
                             "multiply-adds per element (> %d)"
                             % (_lean.recompute_cost(s.conv_module), _lean.RECOMPUTE_MAX_MACS))
            elif self.memory != "fast":
                lean = {"memory": self.memory}
                notes.append("memory=%r" % self.memory)
            # (a SyncBatchNorm takes inputs of any rank: the helpers check for a 4-D one)
            if residual is None and kind != "sync":
                return (apply_conv_bn_relu, (_Module(conv.target), bn_ref, x),
                        dict(relu=relu, **lean))
            return (conv_bn_relu_residual,
                    (_Module(conv.target), bn_ref, x, residual, relu, how), lean)
        if residual is None and kind != "sync":
            return apply_bn_relu, (bn_ref, x), {"relu": relu}
        return bn_relu_residual, (bn_ref, x, residual, relu, how), None

    def relu(self, s):
        """The plan for ReLU site s (conv-ReLU, conv-add-ReLU, add-ReLU), or None."""
        r, src = s.node, s.src
        if s.conv_module is not None:
            reason = _conv_reason(s.conv_module)
            if reason is None and len(src.users) != 1:
                reason = "conv output used %d times" % len(src.users)
            if reason is None and not self.clear_between(src, r, {src, r}):
                reason = "an in-place op runs between conv and ReLU"
            if reason:
                self.skip(self.site_names[src], "conv-relu", reason)
                return None
            return _Plan([src, r], conv_relu, (_Module(src.target), src.args[0]), None,
                         self.site_names[src], "conv-relu")
        (a, b), mut = s.operands, s.mutates
        name = self.site_names[src]
        if len(src.users) != 1:
            self.skip(name, "add-relu", "add output used %d times" % len(src.users))
            return None
        if mut and not self.writable(a):
            self.skip(name, "add-relu",
                      "in-place add writes into %s, which is used elsewhere" % a.name)
            return None
        if not self.clear_between(src, r, {src, r}):
            self.skip(name, "add-relu", "an in-place op runs between add and ReLU")
            return None
        for c, other, cm in s.convs:
            if (_conv_reason(cm) is None and len(c.users) == 1
                    and self.clear_between(c, r, {c, src, r})
                    and not (mut and c is b and not self.writable(other))):
                how = (1 if c is a else 2) if mut else 0
                return _Plan([c, src, r], conv_relu, (_Module(c.target), c.args[0], other, how),
                             None, self.site_names[c], "conv-add-relu")
        return _Plan([src, r], add_relu, (a, b, 1 if mut else 0), None, name, "add-relu")

    def pool(self, s):
        """The plan for pooling site s, or None."""
        node = s.node
        name = self.site_names[node]
        if s.helper is None:
            self.skip(name, s.pattern, "no cnnops kernel for %s" % s.pattern)
            return None
        if s.module is not None:
            if has_hooks(s.module) or not _only_node_args(node, 1) or node.kwargs:
                self.skip(name, s.pattern,
                          "pool has hooks" if has_hooks(s.module) else "unusual call")
                return None
            return _Plan([node], s.helper, (_Module(node.target), node.args[0]), None, name,
                         s.pattern)
        return _Plan([node], s.helper, (s.input,), s.kwargs, name, s.pattern)


# ---------------------------------------------------------------------------
# Replacing

class _Replacer:
    """Edits the graph: a decided node chain replaced by one call."""

    def __init__(self, graph, consumed):
        self.graph = graph
        self.consumed = consumed
        self.changed = False

    def apply(self, plan):
        self.replace(plan.chain, plan.fn, plan.args, plan.kwargs)
        if plan.swap is not None:
            self.out_of_place(plan.swap)

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


# ---------------------------------------------------------------------------
# The passes

class _Rewriter:
    """Matches and replaces the fusable node groups of one traced graph."""

    def __init__(self, graph, root, prefix, memory):
        self.graph = graph
        self.records = []
        self.consumed = set()
        self.match = _Matcher(graph, root, prefix, self.consumed)
        self.rules = _Rules(self.match, memory, self.records)
        self.replacer = _Replacer(graph, self.consumed)

    def run(self):
        match, rules = self.match, self.rules
        nodes = list(self.graph.nodes)
        # calls of cnnops's own fused ops and modules: reported as fused, left alone
        for node in nodes:
            found = match.already(node)
            if found is not None:
                self.records.append(FusionRecord(*found, "fused", "already a cnnops op"))
                self.consumed.add(node)
        # activations without a cnnops kernel after a conv, BN or add: reported, left alone
        for node in nodes:
            site = match.activation_site(node)
            if site is not None:
                rules.activation(site)
        for node in nodes:
            if node not in self.consumed and node.graph is self.graph and match.bn(node):
                self.fuse(rules.bn(match.bn_site(node)))
        for node in list(self.graph.nodes):
            if node not in self.consumed and match.relu(node):
                site = match.relu_site(node)
                if site is not None:
                    self.fuse(rules.relu(site))
        for node in list(self.graph.nodes):
            if node not in self.consumed:
                site = match.pool_site(node)
                if site is not None:
                    self.fuse(rules.pool(site))
        self.graph.lint()
        return self.records, self.replacer.changed

    def fuse(self, plan):
        """Carries out a plan (None: a skipped site, nothing to do) and records the site."""
        if plan is None:
            return
        self.replacer.apply(plan)
        self.records.append(FusionRecord(plan.name, plan.pattern, "fused",
                                         "; ".join(plan.notes)))

"""Tracing a module's forward with torch.fx, and the guards that keep tracing honest.

A forward is traced in train and eval mode with leaf modules (convolutions, BatchNorms,
pools, activations, cnnops's modules) kept as calls; while it runs, in-place operators are
recorded as such, and grad/autocast mode changes and in-place writes into real tensors are
refused (the module doing them keeps its forward). A submodule that breaks the trace is kept
as a call and the trace retried.
"""
import operator

import torch.fx as fx

from .. import functional as CF
from .. import nn as cnn
from ._fx import (TorchDispatchMode, autowrap, has_hooks, is_trace_constant, module_registries,
                  op_is_mutable)
from .patterns import _INPLACE_OPERATORS, _LEAF_FUNCTIONS, _is_leaf_type


class _InplaceProxyOps:
    """Records ``a += b`` as operator.iadd (fx's default turns it into ``a = a + b``, which
    would stop mutating tensors that other code sees)."""

    NAMES = _INPLACE_OPERATORS

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
        autowrap(self, _LEAF_FUNCTIONS, (CF, cnn))
        self.opaque = opaque
        self.traced_through = {}

    def is_leaf_module(self, m, module_qualified_name):
        return (id(m) in self.opaque or _is_leaf_type(m) or has_hooks(m)
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
        if op_is_mutable(func):
            raise _InplaceWrite("forward writes into a tensor in place (%s), which tracing "
                                "cannot keep" % func)
        return func(*args, **(kwargs or {}))


def _snapshot(module):
    return [(m, dict(m.__dict__), *(dict(r) for r in module_registries(m)))
            for m in module.modules()]


def _restore(snapshot):
    """Puts back every module's attributes; returns the modules whose attributes tracing
    changed (a forward that stores things on a module cannot be replaced by traced code)."""
    changed = []
    for m, d, params, buffers, mods in snapshot:
        extra = set(m.__dict__) - set(d)
        differs = any(k not in m.__dict__ or m.__dict__[k] is not v for k, v in d.items())
        for saved, now in zip((params, buffers, mods), module_registries(m)):
            if saved.keys() != now.keys() or any(now[k] is not v for k, v in saved.items()):
                differs = True
                now.clear()
                now.update(saved)
        if differs or any(not is_trace_constant(k) for k in extra):
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
                    if node.op == "get_attr" and is_trace_constant(node.target):
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


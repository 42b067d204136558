"""The installed forward: generating its source from the traced graphs, compiling it, and
pickling and copying it with its module.
"""
import copy
import functools
import keyword

from ._fx import forward_from_source, import_block


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
    lines = [import_block(globals_)]
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
    fn = forward_from_source(source)
    fused = _FusedForward(fn, owner)
    fused.source = source
    return fused


"""cnnops.explain: which backend and which CPU convolution core each call of a model ran.

    rows = cnnops.explain(model, x)             # one inference forward
    rows = cnnops.explain(model, x, train=True)  # one training step's forward and backward
    print(cnnops.explain_table(rows))
"""
import torch

from . import _ext, backends

__all__ = ["explain", "explain_table"]


def explain(model, *inputs, train=False):
    """Runs ``model(*inputs)`` once and lists the cnnops CPU convolutions it called.

    train=False: in eval mode under torch.no_grad; train=True: in train mode, with
    a backward pass from the sum of the output (parameters' .grad are restored, and
    the model's mode; BatchNorm running statistics do move, as in any training step).
    -> list of dicts, one per convolution call in call order: ``call`` (op, dtype, input
    shape, kernel, stride, padding, ... -> out channels, flags, threads), ``core``
    (``im2col``, ``onednn`` or ``winograd``) and ``reason`` (forced, the only core for the
    call, or each measured core's time). Calls on other backends (CUDA, Triton, reference) do not appear:
    their convolution has no choice to explain.
    """
    if not _ext.LOADED:
        raise RuntimeError("cnnops.explain needs the C++ extension: %s" % _ext.ERROR)
    from . import _C
    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None  # the backward below must not accumulate into the caller's gradients
    _C._cpu_conv_trace(True)
    try:
        if train:
            model.train()
            out = model(*inputs)
            out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
            out.float().sum().backward()
        else:
            model.eval()
            with torch.no_grad():
                model(*inputs)
    finally:
        calls = _C._cpu_conv_trace(False)
        model.train(was_training)
        for p, g in grads.items():
            p.grad = g
    return [dict(call=c, core=core, reason=why) for c, core, why in calls]


def explain_table(rows):
    """The rows of explain() as aligned text, one line per call."""
    from . import _C
    lines = ["%-7s %s  [%s]" % (r["core"], r["call"], r["reason"]) for r in rows]
    header = "CPU convolution core setting: %s; %d calls; CPU kernels: %s" % (
        backends.get_cpu_conv(), len(rows), _C._cpu_vector_level())
    return "\n".join([header] + lines)

"""Backend registry and selection.

Every op has up to four implementations behind one API:

=========== ============================================================
``cpu``     C++ kernels (csrc/cpu), CPU tensors, float32/float64/bfloat16 (bfloat16: the
            convolutions on the oneDNN core, the other ops on float32 copies)
``cuda``    CUDA kernels (csrc/cuda), CUDA tensors
``triton``  Triton kernels (cnnops.triton_kernels), CUDA tensors (CPU tensors under
            TRITON_INTERPRET=1, Triton's interpreter), float16/bfloat16/float32/float64
``reference`` pure PyTorch (cnnops.reference), any device and dtype
=========== ============================================================

``auto`` (the default) picks per call: ``cuda`` for CUDA tensors when the CUDA
kernels were built, else ``triton`` when it can run; ``cpu`` for float32/float64/bfloat16
CPU tensors when the C++ extension loaded; otherwise ``reference``. The cpu backend's
convolution core (im2col or oneDNN) is chosen per call: see ``set_cpu_conv``.

A backend chosen explicitly (``set_backend``, ``use_backend`` or the environment
variable ``CNNOPS_BACKEND``) either runs the call or raises an error that says
why; it never silently runs another backend.
"""
import contextlib
import os

import torch

from . import _ext
from . import triton_kernels

NAMES = ("auto", "cpu", "cuda", "triton", "reference")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the cpu backend's
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_name(name):
    if name not in NAMES:
        raise ValueError("unknown cnnops backend %r; expected one of %s" % (name, ", ".join(NAMES)))
    return name


def _set(name):
    """Makes ``name`` the setting; -> the previous one."""
    global _current, _cpu_takes_cpu_tensors
    previous, _current = _current, _check_name(name)
    # Read by the inference fast paths (cnnops.nn._inference_op) in place of a call to
    # implementation(): whether the setting sends CPU tensors of a cpu dtype to the cpu backend.
    _cpu_takes_cpu_tensors = _current in ("auto", "cpu") and _ext.LOADED
    return previous


_current = None
_set(os.environ.get("CNNOPS_BACKEND", "auto") or "auto")


def get_backend():
    """The backend setting: ``auto`` or the name of a backend."""
    return _current


def set_backend(name):
    """Sets the backend for every following call (``auto``, ``cpu``, ``cuda``, ``triton``, ``reference``)."""
    _set(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the calls inside the block on backend ``name``."""
    previous = _set(name)
    try:
        yield
    finally:
        _set(previous)


# ---------------------------------------------------------------------------
# The CPU backend's convolution core (csrc/cpu/conv_core.h)

CPU_CONV_MODES = ("auto", "im2col", "onednn", "winograd")


def _check_cpu_conv(mode):
    if mode not in CPU_CONV_MODES:
        raise ValueError("unknown CPU convolution core %r; expected one of %s"
                         % (mode, ", ".join(CPU_CONV_MODES)))
    return mode


def get_cpu_conv():
    """The CPU convolution core setting: ``auto``, ``im2col``, ``onednn`` or ``winograd``.

    ``im2col`` is cnnops' im2col + BLAS GEMM with the fusions in its GEMM epilogue
    (float32/float64); ``onednn`` is ATen's oneDNN convolution with cnnops' fusions
    around it (float32/bfloat16); ``winograd`` is Winograd convolution (F(2x2, 3x3) and its
    stride-2 counterpart) for the 3x3 ungrouped, undilated convolutions at stride 1 or 2: their
    forward, and at stride 1 in the backward their input gradient (float32/float64; forced, it
    leaves every other call to im2col, or to oneDNN for bfloat16). ``auto`` (the default) measures each core that can run a call the
    first time its configuration (op, shapes, dtype, flags, threads) is seen and
    keeps the fastest for the rest of the process; a call only one core runs takes
    that one. ``cpu_conv_choices()`` and ``cnnops.explain`` show what was chosen.
    """
    return _cpu_conv


def set_cpu_conv(mode):
    """Sets the CPU convolution core (``auto``, ``im2col``, ``onednn``, ``winograd``) for every
    following call.

    A forced core raises for a dtype it does not run (im2col: bfloat16; onednn:
    float64). The environment variable ``CNNOPS_CPU_CONV`` sets it at import.
    """
    global _cpu_conv
    _cpu_conv = _check_cpu_conv(mode)
    if _ext.LOADED:
        from . import _C
        _C._set_cpu_conv_mode(mode)


@contextlib.contextmanager
def use_cpu_conv(mode):
    """Context manager: run the CPU convolutions inside the block on core ``mode``."""
    previous = _cpu_conv
    set_cpu_conv(mode)
    try:
        yield
    finally:
        set_cpu_conv(previous)


def cpu_conv_choices():
    """Every choice ``auto`` has measured in this process, as a list of dicts with keys
    ``call`` (op, dtype, input shape, kernel, stride, padding, ... -> out channels, flags,
    threads), ``core`` and ``reason`` (each measured core's time)."""
    if not _ext.LOADED:
        return []
    from . import _C
    return [dict(call=c, core=core, reason=why) for c, core, why in _C._cpu_conv_choices()]


_cpu_conv = "auto"
set_cpu_conv(os.environ.get("CNNOPS_CPU_CONV", "auto") or "auto")


def device_type(tensor):
    """tensor.device.type ("cpu", "cuda", ...). torch builds that string anew on every read,
    through a C++ string stream (about 5 us a read on a 2-core machine, more than a small op's
    own checks): the hot paths read the tensor's is_cpu and is_cuda flags instead."""
    if tensor.is_cpu:
        return "cpu"
    if tensor.is_cuda:
        return "cuda"
    return tensor.device.type


def _unavailable(name, tensor):
    """Why backend ``name`` cannot run a call on ``tensor`` (None when it can)."""
    device, dtype = device_type(tensor), tensor.dtype
    if name == "reference":
        return None
    if name == "cpu":
        if not _ext.LOADED:
            return _ext.ERROR
        if device != "cpu":
            return "it runs on CPU tensors, got a tensor on %s" % tensor.device
        if dtype not in CPU_DTYPES:
            return "it supports float32, float64 and bfloat16, got %s" % dtype
        return None
    if name == "cuda":
        if not _ext.LOADED:
            return _ext.ERROR
        if not _ext.WITH_CUDA:
            return "cnnops._C was built without CUDA kernels"
        if device != "cuda":
            return "it runs on CUDA tensors, got a tensor on %s" % tensor.device
        return None
    if name == "triton":
        why = triton_kernels.unavailable()
        if why is not None:
            return why
        if device != "cuda" and not (device == "cpu" and triton_kernels.INTERPRET):
            return ("it runs on CUDA tensors (CPU tensors only in Triton's interpreter, "
                    "TRITON_INTERPRET=1), got a tensor on %s" % tensor.device)
        if dtype not in _TRITON_DTYPES:
            return "it supports float16, bfloat16, float32 and float64, got %s" % dtype
        return None
    raise AssertionError(name)


def available_backends():
    """The backends that can run on this machine (``auto`` chooses among these)."""
    probes = [torch.empty(0)]
    if torch.cuda.is_available():
        probes.append(torch.empty(0, device="cuda"))
    return [n for n in NAMES[1:] if any(_unavailable(n, p) is None for p in probes)]


def resolve(tensor):
    """The name of the backend that runs a call whose main input is ``tensor``."""
    if _current != "auto":
        why = _unavailable(_current, tensor)
        if why is not None:
            raise RuntimeError("cnnops backend %r cannot run this call: %s" % (_current, why))
        return _current
    for name in ("cuda", "triton") if tensor.is_cuda else ("cpu",):
        if _unavailable(name, tensor) is None:
            return name
    return "reference"


def implementation(tensor):
    """The module whose functions implement the ops for ``tensor``.

    Each provides the same normalised-argument functions (see cnnops.reference).
    """
    if _current != "auto":
        return _implementation(resolve(tensor), tensor)
    # auto: what a (device, dtype) resolves to is fixed for the process (which extensions
    # loaded, whether Triton runs), so it is looked up once; this runs on every op call.
    key = (device_type(tensor), tensor.dtype)
    impl = _auto_implementations.get(key)
    if impl is None:
        impl = _auto_implementations[key] = _implementation(resolve(tensor), tensor)
    return impl


_auto_implementations = {}


def _implementation(name, tensor):
    if name == "reference":
        from . import reference
        return reference
    if name == "triton":
        from .triton_kernels.ops import TRITON
        return TRITON
    from .op_table import COMPILED, COMPILED_BFLOAT16_CPU
    if name == "cpu" and tensor.dtype == torch.bfloat16:
        return COMPILED_BFLOAT16_CPU
    return COMPILED

"""Triton kernels of the ``triton`` backend.

Each module holds the kernels of one op family and plain launcher functions that
take and return tensors (shapes in their docstrings):

============== =============================================================
conv           implicit-GEMM convolution with fused epilogues, its input and
               weight gradients
norm           per-channel batch statistics, normalise/affine/residual/ReLU,
               the BatchNorm backward reductions
pool           max / average / adaptive-average pooling, forward and backward
elementwise    add + ReLU and the ReLU-mask backward
ops            the torch.library.triton_op registrations (``cnnops_triton::*``)
============== =============================================================

Launchers start kernels only through ``torch.library.wrap_triton`` and use only
torch ops besides, so torch.compile can trace through the ops into the kernels.

Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set
before triton is first imported (how the tests run without a GPU).
"""
import importlib.util
import os

#: Whether kernels run in Triton's CPU interpreter (numpy, one program at a time).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable():
    """Why the Triton kernels cannot be used at all (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None

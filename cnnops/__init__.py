"""cnnops: fused CNN kernels for PyTorch.

    import cnnops
    block = cnnops.FusedConvBNReLU(64, 64, 3, padding=1)   # conv -> BN -> ReLU, one op
    y = cnnops.functional.conv_bn_relu(x, w, None, g, b, rm, rv, padding=1, training=True)

Backends: cnnops.available_backends(), get_backend(), set_backend(name),
use_backend(name); see cnnops.backends.
"""
from . import _ext  # noqa: F401  (loads the C++ extension first)
from . import backends, functional, nn, ops, reference  # noqa: F401
from .backends import available_backends, get_backend, set_backend, use_backend
from .nn import FusedConvBNReLU
from .fuse import fuse, fusion_report
from .warmup import warmup

__version__ = "0.1.0"

__all__ = ["functional", "nn", "reference", "FusedConvBNReLU", "available_backends",
           "get_backend", "set_backend", "use_backend", "fuse", "fusion_report", "warmup"]

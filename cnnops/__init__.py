"""cnnops: fused CNN kernels for PyTorch.

    import cnnops
    block = cnnops.FusedConvBNReLU(64, 64, 3, padding=1)   # conv -> BN -> ReLU, one op
    y = cnnops.functional.conv_bn_relu(x, w, None, g, b, rm, rv, padding=1, training=True)

Backends: cnnops.available_backends(), get_backend(), set_backend(name),
use_backend(name); see cnnops.backends. The CPU backend's convolution core:
get_cpu_conv(), set_cpu_conv(mode), use_cpu_conv(mode), cpu_conv_choices(), and
explain(model, *inputs), which lists the core each convolution call ran.
"""
from . import _ext  # noqa: F401  (loads the C++ extension first)
from . import backends, distributed, functional, nn, op_table, reference  # noqa: F401
from .backends import (available_backends, cpu_conv_choices, get_backend, get_cpu_conv,
                       set_backend, set_cpu_conv, use_backend, use_cpu_conv)
from .explain import explain, explain_table
from .nn import FusedConvBNReLU
from .fuse import fuse, fusion_report
from .warmup import warmup

__version__ = "0.1.0"

__all__ = ["functional", "nn", "distributed", "reference", "FusedConvBNReLU", "available_backends",
           "get_backend", "set_backend", "use_backend", "get_cpu_conv", "set_cpu_conv",
           "use_cpu_conv", "cpu_conv_choices", "explain", "explain_table", "fuse", "fusion_report",
           "warmup"]

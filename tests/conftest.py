"""Shared fixtures: the backends under test, input layouts, tolerances.

The suite runs on CPU-only machines. Every op is tested on each backend that can
run here (`reference` always, `cpu` when cnnops._C is built); CUDA cases are
marked `cuda` and skip without a device. A missing C++ extension is an error,
not a skip: set CNNOPS_TEST_ALLOW_NO_EXT=1 to test the reference backend alone.

The cpu backend runs its convolutions on one of two cores (cnnops.set_cpu_conv): in the
`backend` fixture `cpu` is the cpu backend with the im2col core forced, and the tests that
run a convolution (marked with `@conv_cores`) also run `cpu-onednn`, the cpu backend with
the oneDNN core forced. `auto`'s choice between them is tested in test_cpu_conv_core.py.
"""
import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cnnops  # noqa: E402
from cnnops import _ext, backends  # noqa: E402

if not _ext.LOADED and os.environ.get("CNNOPS_TEST_ALLOW_NO_EXT") != "1":
    raise pytest.UsageError("cnnops._C is not loaded (%s). Build it with "
                            "`pip install --no-build-isolation -e .`" % _ext.ERROR)

CPU_BACKENDS = ["reference"] + (["cpu"] if _ext.LOADED else [])
# The Triton kernels on CPU tensors (interpreted): every op, at the tests' small shapes.
if backends._unavailable("triton", torch.empty(0)) is None:
    CPU_BACKENDS.append("triton")

# The CPU convolution core each cpu entry of the `backend` fixture forces. `cpu` keeps its name
# (im2col, float32/float64: the core the pooling / BN / add_relu tests never notice); the
# `cpu-onednn` entry is added only to the tests of the convolution ops, through `conv_cores`.
CPU_CORES = {"cpu": "im2col", "cpu-onednn": "onednn"}
CONV_BACKENDS = [entry for b in CPU_BACKENDS
                 for entry in ((b, "cpu-onednn") if b == "cpu" else (b,))]
# Decorator for a test that takes the `backend` fixture and runs convolutions: it runs on
# CONV_BACKENDS (each cpu core) instead of CPU_BACKENDS. A case of such a test that runs no
# convolution (a pooling case in a mixed list) can carry `no_conv` to run on `cpu` only.
conv_cores = pytest.mark.parametrize("backend", CONV_BACKENDS, indirect=True)
no_conv = pytest.mark.no_conv
LAYOUTS = ["contiguous", "channels_last", "strided"]

# Interpreted Triton is ~100x slower than the C++ kernels, so on the triton backend each big
# parameter grid (a test function with GRID_SIZE or more triton cases) runs a fixed subset:
# one case in TRITON_GRID_SAMPLE, picked by a hash of its id. Every other test runs in full;
# CNNOPS_TEST_TRITON_ALL=1 runs the whole grids too.
GRID_SIZE = 40
TRITON_GRID_SAMPLE = 3


def pytest_configure(config):
    config.addinivalue_line("markers", "no_conv: a case of a @conv_cores test that runs no "
                            "convolution: it does not run on cpu-onednn")


def _drop(config, items, dropped):
    if dropped:
        config.hook.pytest_deselected(items=[i for i in items if id(i) in dropped])
        items[:] = [i for i in items if id(i) not in dropped]


def pytest_collection_modifyitems(config, items):
    # The oneDNN core has no float64 convolution (a forced core raises TypeError for a dtype it
    # lacks; test_cpu_conv_core.py checks that), so the cpu-onednn cases of a float64 grid
    # cannot run: they are deselected, not skipped. Nor do cases without a convolution run
    # there: one cpu entry covers them.
    _drop(config, items, {
        id(item) for item in items if getattr(item, "callspec", None)
        and item.callspec.params.get("backend") == "cpu-onednn"
        and (item.callspec.params.get("dtype") == torch.float64
             or item.get_closest_marker("no_conv") is not None)})
    if os.environ.get("CNNOPS_TEST_TRITON_ALL") == "1":
        return
    triton_cases = {}
    for item in items:
        if getattr(item, "callspec", None) and item.callspec.params.get("backend") == "triton":
            triton_cases.setdefault(item.function, []).append(item)
    _drop(config, items, {id(item) for cases in triton_cases.values() if len(cases) >= GRID_SIZE
                          for item in cases
                          if zlib.crc32(item.nodeid.encode()) % TRITON_GRID_SAMPLE})
DTYPES = [torch.float32, torch.float64]

# Shapes that exercise the CPU kernel's tiling (csrc/cpu/conv_kernels.h): images cut into
# several position tiles (output larger than a tile), several small images to a tile and chunk,
# the stride-phase im2col, im2col's whole-row runs with tiles ending mid-row, the direct 1x1
# path over a cut image, and both ways of summing the weight gradient.
# (N, in_channels, out_channels, kernel, stride, padding, groups, H, W)
TILE_CONFIGS = [
    (2, 32, 8, 3, 1, 1, 1, 27, 27),    # 729 positions a 3x3 image: 2 tiles, split mid-row
    (3, 32, 8, 3, 2, 1, 2, 51, 52),    # stride 2 via phases, 2 tiles an image, odd height, groups
    (2, 3, 4, 7, 2, 3, 1, 70, 70),     # stem-like: 7x7 stride 2 phases, 35x35 outputs, 3 tiles
    (2, 8, 4, 1, 1, 0, 1, 48, 47),     # 1x1 on 2256 positions: the direct path, 2 tiles
    (7, 40, 6, 3, 1, 1, 1, 5, 5),      # 25 positions: several images a tile, 7 images
    (5, 16, 6, 1, 2, 0, 1, 9, 9),      # 1x1 stride 2: im2col of a small image, several a tile
    (3, 8, 6, 5, 1, 0, 1, 12, 12),     # valid 5x5: im2col / col2im row by row (rows 8 apart)
    (2, 64, 72, 3, 1, 1, 1, 6, 6),     # 72 output channels, K = 576: the weight gradient
    (3, 64, 16, 3, 1, 1, 1, 5, 5),     # summed untransposed (the others: transposed)
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Runs the test with cnnops set to each CPU-capable backend in turn (the cpu backend
    with its convolution core forced, see CPU_CORES); yields the entry's name."""
    name = request.param
    if name in CPU_CORES:
        with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(CPU_CORES[name]):
            yield name
    else:
        with cnnops.use_backend(name):
            yield name


def make_input(shape, layout="contiguous", dtype=torch.float32, requires_grad=False, scale=1.0):
    """A random tensor of `shape` in the given memory layout.

    strided: a non-contiguous view (every other column of a wider tensor).
    """
    if layout == "contiguous":
        t = torch.randn(shape, dtype=dtype) * scale
    elif layout == "channels_last":
        t = (torch.randn(shape, dtype=dtype) * scale).contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = list(shape)
        wide[-1] *= 2
        t = (torch.randn(wide, dtype=dtype) * scale)[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        raise ValueError(layout)
    return t.requires_grad_(requires_grad)


def tolerances(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.float64: dict(rtol=1e-9, atol=1e-9)}[dtype]


def assert_close(actual, expected, dtype=None, **kw):
    dtype = dtype or expected.dtype
    tol = tolerances(dtype)
    tol.update(kw)
    torch.testing.assert_close(actual, expected, **tol)


def grads(outputs, inputs, grad_outputs):
    """Gradients of `outputs` w.r.t. the tensors in `inputs` (None entries skipped)."""
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, present, grad_outputs, allow_unused=False)
    return list(got)


def expected_memory_format(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

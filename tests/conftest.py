"""Shared fixtures: the backends under test, input layouts, tolerances.

The suite runs on CPU-only machines and on GPU machines. Every op is tested on each backend
that can run here, through one fixture, `backend`, which yields one entry (a `Backend`: a
str, the entry's name and test id, that also says on which device its tensors live, which
grid it runs and how its results are compared) per backend:

* CPU entries, always: `reference`, `cpu` (when cnnops._C is built) and `triton` (Triton's
  interpreter on CPU tensors, when Triton imports). A missing C++ extension is an error, not
  a skip: set CNNOPS_TEST_ALLOW_NO_EXT=1 to test the reference backend alone.
* GPU entries, when a CUDA device is present: `cuda` and `triton-cuda`, the cuda and triton
  backends on CUDA tensors. They run only in the tests that say how (most tests build CPU
  tensors): a test parametrized with `per_device(cpu=grid(...), gpu=grid(...))` runs one
  check with a grid for the CPU entries and one for the GPU entries (float16 and bfloat16 on
  GPU entries only; the tensors, the seed and the comparison rules each grid's own, see
  below), `on_gpu(...)` a test on the GPU entries only. Each GPU case is marked `cuda`, so
  `pytest -m cuda tests/` runs exactly the GPU cases (as bench/gpu_check.sh does), and runs
  with TF32 off. A GPU entry whose backend cannot run here (cnnops._C built without CUDA,
  Triton missing) skips. Without a GPU, a test on GPU entries only collects as one skipped
  case. Tests of the C++ CUDA kernels themselves (torch.ops.cnnops on CUDA tensors: cuDNN
  paths, AutocastCUDA, ...) take `cuda_ops` instead of `backend`.

The cpu backend runs its convolutions on one of three cores (cnnops.set_cpu_conv): in the
`backend` fixture `cpu` is the cpu backend with the im2col core forced, and the tests that
run a convolution (marked with `@conv_cores`, or `per_device(..., conv=True)`) also run
`cpu-onednn`, the cpu backend with the oneDNN core forced, and `cpu-winograd`, with the
Winograd core forced (it runs the 3x3 stride-1 and stride-2 convolutions, im2col the rest).
`auto`'s choice between them is tested in test_cpu_conv_core.py.

Comparisons. CPU entries: `assert_close` against torch in the same dtype (`tolerances`).
GPU entries (`Backend.check`, `Backend.run_pair`): float64 and float32 against torch in the
same dtype (TF32 off for cuDNN and cuBLAS while comparing), atol scaled by the largest
expected magnitude; float16 and bfloat16 against torch in float32 on the same (rounded)
inputs, with tolerances for the rounding of intermediate results (a few elements may land on
the other side of a ReLU), except max pooling, which is exact and is compared with torch in
the same dtype, indices included. Layouts: contiguous, channels_last and strided (sliced)
inputs; outputs must follow the layout rule (channels_last in, channels_last out).

Dry run of the GPU cases on a CPU machine: ``CNNOPS_GPU_TESTS_ON_CPU=1 pytest -m cuda
tests/`` replaces the GPU entries by `gpu-grid-on-cpu`, the cpu backend on CPU tensors
running the GPU grids under the GPU comparison rules (float32/float64 only; tests of
CUDA-only behaviour skip), to check the GPU tests themselves without a GPU.
"""
import collections
import contextlib
import itertools
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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
# `cpu-onednn` and `cpu-winograd` entries are added only to the tests of the convolution ops,
# through `conv_cores`.
CPU_CORES = {"cpu": "im2col", "cpu-onednn": "onednn", "cpu-winograd": "winograd"}
CONV_BACKENDS = [entry for b in CPU_BACKENDS
                 for entry in ((b, "cpu-onednn", "cpu-winograd") if b == "cpu" else (b,))]
# Decorator for a test that takes the `backend` fixture and runs convolutions: it runs on
# CONV_BACKENDS (each cpu core) instead of CPU_BACKENDS. A case of such a test that runs no
# convolution (a pooling case in a mixed list) can carry `no_conv` to run on `cpu` only.
conv_cores = pytest.mark.parametrize("backend", CONV_BACKENDS, indirect=True)
no_conv = pytest.mark.no_conv
LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float64]

# The GPU entries of the `backend` fixture, or in a dry run (see the docstring) the GPU grids
# on the cpu backend.
DRY_RUN = os.environ.get("CNNOPS_GPU_TESTS_ON_CPU") == "1"
HALF = (torch.float16, torch.bfloat16)
if DRY_RUN:
    GPU_BACKENDS = ["gpu-grid-on-cpu"]
elif torch.cuda.is_available():
    GPU_BACKENDS = ["cuda", "triton-cuda"]
else:
    GPU_BACKENDS = []
GPU_DEVICE = "cpu" if DRY_RUN else "cuda"
# The dtypes of the GPU grids.
GPU_DTYPES = [torch.float32, torch.float64] + ([] if DRY_RUN else list(HALF))
# Marks a test (or case) of CUDA-only behaviour: it skips in the dry run.
needs_cuda = pytest.mark.skipif(DRY_RUN, reason="CUDA-only behaviour (dry run on the CPU)")

# Interpreted Triton is ~100x slower than the C++ kernels, so on the triton backend each big
# parameter grid (a test function with GRID_SIZE or more triton cases) runs a fixed subset:
# one case in TRITON_GRID_SAMPLE, picked by a hash of its id. Every other test runs in full;
# CNNOPS_TEST_TRITON_ALL=1 runs the whole grids too.
GRID_SIZE = 40
TRITON_GRID_SAMPLE = 3


class Backend(str):
    """An entry of the `backend` fixture: its name (a str: the tests compare it with backend
    names, and it is the case's id) and what goes with it.

    backend: the cnnops backend it selects; core: the CPU convolution core it forces (or None);
    device: where the test's tensors live; gpu: whether it runs the GPU grids, compared under
    the GPU rules (check, run_pair); dtypes: the dtypes of its grids.
    """

    def __new__(cls, name, backend=None, core=None, device="cpu", gpu=False):
        self = super().__new__(cls, name)
        self.backend, self.core, self.device, self.gpu = backend or name, core, device, gpu
        self.dtypes = GPU_DTYPES if gpu else DTYPES
        return self

    def __reduce__(self):  # pickled (to a child process) as its plain name
        return str, (str(self),)

    def make(self, shape, dtype=torch.float32, layout="contiguous", grad=False, scale=1.0,
             offset=0.0, positive=False):
        """A random tensor on this entry's device: `make` (the GPU grids' inputs)."""
        return make(shape, dtype, layout, grad, scale, offset, positive, device=self.device)

    def check(self, actual, expected, dtype, what="output"):
        """actual (computed in `dtype`) against expected: GPU entries under `check`'s rules
        (expected computed in ref_dtype(dtype)), CPU entries with `assert_close` (expected in
        the same dtype)."""
        if self.gpu:
            check(actual, expected, dtype, what)
        else:
            assert_close(actual, expected)

    def run_pair(self, ours, reference, inputs, dtype, relu=False, grad_format=None,
                 names=None):
        """ours(*inputs) against reference(*inputs), outputs and the gradients of the inputs
        that require grad, with the same output gradient. -> ours' output

        GPU entries: `run_pair`. CPU entries: both on the same inputs in their dtype, torch's
        ReLU applied to the reference's output when `relu`, compared with `assert_close`."""
        if self.gpu:
            return run_pair(ours, reference, inputs, dtype, relu, grad_format, names,
                            device=self.device)[0]
        expected = reference(*inputs)
        if relu:
            expected = F.relu(expected)
        actual = ours(*inputs)
        assert actual.shape == expected.shape
        assert_close(actual, expected)
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if wrt:
            g = torch.randn_like(expected)
            got, want = grads(actual, wrt, g), grads(expected, wrt, g)
            assert len(got) == len(want)
            for a, e in zip(got, want):
                assert_close(a, e)
        return actual


ENTRIES = {name: Backend(name) for name in ("reference", "triton")}
ENTRIES.update({name: Backend(name, "cpu", core) for name, core in CPU_CORES.items()})
ENTRIES["cuda"] = Backend("cuda", device="cuda", gpu=True)
ENTRIES["triton-cuda"] = Backend("triton-cuda", "triton", device="cuda", gpu=True)
ENTRIES["gpu-grid-on-cpu"] = Backend("gpu-grid-on-cpu", "cpu", device="cpu", gpu=True)


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
    # on either forced-core entry: one cpu entry covers them.
    _drop(config, items, {
        id(item) for item in items if getattr(item, "callspec", None)
        and item.callspec.params.get("backend") in ("cpu-onednn", "cpu-winograd")
        and ((item.callspec.params.get("dtype") == torch.float64
              and item.callspec.params["backend"] == "cpu-onednn")
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
    (2, 64, 32, 3, 1, 1, 1, 2, 2),     # 2x2 images: one chunk, both in one thin tile (8 positions,
    (1, 32, 48, 1, 1, 0, 1, 3, 3),     # GEMMs transposed); 1x1 on one 3x3 image: thin direct path;
    (1, 8, 12, 3, 1, 1, 2, 3, 3),      # thin with groups
    (2, 8, 6, 3, 2, 1, 1, 7, 7),       # stride 2 to 4x4: a small segment (im2col by tap table)
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Runs the test with cnnops set to each backend in turn: the CPU entries by default (the
    cpu backend with its convolution core forced, see CPU_CORES), the GPU entries too where
    `per_device` says so; yields the entry (a Backend). A GPU entry whose backend cannot run
    here skips."""
    entry = ENTRIES[request.param]
    if entry.gpu and entry.backend not in cnnops.available_backends():
        pytest.skip("cnnops backend %r is not available here" % entry.backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(cnnops.use_backend(entry.backend))
        if entry.core is not None:
            stack.enter_context(cnnops.use_cpu_conv(entry.core))
        yield entry


@pytest.fixture
def cuda_ops():
    """The C++ CUDA kernels (torch.ops.cnnops on CUDA tensors), for op-level tests."""
    if not GPU_BACKENDS:
        pytest.skip("needs a CUDA device")
    if "cuda" not in cnnops.available_backends() and not DRY_RUN:
        pytest.skip("the cuda backend (cnnops._C built with CUDA) is not available here")
    if DRY_RUN and not _ext.LOADED:
        pytest.skip("cnnops._C is not loaded")
    return torch.ops.cnnops


@pytest.fixture(autouse=True)
def _full_fp32_on_gpu(request):
    """The GPU cases (marked `cuda`) run cuDNN and cuBLAS in full float32 while comparing:
    TF32 rounding (10-bit mantissa) would dominate every float32 difference."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------
# Grids per device: one test, a grid for the CPU entries and one for the GPU entries.

def axis(names, values, ids=None):
    """One axis of a grid, as one pytest.mark.parametrize takes it: argument name(s)
    (comma-separated; then each value is a tuple), values and ids (a list, a function, or None
    for pytest's own). -> (names, [(values, id)])"""
    names = tuple(n.strip() for n in names.split(","))
    cases = []
    for i, value in enumerate(values):
        vals = tuple(value) if len(names) > 1 else (value,)
        case_id = ids[i] if isinstance(ids, (list, tuple)) else ids(value) if ids else None
        if case_id is None:
            case_id = "-".join(_default_id(v, n, i) for v, n in zip(vals, names))
        cases.append((vals, str(case_id)))
    return names, cases


def const(**values):
    """Arguments with one value that adds nothing to the case id (an axis of one value)."""
    return tuple(values), [(tuple(values.values()), None)]


def _default_id(value, name, i):
    """pytest's id of a parameter value given no id."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, complex)):
        return str(value)
    return "%s%d" % (name, i)


def _join(*ids):
    return "-".join(i for i in ids if i is not None)


def grid(*axes):
    """The cases of stacked parametrize decorators: the product of the axes, each case's id
    the axes' ids joined by '-' in the order given (pytest's order: the decorator nearest the
    function first). -> (names, [(values, id)])"""
    names = tuple(n for a in axes for n in a[0])
    cases = [(tuple(v for vals, _ in combo for v in vals), _join(*(i for _, i in combo)))
             for combo in itertools.product(*(a[1] for a in axes))]
    return names, cases


def _reorder(g, names):
    """Grid g with its values in the order of `names` (the same arguments)."""
    assert sorted(g[0]) == sorted(names), (g[0], names)
    order = [g[0].index(n) for n in names]
    return tuple(names), [(tuple(vals[i] for i in order), case_id) for vals, case_id in g[1]]


def grids(*gs):
    """Several grids of the same arguments run as one."""
    return gs[0][0], [c for g in gs for c in _reorder(g, gs[0][0])[1]]


def per_device(cpu=None, gpu=None, conv=False, backend=True):
    """Parametrizes `backend` (indirect) and the grids' arguments: every CPU entry (with
    conv: CONV_BACKENDS, as @conv_cores) with the `cpu` grid, every GPU entry with the `gpu`
    grid, marked `cuda`. Case ids: as the stacked decorators the grid replaces gave them
    (the CPU entry's name last with conv, as @conv_cores put it, first otherwise; a GPU entry's
    name first). With no GPU entries here, a test with only a `gpu` grid is one skipped case.
    backend=False: no `backend` argument; the `gpu` grid runs once when GPU entries exist."""
    names = (cpu or gpu)[0]
    if cpu is not None and gpu is not None:  # the GPU grid's values in the CPU grid's order
        gpu = _reorder(gpu, names)
    params = []
    for entry in (CONV_BACKENDS if conv else CPU_BACKENDS) if cpu else []:
        for vals, case_id in cpu[1]:
            params.append(pytest.param(entry, *vals, id=_join(case_id, entry) if conv
                                       else _join(entry, case_id)))
    if gpu:
        cuda = [pytest.mark.cuda]
        for entry in GPU_BACKENDS if backend else GPU_BACKENDS[:1]:
            for vals, case_id in gpu[1]:
                params.append(pytest.param(*(((entry,) if backend else ()) + vals), marks=cuda,
                                           id=_join(entry, case_id) if backend else case_id))
        if not GPU_BACKENDS and not cpu:
            params.append(pytest.param(*[None] * (len(names) + backend), id="no-gpu",
                                       marks=cuda + [pytest.mark.skip(reason="needs a CUDA device")]))
    if backend:
        return pytest.mark.parametrize(("backend",) + names, params, indirect=["backend"])
    if not names:  # nothing to parametrize: the marks alone
        return _marks(pytest.mark.cuda,
                      pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device"))
    return pytest.mark.parametrize(names, params)


def _marks(*marks):
    def apply(function):
        for mark in marks:
            function = mark(function)
        return function
    return apply


def on_gpu(*axes, backend=True):
    """A test that runs on the GPU entries only: per_device(gpu=grid(*axes)). Without
    `backend` (a test of the C++ CUDA kernels, which takes `cuda_ops`), it runs once."""
    return per_device(gpu=grid(*axes) if axes else ((), [((), None)]), backend=backend)


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


# ---------------------------------------------------------------------------
# The GPU grids' inputs and comparisons (Backend.make, .check, .run_pair)

def make(shape, dtype=torch.float32, layout="contiguous", grad=False, scale=1.0, offset=0.0,
         positive=False, device=GPU_DEVICE):
    """A random tensor on `device` in the given layout, drawn on the CPU in float32 (so a test
    sees the same values on every device) and rounded to `dtype`.

    strided: a non-contiguous view (every other column of a wider tensor).
    """
    shape = tuple(shape)
    t = (torch.rand(shape) + 0.5) if positive else torch.randn(shape) * scale + offset
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype, device=device)
        wide[..., ::2] = t
        t = wide[..., ::2]
    elif layout != "contiguous":
        raise ValueError(layout)
    return t.requires_grad_(grad)


def ref_dtype(dtype):
    """The dtype torch computes the expected values in (GPU rules)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_ref(t, dtype):
    """A separate leaf (never sharing memory with t) holding t's values in `dtype`; anything
    else is returned as is."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(dtype, copy=True).requires_grad_(t.requires_grad)


# (rtol, atol) per dtype; atol is scaled by the largest expected magnitude (>= 1).
GPU_TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-4),
                  torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
# Half types: the L2 error of the whole tensor relative to its norm, and the share of elements
# allowed outside the elementwise tolerance.
REL_L2 = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
MAX_BAD_FRACTION = 0.01


def check(actual, expected, dtype, what="output"):
    """The GPU rules: actual (computed in `dtype`) against expected (computed in
    ref_dtype(dtype))."""
    assert actual is not None and expected is not None, what
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    a = actual.detach().to(expected.dtype)
    e = expected.detach()
    if e.numel() == 0:
        return
    rtol, atol = GPU_TOLERANCES[dtype]
    finite = torch.isfinite(e)
    scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
    if dtype not in HALF:
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m: "%s (%s): %s" % (what, dtype, m))
        return
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "%s: NaN positions differ" % what
    a, e = a[~torch.isnan(e)].double(), e[~torch.isnan(e)].double()
    bad = ((a - e).abs() > atol * scale + rtol * e.abs()).double().mean().item()
    floor = atol * scale * math.sqrt(e.numel())
    # A tensor that is zero up to rounding (a conv bias gradient under training-mode BN) has
    # no meaningful relative error: only the elementwise tolerance applies.
    rel = ((a - e).norm() / e.norm()).item() if e.norm().item() > floor else 0.0
    assert bad <= MAX_BAD_FRACTION and rel <= REL_L2[dtype], (
        "%s (%s): %.2f%% of elements outside tolerance, relative L2 error %.2e"
        % (what, dtype, 100 * bad, rel))


def run_pair(ours, reference, inputs, dtype, relu=False, grad_format=None, names=None,
             device=GPU_DEVICE):
    """The GPU rules: runs ours(*inputs) and reference(*ref_inputs), ref_inputs being separate
    leaves with the same values in the reference dtype; compares the outputs and, with the same
    output gradient, the gradients of every input that requires grad. -> (output, expected)

    relu: `reference` returns the value before a final ReLU. The output is compared with its
    ReLU; the gradients with the reference's gradient through our output's ReLU mask, so that
    a value rounded to the other side of zero (likely in float16/bfloat16) does not count
    as an error, while a wrong mask still shows in the forward comparison.
    grad_format: the memory format of the output gradient fed to our backward (default: the
    output's own layout).
    """
    ref_inputs = [to_ref(t, ref_dtype(dtype)) for t in inputs]
    out = ours(*inputs)
    exp = reference(*ref_inputs)
    if relu:
        exp, exp_for_grad = F.relu(exp), exp * (out.detach() > 0).to(exp.dtype)
    else:
        exp_for_grad = exp
    check(out, exp, dtype, "output")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_leaves = [t for t in ref_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(leaves) == len(ref_leaves)
    if leaves:
        g = torch.randn(tuple(exp.shape)).to(device=device, dtype=out.dtype)
        g = g.contiguous(memory_format=grad_format or expected_memory_format(out))
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(exp_for_grad, ref_leaves, g.to(exp.dtype))
        names = names or ["input %d" % i for i in range(len(leaves))]
        for name, a, b in zip(names, got, want):
            check(a, b, dtype, "grad of " + name)
    return out, exp


def grad_names(**tensors):
    """The names of the tensors that require grad, in argument order."""
    return [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]


# The GPU grids' convolutions: (in_channels, out_channels, kernel, stride, padding, dilation,
# groups, H, W)
GPU_CONV_CONFIGS = [
    (3, 8, 3, 1, 1, 1, 1, 9, 10),                    # padded 3x3
    (4, 6, 3, 2, 1, 1, 2, 11, 9),                    # grouped, strided
    (8, 8, 3, 1, 1, 1, 8, 7, 7),                     # depthwise
    (6, 5, 1, 1, 0, 1, 1, 6, 7),                     # pointwise (the input is the GEMM operand)
    (4, 8, 1, 2, 0, 1, 2, 9, 9),                     # strided grouped 1x1
    (3, 4, (3, 5), (2, 1), (1, 2), (2, 1), 1, 12, 10),  # asymmetric, dilated
    (3, 16, 7, 2, 3, 1, 1, 23, 23),                  # ResNet stem
    (16, 32, 3, 1, 2, 2, 4, 8, 8),                   # dilated, grouped
    (2, 4, 5, 1, 2, 1, 1, 1, 3),                     # padding wider than the input
    (40, 36, 3, 2, 1, 1, 1, 6, 5),                   # more channels than a warp
]


def conv_id(c):
    return "C%s-OC%s-k%s-s%s-p%s-d%s-g%s-%sx%s" % c


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def gpu_conv_tensors(config, dtype, layout, bias, N=3, grad=True, device=GPU_DEVICE):
    """A GPU grid convolution's input, weight (scaled by 1/sqrt(fan-in)), bias and
    (stride, padding, dilation, groups)."""
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = _pair(k)
    x = make((N, C, H, W), dtype, layout, grad=grad, device=device)
    w = make((OC, C // groups, kh, kw), dtype, grad=grad,
             scale=1.0 / math.sqrt(C // groups * kh * kw), device=device)
    b = make((OC,), dtype, grad=grad, device=device) if bias else None
    return x, w, b, (stride, padding, dilation, groups)


def gpu_bn_tensors(C, dtype, affine, mixed, grad=True, device=GPU_DEVICE):
    """A GPU grid BN's weight/bias/running statistics: float32 with a half input when
    `mixed`."""
    pdt = torch.float32 if mixed else dtype
    w = make((C,), pdt, positive=True, grad=grad, device=device) if affine else None
    b = make((C,), pdt, grad=grad, device=device) if affine else None
    rm = make((C,), pdt, scale=0.1, device=device)
    rv = make((C,), pdt, positive=True, device=device)
    return w, b, rm, rv


# The GPU grids' BN dtypes: (dtype, mixed), mixed: a half input with float32 BN tensors.
GPU_BN_CASES = [(d, m) for d in GPU_DTYPES for m in ([False, True] if d in HALF else [False])]


def bn_case_id(case):
    return str(case[0]) + ("-fp32-params" if case[1] else "")


def twin_resnet(dtype, layout, device=GPU_DEVICE):
    """A small ResNet (torch.nn modules, non-trivial BN parameters and statistics) on `device`
    and cnnops.fuse of it: (plain, fused)."""
    from cnnops.models.plain import TvBasicBlock, TvResNet

    torch.manual_seed(18)
    plain = TvResNet(TvBasicBlock, [1, 1, 1, 1], num_classes=10, in_channels=3, width=8)
    for m in plain.modules():  # non-trivial BN parameters and statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    plain = plain.to(device=device, dtype=dtype)
    if layout == "channels_last":
        plain = plain.to(memory_format=torch.channels_last)
    fused = cnnops.fuse(plain)
    assert fused is not plain
    return plain, fused


class OpRecorder(TorchDispatchMode):
    """Counts the ops a block dispatches, by schema name ("cnnops::conv_bn_relu", ...)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def take(self):
        """The counts so far, and a fresh count from here."""
        calls, self.calls = self.calls, collections.Counter()
        return calls

"""max_pool2d, avg_pool2d, adaptive_avg_pool2d and their modules on every backend, against torch.

Forward values, max-pool indices (exact), gradients (torch.autograd.grad) and, on the compiled
backends, the output layout. The geometry grids (kernel x stride x padding x dilation x
ceil_mode x spatial size) rotate through the layouts and dtypes so that every combination of
geometry is run once while each layout and dtype still meets every kind of geometry; a few
representative configurations then run in every layout x dtype. Configurations that PyTorch
rejects are tested too: cnnops must raise as well. The GPU entries (`cuda`, `triton-cuda`) run
their own grids of the layouts-and-dtypes tests, float16/bfloat16 included (conftest.py).
"""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF
import cnnops.nn as cnn
from conftest import (DTYPES, GPU_DTYPES, LAYOUTS, assert_close, axis, const,
                      expected_memory_format, grads, grid, make_input, on_gpu, per_device,
                      ref_dtype)

ERRORS = (ValueError, TypeError, RuntimeError)

KERNELS = [(1, 1), (2, 2), (3, 2), (3, 3)]
STRIDES = [None, 1, 2, (2, 1), 3]
PADDINGS = [0, 1, (1, 0)]
SIZES = [(7, 9), (5, 5), (1, 5)]
N, C = 2, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs this module's tiny cases on one thread.

    aten's pooling kernels parallelise even a few dozen elements; on a busy 2-core machine the
    thread hand-offs cost ten times the work. cnnops' kernels do not split problems this small,
    so nothing is lost; test_pooling_many_planes_on_all_threads covers the parallel split.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_len(size, k, s, p, d, ceil_mode):
    """PyTorch's pooling_output_shape along one dimension."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # a last window starting in the padding is dropped
        out -= 1
    return out


def _out_hw(hw, kernel, stride, padding, dilation, ceil_mode):
    stride = kernel if stride is None else _pair(stride)
    return tuple(_out_len(n, k, s, p, d, ceil_mode) for n, k, s, p, d in
                 zip(hw, kernel, stride, _pair(padding), _pair(dilation)))


def _padding_fits(kernel, padding):
    """PyTorch's rule: padding at most half the (undilated) kernel, per dimension."""
    return all(p <= k // 2 for k, p in zip(kernel, _pair(padding)))


def _has_window_without_input(hw, kernel, stride, padding, dilation, ceil_mode):
    """Whether some max-pool window has no tap on the input (all its taps fall in the padding)."""
    stride = kernel if stride is None else _pair(stride)
    for n, k, s, p, d in zip(hw, kernel, stride, _pair(padding), _pair(dilation)):
        for o in range(_out_len(n, k, s, p, d, ceil_mode)):
            if not any(0 <= o * s - p + j * d < n for j in range(k)):
                return True
    return False


def _fmt_arg(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _layout_dtype(i, j):
    """Layout and dtype for sub-case j (spatial size, divisor) of grid item i.

    Chosen so that every (layout, dtype) pair meets every value of every grid parameter
    (test_grids_meet_every_layout_and_dtype checks it).
    """
    return LAYOUTS[(i + j) % len(LAYOUTS)], DTYPES[(i // 2 + j) % len(DTYPES)]


@contextlib.contextmanager
def _case(**what):
    """Names the sub-case of a grid item in its assertion message."""
    try:
        yield
    except (AssertionError, pytest.fail.Exception) as e:
        raise AssertionError("%s: %s" % (", ".join("%s=%s" % kv for kv in what.items()), e)) from e


def _ids(config):
    return "-".join(_fmt_arg(v) if not isinstance(v, torch.dtype) else str(v).split(".")[-1]
                    for v in config)


def _assert_layout(backend, x, *outputs):
    if backend != "reference":
        fmt = expected_memory_format(x)
        for t in outputs:
            assert t.is_contiguous(memory_format=fmt), (t.shape, t.stride(), fmt)


def _as_layout(t, layout, requires_grad=True):
    """`t` (contiguous values) in the given layout, as conftest.make_input lays tensors out."""
    if layout == "contiguous":
        out = t.clone()
    elif layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
    else:
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
        assert not out.is_contiguous()
    assert torch.equal(out.detach(), t) or (t.isnan().any() and
                                            torch.equal(out.isnan(), t.isnan()))
    return out.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# max_pool2d

# (kernel, stride, padding, dilation, ceil_mode): the whole grid, with padding within PyTorch's
# rule; each item runs on every size in SIZES.
MAX_GRID = [c for c in itertools.product(KERNELS, STRIDES, PADDINGS, [1, 2], [False, True])
            if _padding_fits(c[0], c[2])]


def _check_max_pool2d(backend, x, kernel, stride, padding, dilation, ceil_mode, plain=True):
    args = (kernel, stride, padding, dilation, ceil_mode)
    if getattr(backend, "gpu", False):  # (a GPU entry of the `backend` fixture)
        return _check_max_pool2d_gpu(backend, x, args)
    expected, expected_idx = F.max_pool2d(x, *args, return_indices=True)
    actual, idx = CF.max_pool2d(x, *args, return_indices=True)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # A max is a selection: the values must be the very same, NaN included.
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, expected_idx), (idx, expected_idx)

    if plain:  # return_indices=False: the output alone
        out = CF.max_pool2d(x, *args)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)

    g = torch.randn_like(expected)
    (grad_actual,), (grad_expected,) = grads(actual, (x,), g), grads(expected, (x,), g)
    assert grad_actual.dtype == x.dtype
    assert_close(grad_actual, grad_expected)
    _assert_layout(backend, x, actual, idx, grad_actual)


def _check_max_pool2d_gpu(backend, x, args):
    """The GPU entries' check: as exact, in every dtype (ties keep the first maximum in both);
    the gradient under the GPU rules."""
    dtype = x.dtype
    out, idx = CF.max_pool2d(x, *args, return_indices=True)
    xr = x.detach().clone().requires_grad_()
    exp, exp_idx = F.max_pool2d(xr, *args, return_indices=True)
    assert out.dtype == dtype and idx.dtype == torch.int64
    assert out.is_contiguous(memory_format=expected_memory_format(x))
    assert torch.equal(out, exp)
    assert torch.equal(idx, exp_idx)
    g = torch.randn(tuple(out.shape)).to(device=x.device, dtype=dtype)
    (gi,) = torch.autograd.grad(out, x, g)
    (gi_exp,) = torch.autograd.grad(exp, xr, g)
    backend.check(gi, gi_exp.to(ref_dtype(dtype)), dtype, "grad of input")
    assert gi.is_contiguous(memory_format=expected_memory_format(x))


@pytest.mark.parametrize("config", MAX_GRID, ids=_ids)
def test_max_pool2d_matches_torch(backend, config):
    i = MAX_GRID.index(config)
    for j, (H, W) in enumerate(SIZES):
        if _has_window_without_input((H, W), *config):
            # Excluded on purpose: a window that holds no input element at all (e.g. kernel 2,
            # dilation 2, padding 1 on H=1: the only window taps rows -1 and 1). PyTorch reports
            # an index outside the plane there (garbage) and cnnops reports -1, a known and
            # accepted divergence.
            continue
        layout, dtype = _layout_dtype(i, j)
        torch.manual_seed(i)
        x = make_input((N, C, H, W), layout, dtype, requires_grad=True)
        with _case(size=(H, W), layout=layout, dtype=dtype):
            if min(_out_hw((H, W), *config)) < 1:  # outside PyTorch's domain: both raise
                with pytest.raises(RuntimeError):
                    F.max_pool2d(x, *config)
                with pytest.raises(ERRORS):
                    CF.max_pool2d(x, *config)
            else:  # (return_indices=False is covered by the smaller grids below)
                _check_max_pool2d(backend, x, *config, plain=False)


# Representative configurations run in every layout x dtype.
MAX_CORE = [
    ((3, 3), 2, 1, 1, True, (7, 9)),       # ResNet's stem pool, in ceil mode
    ((3, 2), (2, 1), (1, 0), 2, False, (7, 9)),
    ((2, 2), None, 0, 1, True, (5, 5)),
    ((3, 2), 1, (1, 0), 1, True, (1, 5)),
    ((1, 1), 3, 0, 1, False, (1, 5)),
]


# The GPU grid: (kernel, stride, padding, dilation, ceil_mode) on each of GPU_POOL_SHAPES; every
# window holds at least one input element (torch reports no meaningful index otherwise; see
# test_max_pool2d_edge_semantics_match_the_cpu_kernels).
GPU_MAX_CONFIGS = [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
                   ((3, 2), (2, 1), (1, 1), (1, 2), True), (2, 1, 0, 2, False),
                   (3, 3, 1, 1, True), (5, 2, 2, 1, False), (3, 1, 1, 1, False)]
GPU_POOL_SHAPES = [(2, 3, 11, 10), (2, 40, 7, 9)]


def _shape_id(s):
    return "x".join(map(str, s))


@per_device(cpu=grid(axis("config", MAX_CORE, _ids), axis("layout", LAYOUTS),
                     axis("dtype", DTYPES, str), const(shape=None)),
            gpu=grid(axis("config", GPU_MAX_CONFIGS, lambda c: "k%s-s%s-p%s-d%s-ceil%s" % c),
                     axis("shape", GPU_POOL_SHAPES, _shape_id), axis("dtype", GPU_DTYPES, str),
                     axis("layout", LAYOUTS)))
def test_max_pool2d_layouts_and_dtypes(backend, config, layout, dtype, shape):
    """Exact: values and indices equal torch's (same dtype), and the gradient is torch's. CPU
    grid: config holds the spatial size; GPU grid: the input's shape."""
    if backend.gpu:
        torch.manual_seed(9)
        x = backend.make(shape, dtype, layout, grad=True)
        _check_max_pool2d(backend, x, *config)
        return
    kernel, stride, padding, dilation, ceil_mode, (H, W) = config
    assert not _has_window_without_input((H, W), *config[:5])
    assert min(_out_hw((H, W), *config[:5])) >= 1
    torch.manual_seed(1)
    x = make_input((N, 3, H, W), layout, dtype, requires_grad=True)
    _check_max_pool2d(backend, x, kernel, stride, padding, dilation, ceil_mode)


@on_gpu(axis("dtype", [torch.float32, torch.float64], str),
        axis("layout", ["contiguous", "channels_last"]))
def test_max_pool2d_edge_semantics_match_the_cpu_kernels(backend, dtype, layout):
    """NaN wins (the last NaN of a window), all -inf windows report their first element,
    windows with no element at all (dilation past the input) report -1 and get no gradient:
    the same as the cpu backend, whose kernels define these cases."""
    if "cpu" not in cnnops.available_backends():
        pytest.skip("the cpu backend is not available")
    torch.manual_seed(19)
    x = torch.randn(2, 3, 5, 6, dtype=dtype)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 3] = float("nan")
    x[0, 1, 2, 4] = float("nan")
    x[1, 2, :3, :3] = float("-inf")
    # kernel 2, dilation 3, padding 1 on 2 rows/columns: taps -1 and 2, both outside
    tiny = torch.randn(2, 3, 2, 2, dtype=dtype)
    cases = [(x, (3, 2, 1, 1, True)), (x, (3, 1, 1, 1, False)), (tiny, (2, 1, 1, 3, False))]
    for x, (k, s, p, d, ceil) in cases:
        xd = x.to(backend.device)
        if layout == "channels_last":
            xd = xd.contiguous(memory_format=torch.channels_last)
        xd.requires_grad_()
        out, idx = CF.max_pool2d(xd, k, s, p, d, ceil, return_indices=True)
        xc = x.clone().requires_grad_()
        with cnnops.use_backend("cpu"):
            exp, exp_idx = CF.max_pool2d(xc, k, s, p, d, ceil, return_indices=True)
        torch.testing.assert_close(out.cpu(), exp, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(idx.cpu(), exp_idx)
        gg = torch.randn(tuple(out.shape), dtype=dtype)
        (gi,) = torch.autograd.grad(out, xd, gg.to(backend.device))
        (gi_exp,) = torch.autograd.grad(exp, xc, gg)
        torch.testing.assert_close(gi.cpu(), gi_exp)
    assert (idx == -1).any()  # the last case has windows without any element


def _special_values(kind, shape, dtype):
    g = torch.Generator().manual_seed(2)
    ints = torch.randint(-2, 3, shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) < 0.3
    if kind == "integers":  # many ties: the first maximum in scan order wins
        return ints
    if kind == "constant":  # every window a tie
        return torch.full(shape, 0.5, dtype=dtype)
    if kind == "nan":  # the last NaN of a window wins
        return torch.randn(shape, generator=g, dtype=dtype).masked_fill(mask, float("nan"))
    if kind == "nan_ties":
        return ints.masked_fill(mask, float("nan"))
    if kind == "inf_ties":
        return ints.masked_fill(mask, float("inf"))
    if kind == "neg_inf":  # windows of -inf pick their first real element, never the padding
        return ints.masked_fill(~mask, float("-inf"))
    if kind == "all_neg_inf":
        return torch.full(shape, float("-inf"), dtype=dtype)
    raise ValueError(kind)


SPECIAL_KINDS = ["integers", "constant", "nan", "nan_ties", "inf_ties", "neg_inf", "all_neg_inf"]
# Overlapping windows (stride < kernel), so that one element can win several windows.
SPECIAL_CONFIGS = [
    ((3, 3), 1, 1, 1, False, (5, 5)),
    ((3, 2), (2, 1), (1, 0), 2, True, (7, 9)),
    ((2, 2), 1, 1, 1, True, (1, 5)),
    ((3, 3), 2, 1, 2, True, (5, 5)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", SPECIAL_CONFIGS, ids=_ids)
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_max_pool2d_ties_nan_and_inf(backend, kind, config, layout):
    kernel, stride, padding, dilation, ceil_mode, (H, W) = config
    assert not _has_window_without_input((H, W), *config[:5])
    dtype = torch.float64 if layout == "strided" else torch.float32
    x = _as_layout(_special_values(kind, (N, C, H, W), dtype), layout)
    _check_max_pool2d(backend, x, kernel, stride, padding, dilation, ceil_mode)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool2d_empty_batch(backend, layout):
    x = make_input((0, 3, 7, 9), layout, requires_grad=True)
    expected, expected_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    actual, idx = CF.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert actual.shape == expected.shape == (0, 3, 4, 5)
    assert idx.shape == expected_idx.shape and idx.dtype == torch.int64
    (gx,) = grads(actual, (x,), torch.zeros_like(expected))
    assert gx.shape == x.shape and gx.dtype == x.dtype


@pytest.mark.parametrize("kind", ["integers", "nan_ties"])
@pytest.mark.parametrize("channels", [17, 67])
def test_max_pool2d_channels_last_many_channels(backend, channels, kind):
    """The CPU's NHWC kernels run a pixel's channels as one vector loop and the backward in
    blocks of 64 channels: channel counts past a vector and past a block, with ties and NaNs."""
    x = _special_values(kind, (2, channels, 7, 9), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    _check_max_pool2d(backend, x, (3, 3), 2, 1, 1, True)
    _check_max_pool2d(backend, x, (2, 3), (1, 2), (1, 0), 2, False)


# ---------------------------------------------------------------------------
# avg_pool2d

# (kernel, stride, padding, ceil_mode, count_include_pad): the whole grid, with padding within
# PyTorch's rule; each item runs on every divisor_override in AVG_DIVISORS and size in SIZES.
AVG_GRID = [c for c in itertools.product(KERNELS, STRIDES, PADDINGS, [False, True], [True, False])
            if _padding_fits(c[0], c[2])]
AVG_DIVISORS = [None, 3]


def _check_avg_pool2d(backend, x, *args):
    expected = F.avg_pool2d(x, *args)
    actual = CF.avg_pool2d(x, *args)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert_close(actual, expected)
    g = torch.randn_like(expected)
    (grad_actual,), (grad_expected,) = grads(actual, (x,), g), grads(expected, (x,), g)
    assert_close(grad_actual, grad_expected)
    _assert_layout(backend, x, actual, grad_actual)


@pytest.mark.parametrize("config", AVG_GRID, ids=_ids)
def test_avg_pool2d_matches_torch(backend, config):
    kernel, stride, padding, ceil_mode, count_include_pad = config
    i = AVG_GRID.index(config)
    for j, ((H, W), divisor) in enumerate(itertools.product(SIZES, AVG_DIVISORS)):
        layout, dtype = _layout_dtype(i, j)
        torch.manual_seed(i)
        x = make_input((N, C, H, W), layout, dtype, requires_grad=True)
        args = config + (divisor,)
        with _case(size=(H, W), divisor_override=divisor, layout=layout, dtype=dtype):
            if min(_out_hw((H, W), kernel, stride, padding, 1, ceil_mode)) < 1:
                with pytest.raises(RuntimeError):  # outside PyTorch's domain: both raise
                    F.avg_pool2d(x, *args)
                with pytest.raises(ERRORS):
                    CF.avg_pool2d(x, *args)
            else:
                _check_avg_pool2d(backend, x, *args)


AVG_CORE = [
    ((3, 3), 2, 1, True, True, None, (6, 8)),     # last window overhangs the padding (ceil)
    ((3, 3), 2, 1, True, False, None, (6, 8)),
    ((3, 2), (2, 1), (1, 0), False, True, 3, (5, 5)),
    ((2, 2), None, 0, False, True, None, (7, 9)),  # DenseNet transition
    ((3, 3), 1, 1, False, False, None, (1, 5)),
]


# The GPU grid: (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) on each
# of GPU_POOL_SHAPES.
GPU_AVG_CONFIGS = [(2, 2, 0, False, True, None), (3, 2, 1, False, True, None),
                   (3, 2, 1, True, False, None), (3, 2, 1, True, True, None),
                   ((3, 2), (2, 1), (1, 0), True, False, None), (2, 1, 1, False, True, 3),
                   (3, 3, 1, True, True, None), (4, 3, 2, True, False, None),
                   (3, 2, 1, True, True, -2)]


@per_device(cpu=grid(axis("config", AVG_CORE, _ids), axis("layout", LAYOUTS),
                     axis("dtype", DTYPES, str), const(shape=None)),
            gpu=grid(axis("config", GPU_AVG_CONFIGS,
                          lambda c: "k%s-s%s-p%s-ceil%s-pad%s-div%s" % c),
                     axis("shape", GPU_POOL_SHAPES, _shape_id), axis("dtype", GPU_DTYPES, str),
                     axis("layout", LAYOUTS)))
def test_avg_pool2d_layouts_and_dtypes(backend, config, layout, dtype, shape):
    """CPU grid: config holds the spatial size; GPU grid: the input's shape."""
    if backend.gpu:
        torch.manual_seed(10)
        x = backend.make(shape, dtype, layout, grad=True)
        # The reference pools an NCHW copy: torch's own CUDA avg_pool2d backward is wrong for
        # channels_last input with padding > 0 (pytorch/pytorch#188344, seen with torch 2.11).
        out = backend.run_pair(lambda x: CF.avg_pool2d(x, *config),
                               lambda x: F.avg_pool2d(x.contiguous(), *config), [x], dtype)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=expected_memory_format(x))
        return
    kernel, stride, padding, ceil_mode, count_include_pad, divisor, (H, W) = config
    torch.manual_seed(1)
    x = make_input((N, 3, H, W), layout, dtype, requires_grad=True)
    _check_avg_pool2d(backend, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_avg_pool2d_empty_batch(backend, layout):
    x = make_input((0, 3, 7, 9), layout, requires_grad=True)
    expected = F.avg_pool2d(x, 3, 2, 1, True, False)
    actual = CF.avg_pool2d(x, 3, 2, 1, True, False)
    assert actual.shape == expected.shape == (0, 3, 4, 5)
    (gx,) = grads(actual, (x,), torch.zeros_like(expected))
    assert gx.shape == x.shape and gx.dtype == x.dtype


# ---------------------------------------------------------------------------
# adaptive_avg_pool2d

# (output_size, (H, W)): bins that divide evenly, overlap, are single elements, repeat (output
# larger than the input); None entries keep that input size.
ADAPTIVE_CONFIGS = [
    ((1, 1), (7, 9)),
    ((3, 5), (7, 9)),
    ((7, 7), (7, 9)),
    ((10, 10), (7, 9)),
    ((None, 4), (7, 9)),
    ((3), (7, 9)),
    ((None, None), (7, 9)),
    (4, (7, 9)),
    ((2, 3), (5, 5)),
    ((1, 1), (1, 5)),
    ((2, 7), (1, 5)),
]


@per_device(cpu=grid(axis("config", ADAPTIVE_CONFIGS, _ids), axis("layout", LAYOUTS),
                     axis("dtype", DTYPES, str)),
            gpu=grid(axis("config", [((1, 1), (10, 9)), ((3, 5), (10, 9)), ((7, 7), (10, 9)),
                                     ((4, 13), (10, 9)), ((10, 9), (10, 9))],
                          lambda c: "%sx%s" % c[0]),
                     axis("dtype", GPU_DTYPES, str), axis("layout", LAYOUTS)))
def test_adaptive_avg_pool2d_matches_torch(backend, config, layout, dtype):
    """config: (output_size, (H, W))."""
    output_size, (H, W) = config
    if backend.gpu:  # 37 channels
        torch.manual_seed(11)
        x = backend.make((2, 37, H, W), dtype, layout, grad=True)
        out = backend.run_pair(lambda x: CF.adaptive_avg_pool2d(x, output_size),
                               lambda x: F.adaptive_avg_pool2d(x, output_size), [x], dtype)
        assert out.is_contiguous(memory_format=expected_memory_format(x))
        return
    torch.manual_seed(0)
    x = make_input((N, C, H, W), layout, dtype, requires_grad=True)
    expected = F.adaptive_avg_pool2d(x, output_size)
    actual = CF.adaptive_avg_pool2d(x, output_size)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert_close(actual, expected)
    g = torch.randn_like(expected)
    (grad_actual,), (grad_expected,) = grads(actual, (x,), g), grads(expected, (x,), g)
    assert_close(grad_actual, grad_expected)
    _assert_layout(backend, x, actual, grad_actual)


@pytest.mark.parametrize("shape", [(0, 3, 7, 9), (2, 0, 7, 9)], ids=["N=0", "C=0"])
def test_adaptive_avg_pool2d_empty(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    expected = F.adaptive_avg_pool2d(x, (3, 5))
    actual = CF.adaptive_avg_pool2d(x, (3, 5))
    assert actual.shape == expected.shape
    (gx,) = grads(actual, (x,), torch.zeros_like(expected))
    assert gx.shape == x.shape


def test_adaptive_avg_pool2d_zero_output_size(backend):
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    expected = F.adaptive_avg_pool2d(x, (0, 3))
    actual = CF.adaptive_avg_pool2d(x, (0, 3))
    assert actual.shape == expected.shape == (2, 3, 0, 3)


@pytest.mark.parametrize("channels", [17, 67, 130])
def test_avg_pools_channels_last_many_channels(backend, channels):
    """The CPU's NHWC average-pooling kernels sum a pixel's channels as one vector loop and run
    the backward in blocks of 64 channels: counts past a vector, a block and two blocks, with
    overlapping, padded and ceil-mode windows, a divisor override, and global pooling."""
    torch.manual_seed(channels)
    x = make_input((2, channels, 7, 9), "channels_last", requires_grad=True)
    _check_avg_pool2d(backend, x, (3, 3), 2, 1, True, True, None)
    _check_avg_pool2d(backend, x, (2, 3), (1, 2), (1, 0), False, False, 5)
    for size in [(1, 1), (3, 4), (9, 11)]:
        expected = F.adaptive_avg_pool2d(x, size)
        actual = CF.adaptive_avg_pool2d(x, size)
        assert_close(actual, expected)
        g = torch.randn_like(expected)
        (grad_actual,), (grad_expected,) = grads(actual, (x,), g), grads(expected, (x,), g)
        assert_close(grad_actual, grad_expected)
        _assert_layout(backend, x, actual, grad_actual)


# ---------------------------------------------------------------------------
# Arguments PyTorch rejects: cnnops raises too.

# (name, call(functional module))
INVALID = [
    ("max-kernel0", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 0)),
    ("max-kernel-triple", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), (2, 2, 2))),
    ("max-stride0", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 2, 0)),
    ("max-padding-negative", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 2, 1, -1)),
    ("max-padding-over-half", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 2, 1, 2)),
    ("max-padding-over-half-w", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), (3, 2), 1, (1, 2))),
    ("max-padding-1-kernel-1", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 1, 1, 1)),
    # dilation does not widen the allowed padding
    ("max-padding-over-half-dilated", lambda f: f.max_pool2d(torch.randn(1, 1, 9, 9), 2, 1, 2, 3)),
    ("max-dilation0", lambda f: f.max_pool2d(torch.randn(1, 1, 5, 5), 2, 1, 0, 0)),
    ("max-kernel-larger-than-input", lambda f: f.max_pool2d(torch.randn(1, 1, 3, 3), 4)),
    ("max-H0", lambda f: f.max_pool2d(torch.randn(1, 1, 0, 5), 1)),
    ("max-C0", lambda f: f.max_pool2d(torch.randn(2, 0, 5, 5), 2)),
    ("max-5d", lambda f: f.max_pool2d(torch.randn(1, 1, 1, 5, 5), 2)),
    ("avg-kernel0", lambda f: f.avg_pool2d(torch.randn(1, 1, 5, 5), 0)),
    ("avg-stride0", lambda f: f.avg_pool2d(torch.randn(1, 1, 5, 5), 2, 0)),
    ("avg-padding-over-half", lambda f: f.avg_pool2d(torch.randn(1, 1, 5, 5), 3, 1, 2)),
    ("avg-divisor0", lambda f: f.avg_pool2d(torch.randn(1, 1, 5, 5), 2, divisor_override=0)),
    ("avg-H0", lambda f: f.avg_pool2d(torch.randn(1, 1, 0, 5), 1)),
    ("avg-C0", lambda f: f.avg_pool2d(torch.randn(2, 0, 5, 5), 2)),
    ("adaptive-negative", lambda f: f.adaptive_avg_pool2d(torch.randn(1, 1, 5, 5), (-1, 2))),
    ("adaptive-triple", lambda f: f.adaptive_avg_pool2d(torch.randn(1, 1, 5, 5), (1, 2, 3))),
    ("adaptive-H0", lambda f: f.adaptive_avg_pool2d(torch.randn(1, 1, 0, 5), 2)),
    ("adaptive-5d", lambda f: f.adaptive_avg_pool2d(torch.randn(1, 1, 1, 5, 5), 2)),
]


@pytest.mark.parametrize("call", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rejects_what_torch_rejects(backend, call):
    with pytest.raises(ERRORS):
        call(F)
    with pytest.raises(ERRORS):
        call(CF)


# ---------------------------------------------------------------------------
# Modules: cnnops.nn.X(args) behaves as torch.nn.X(args).

MODULE_CASES = [
    ("MaxPool2d", dict(kernel_size=3, stride=2, padding=1)),
    ("MaxPool2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=2,
                       ceil_mode=True)),
    ("MaxPool2d", dict(kernel_size=2, return_indices=True)),
    ("MaxPool2d", dict(kernel_size=3, stride=1, padding=1, dilation=(2, 1), return_indices=True,
                       ceil_mode=True)),
    ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                       count_include_pad=False)),
    ("AvgPool2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), divisor_override=3)),
    ("AvgPool2d", dict(kernel_size=2)),
    ("AdaptiveAvgPool2d", dict(output_size=(3, 5))),
    ("AdaptiveAvgPool2d", dict(output_size=(None, 4))),
    ("AdaptiveAvgPool2d", dict(output_size=1)),
    ("AdaptiveAvgPool2d", dict(output_size=(10, 10))),
]


def _module_id(case):
    return case[0] + "-" + "-".join("%s=%s" % (k, _fmt_arg(v)) for k, v in case[1].items())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=_module_id)
def test_module_matches_torch_nn(backend, case, layout):
    name, kwargs = case
    ours, theirs = getattr(cnn, name)(**kwargs), getattr(nn, name)(**kwargs)
    assert isinstance(ours, getattr(nn, name))
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())

    torch.manual_seed(0)
    x = make_input((N, C, 7, 9), layout, torch.float64, requires_grad=True)
    for mode in (ours.train, ours.eval):
        mode()
        actual, expected = ours(x), theirs(x)
        if kwargs.get("return_indices"):
            assert isinstance(actual, tuple) and len(actual) == 2
            assert torch.equal(actual[1], expected[1])
            actual, expected = actual[0], expected[0]
        assert isinstance(actual, torch.Tensor)
        assert actual.shape == expected.shape
        assert_close(actual, expected)
        g = torch.randn_like(expected)
        (grad_actual,), (grad_expected,) = grads(actual, (x,), g), grads(expected, (x,), g)
        assert_close(grad_actual, grad_expected)
        _assert_layout(backend, x, actual, grad_actual)


@pytest.mark.parametrize("name,kwargs", [("MaxPool2d", dict(kernel_size=2)),
                                         ("AvgPool2d", dict(kernel_size=2)),
                                         ("AdaptiveAvgPool2d", dict(output_size=2))])
def test_module_runs_on_cnnops(name, kwargs):
    # The cpu backend refuses float16; torch.nn's forward would accept it. So an error here shows
    # that the module's forward goes through cnnops and honours the backend setting.
    from cnnops import _ext
    assert _ext.LOADED
    with cnnops.use_backend("cpu"), pytest.raises(RuntimeError, match="float16"):
        getattr(cnn, name)(**kwargs)(torch.randn(1, 1, 4, 4, dtype=torch.float16))


# ---------------------------------------------------------------------------

def test_pooling_many_planes_on_all_threads(one_thread):
    # Enough planes (N*C) for the cpu kernels to split the work between threads.
    torch.set_num_threads(one_thread)
    try:
        torch.manual_seed(0)
        x = make_input((4, 64, 7, 9), "channels_last", torch.float64, requires_grad=True)
        for backend in ("reference", "cpu"):
            with cnnops.use_backend(backend), _case(backend=backend):
                _check_max_pool2d(backend, x, (3, 3), 1, 1, 1, False)
                _check_avg_pool2d(backend, x, (3, 3), 1, 1, True, False, None)
                expected = F.adaptive_avg_pool2d(x, (3, 5))
                actual = CF.adaptive_avg_pool2d(x, (3, 5))
                assert_close(actual, expected)
                g = torch.randn_like(expected)
                assert_close(grads(actual, (x,), g)[0], grads(expected, (x,), g)[0])
    finally:
        torch.set_num_threads(1)


def test_grids_meet_every_layout_and_dtype():
    # The grid tests give each sub-case one layout and dtype; every (layout, dtype) pair must
    # still meet every value of every parameter among the sub-cases that are compared with torch.
    pairs = set(itertools.product(LAYOUTS, DTYPES))
    for name, grid, inner in (("max", MAX_GRID, [(hw, None) for hw in SIZES]),
                              ("avg", AVG_GRID, list(itertools.product(SIZES, AVG_DIVISORS)))):
        met = {}
        for i, config in enumerate(grid):
            geometry = config if name == "max" else config[:3] + (1, config[3])
            for j, (hw, divisor) in enumerate(inner):
                if _has_window_without_input(hw, *geometry) or min(_out_hw(hw, *geometry)) < 1:
                    continue
                for k, value in enumerate(config + (hw, divisor)):
                    met.setdefault((k, str(value)), set()).add(_layout_dtype(i, j))
        missing = [k for k, v in met.items() if v != pairs]
        assert not missing, (name, missing)

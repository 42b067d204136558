"""The Triton pooling and add+ReLU launchers (cnnops.triton_kernels.pool / .elementwise), called
directly and compared with torch.nn.functional: values, max-pool indices (exactly), gradients
(the backward launchers against torch.autograd through F) and output layouts.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, one program instance at a
time in numpy, so shapes are tiny and each geometry grid item runs once, on one spatial size,
layout and dtype that rotate through the grid. float32 and float64 are compared with torch in
the same dtype; float16 and bfloat16 (a few cases) with a float32 reference at a loose tolerance.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

# Without a GPU, conftest has turned on Triton's interpreter before this import.
from cnnops.triton_kernels import _common, elementwise, pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNELS = [(1, 1), (2, 2), (3, 2), (3, 3)]
# The grids keep to strides that differ per dimension or skip input; stride 1 (the most
# overlapping windows) is in the core and special-value cases.
STRIDES = [(2, 1), 3]
PADDINGS = [0, 1, (1, 0)]
SIZES = [(7, 9), (5, 5), (1, 5)]
# strided: every other column of a wider NCHW tensor; cl_strided: the same of a channels_last
# one (neither dense, so outputs are NCHW); transposed: H and W swapped in memory.
LAYOUTS = ["contiguous", "channels_last", "strided", "cl_strided", "transposed"]
DTYPES = [torch.float32, torch.float64]
REDUCED = [torch.float16, torch.bfloat16]
N, C = 2, 2


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _make(shape, layout, dtype, values=None, requires_grad=False):
    """A tensor of `shape` on DEVICE in the given layout (random normal unless `values`)."""
    t = torch.randn(shape, dtype=dtype, device=DEVICE) if values is None else values.to(DEVICE)
    if layout == "contiguous":
        out = t.clone()
    elif layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
    elif layout in ("strided", "cl_strided"):
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=t.dtype, device=DEVICE)
        if layout == "cl_strided":
            wide = wide.contiguous(memory_format=torch.channels_last)
        wide[..., 1::2] = t
        out = wide[..., 1::2]
    elif layout == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        raise ValueError(layout)
    return out.requires_grad_(requires_grad)


def _expected_format(t):
    """The project's output layout rule."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _assert_layout(like, *outputs):
    fmt = _expected_format(like)
    for t in outputs:
        assert t.is_contiguous(memory_format=fmt), (t.shape, t.stride(), fmt)


def _out_len(size, k, s, p, d, ceil_mode):
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _usable(hw, kernel, stride, padding, dilation, ceil_mode):
    """Whether torch accepts the geometry on this size and every window holds an input element
    (torch reports a meaningless index for a window that holds none; see the -1 test)."""
    for n, k, s, p, d in zip(hw, kernel, _pair(stride), _pair(padding), _pair(dilation)):
        out = _out_len(n, k, s, p, d, ceil_mode)
        if out < 1 or any(not any(0 <= o * s - p + j * d < n for j in range(k))
                          for o in range(out)):
            return False
    return True


def _rotate(i, geometry):
    """Size, layout and dtype for grid item i: the first usable size from a rotating start."""
    for j in range(len(SIZES)):
        hw = SIZES[(i + j) % len(SIZES)]
        if _usable(hw, *geometry):
            return hw, LAYOUTS[i % len(LAYOUTS)], DTYPES[(i // len(LAYOUTS)) % len(DTYPES)]
    return None, None, None


def _ids(config):
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in config)


def _reduced_close(actual, expected, dtype):
    """Compares a float16/bfloat16 result with a float32 reference."""
    # bfloat16 keeps 8 significant bits; Triton's interpreter also rounds float32 -> bfloat16
    # towards zero (a GPU rounds to nearest), so allow two units in the last place.
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol, equal_nan=True)


def _grad(fn, x, g):
    """d(fn(x) . g)/dx by torch.autograd, fn a torch.nn.functional call."""
    x = x.detach().requires_grad_()
    out = fn(x)
    (gx,) = torch.autograd.grad(out, x, g)
    return gx


def _avg_grad(args, x, g):
    """avg_pool2d's input gradient by torch.autograd on NCHW copies on the CPU, in x's dtype
    (float32 for half types), returned on DEVICE. Not from x's own layout and device:
    torch's CUDA kernel gets the channels_last gradient wrong when there is padding
    (pytorch/pytorch#188344; the first GPU run's avg_pool2d failures match it)."""
    dtype = torch.float32 if x.dtype in REDUCED else x.dtype
    cpu = [t.detach().to("cpu", dtype).contiguous() for t in (x, g)]
    return _grad(lambda t: F.avg_pool2d(t, *args), *cpu).to(DEVICE)


# ---------------------------------------------------------------------------
# max_pool2d

# Padding within torch's rule (at most half the kernel); no dilation of a 1x1 kernel (a no-op).
MAX_GRID = [c for c in itertools.product(KERNELS, STRIDES, PADDINGS, [1, 2], [False, True])
            if all(p <= k // 2 for k, p in zip(c[0], _pair(c[2])))
            and not (c[0] == (1, 1) and c[3] == 2)]


def _check_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, grad_layout="contiguous"):
    args = (_pair(kernel), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
    expected, expected_idx = F.max_pool2d(x, *args, return_indices=True)
    actual, idx = pool.max_pool2d(x, *args)
    assert actual.shape == expected.shape and actual.dtype == x.dtype
    # A max is a selection: the very same values, NaN included.
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert idx.dtype == torch.int64 and torch.equal(idx, expected_idx), (idx, expected_idx)

    g = _make(expected.shape, grad_layout, x.dtype)
    grad = pool.max_pool2d_backward(g, x, idx, *args[:4])
    assert grad.dtype == x.dtype
    torch.testing.assert_close(grad, _grad(lambda t: F.max_pool2d(t, *args), x, g))
    _assert_layout(x, actual, idx, grad)


@pytest.mark.parametrize("config", MAX_GRID, ids=_ids)
def test_max_pool2d_grid(config):
    i = MAX_GRID.index(config)
    hw, layout, dtype = _rotate(i, config)
    if hw is None:
        pytest.skip("no size in SIZES suits this geometry")
    torch.manual_seed(i)
    x = _make((N, C) + hw, layout, dtype)
    _check_max_pool2d(x, *config, grad_layout=LAYOUTS[(i + 1) % len(LAYOUTS)])


# Representative geometries, each in every layout (the dtype alternating): ResNet's stem pool
# in ceil mode, a dilated rectangular one, plain 2x2, dilated stride 1.
MAX_CORE = [
    ((3, 3), 2, 1, 1, True, (7, 9)),
    ((3, 2), (2, 1), (1, 0), 2, False, (7, 9)),
    ((2, 2), (2, 2), 0, 1, True, (5, 5)),
    ((3, 3), 1, 1, 2, False, (7, 9)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", MAX_CORE, ids=_ids)
def test_max_pool2d_layouts(config, layout):
    assert _usable(config[-1], *config[:-1])
    torch.manual_seed(1)
    dtype = DTYPES[(MAX_CORE.index(config) + LAYOUTS.index(layout)) % len(DTYPES)]
    x = _make((N, C) + config[-1], layout, dtype)
    _check_max_pool2d(x, *config[:-1], grad_layout=layout)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_max_pool2d_reduced_precision(layout, dtype):
    torch.manual_seed(2)
    kernel, stride, padding, dilation, ceil_mode, hw = MAX_CORE[0]
    args = (_pair(kernel), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
    x = _make((N, C) + hw, layout, dtype)
    expected, expected_idx = F.max_pool2d(x.float(), *args, return_indices=True)
    actual, idx = pool.max_pool2d(x, *args)
    assert actual.dtype == dtype and torch.equal(actual.float(), expected)
    assert torch.equal(idx, expected_idx)
    g = _make(expected.shape, layout, dtype)
    grad = pool.max_pool2d_backward(g, x, idx, *args[:4])
    _reduced_close(grad, _grad(lambda t: F.max_pool2d(t, *args), x.float(), g.float()), dtype)
    _assert_layout(x, actual, idx, grad)


def _special(kind, shape, dtype):
    gen = torch.Generator().manual_seed(3)
    ints = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) < 0.3
    return {
        "ties": ints,  # the first maximum in scan order wins
        "nan": torch.randn(shape, generator=gen, dtype=dtype).masked_fill(mask, float("nan")),
        "nan_ties": ints.masked_fill(mask, float("nan")),  # the last NaN of a window wins
        "inf": ints.masked_fill(mask, float("inf")),
        "neg_inf": ints.masked_fill(~mask, float("-inf")),  # never the padding
        "all_neg_inf": torch.full(shape, float("-inf"), dtype=dtype),
    }[kind]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("kind", ["ties", "nan", "nan_ties", "inf", "neg_inf", "all_neg_inf"])
def test_max_pool2d_special_values(kind, layout):
    # Overlapping windows (stride < kernel) and padding, so one element can win several windows.
    dtype = torch.float64 if layout == "strided" else torch.float32
    x = _make((N, C, 5, 5), layout, dtype, values=_special(kind, (N, C, 5, 5), dtype))
    _check_max_pool2d(x, (3, 3), 1, 1, 1, False, grad_layout=layout)


def test_max_pool2d_reduced_precision_nan():
    x = _special("nan_ties", (N, C, 5, 5), torch.float32).to(torch.bfloat16).to(DEVICE)
    args = ((3, 3), (1, 1), (1, 1), (1, 1), True)
    expected, expected_idx = F.max_pool2d(x.float(), *args, return_indices=True)
    actual, idx = pool.max_pool2d(x, *args)
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, expected_idx)


def test_max_pool2d_window_without_input():
    # Kernel 2, dilation 2, padding 1 on H = 1: the only window row taps rows -1 and 1. Such a
    # window's index is -1 (torch reports an offset outside the plane) and its gradient is dropped.
    x = _make((N, C, 1, 5), "contiguous", torch.float32)
    args = ((2, 2), (1, 1), (1, 1), (2, 2), False)
    out, idx = pool.max_pool2d(x, *args)
    assert out.shape == (N, C, 1, 5)
    assert torch.equal(idx, torch.full_like(idx, -1))
    assert torch.equal(out, torch.full_like(out, float("-inf")))
    grad = pool.max_pool2d_backward(torch.ones_like(out), x, idx, *args[:4])
    assert torch.equal(grad, torch.zeros_like(x))


# ---------------------------------------------------------------------------
# avg_pool2d

# Padding within torch's rule; count_include_pad only where there is padding to count.
AVG_GRID = [c for c in itertools.product(KERNELS, STRIDES, PADDINGS, [False, True], [True, False])
            if all(p <= k // 2 for k, p in zip(c[0], _pair(c[2])))
            and (c[2] != 0 or c[4])]


def _check_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor,
                      grad_layout="contiguous"):
    args = (_pair(kernel), _pair(stride), _pair(padding), ceil_mode, count_include_pad, divisor)
    expected = F.avg_pool2d(x, *args)
    actual = pool.avg_pool2d(x, *args)
    assert actual.shape == expected.shape and actual.dtype == x.dtype
    torch.testing.assert_close(actual, expected)
    g = _make(expected.shape, grad_layout, x.dtype)
    grad = pool.avg_pool2d_backward(g, x, *args)
    torch.testing.assert_close(grad, _avg_grad(args, x, g))
    _assert_layout(x, actual, grad)


@pytest.mark.parametrize("config", AVG_GRID, ids=_ids)
def test_avg_pool2d_grid(config):
    kernel, stride, padding, ceil_mode, count_include_pad = config
    i = AVG_GRID.index(config)
    hw, layout, dtype = _rotate(i, (kernel, stride, padding, 1, ceil_mode))
    if hw is None:
        pytest.skip("no size in SIZES suits this geometry")
    torch.manual_seed(i)
    x = _make((N, C) + hw, layout, dtype)
    divisor = 3 if i % 3 == 2 else None
    _check_avg_pool2d(x, *config, divisor, grad_layout=LAYOUTS[(i + 2) % len(LAYOUTS)])


AVG_CORE = [
    ((3, 3), 2, 1, True, True, None, (6, 8)),   # the last window overhangs the padding
    ((3, 3), 2, 1, True, False, None, (6, 8)),
    ((3, 2), (2, 1), (1, 0), False, True, 5, (5, 5)),
    ((2, 2), (2, 2), 0, False, True, None, (7, 9)),  # DenseNet's transition
    ((3, 3), 1, 1, False, False, None, (5, 5)),  # Inception's pool branch
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", AVG_CORE, ids=_ids)
def test_avg_pool2d_layouts(config, layout):
    torch.manual_seed(1)
    dtype = DTYPES[(AVG_CORE.index(config) + LAYOUTS.index(layout)) % len(DTYPES)]
    x = _make((N, C) + config[-1], layout, dtype)
    _check_avg_pool2d(x, *config[:-1], grad_layout=layout)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("config", AVG_CORE[:3], ids=_ids)
def test_avg_pool2d_reduced_precision(config, dtype):
    torch.manual_seed(2)
    kernel, stride, padding, ceil_mode, count_include_pad, divisor, hw = config
    args = (_pair(kernel), _pair(stride), _pair(padding), ceil_mode, count_include_pad, divisor)
    layout = "channels_last" if dtype == torch.float16 else "contiguous"
    x = _make((N, C) + hw, layout, dtype)
    actual = pool.avg_pool2d(x, *args)
    _reduced_close(actual, F.avg_pool2d(x.float(), *args), dtype)
    g = _make(actual.shape, layout, dtype)
    grad = pool.avg_pool2d_backward(g, x, *args)
    _reduced_close(grad, _avg_grad(args, x, g), dtype)
    _assert_layout(x, actual, grad)


def _avg_grad_by_definition(g, hw, kernel, stride, padding, count_include_pad, divisor):
    """avg_pool2d's input gradient from its definition, independent of any pooling kernel:
    each window (output element) adds its gradient / its divisor to the input elements it
    holds. g [N, C, OH, OW] -> [N, C, H, W] float64, on the CPU."""
    g = g.detach().to("cpu", torch.float64)
    (H, W), (KH, KW), (SH, SW), (PH, PW) = hw, kernel, stride, padding
    grad = torch.zeros(g.shape[:2] + (H, W), dtype=torch.float64)
    for oh in range(g.shape[2]):
        for ow in range(g.shape[3]):
            h0, w0 = oh * SH - PH, ow * SW - PW
            # The window in the padded input (a ceil-mode overhang past the padding is not
            # part of it) and its real elements.
            h1, w1 = min(h0 + KH, H + PH), min(w0 + KW, W + PW)
            hs, he, ws, we = max(h0, 0), min(h1, H), max(w0, 0), min(w1, W)
            if divisor is not None:
                d = divisor
            elif count_include_pad:
                d = (h1 - h0) * (w1 - w0)
            else:
                d = (he - hs) * (we - ws)
            grad[:, :, hs:he, ws:we] += g[:, :, oh:oh + 1, ow:ow + 1] / d
    return grad


# channels_last input with padding: where torch's CUDA backward is wrong (pytorch#188344),
# with ceil mode (windows overhanging the padding), both count_include_pad settings and
# divisor_override. (kernel, stride, padding, ceil_mode, count_include_pad, divisor, (H, W))
AVG_CL_PADDED = [
    ((2, 2), (1, 1), (1, 1), False, True, None, (4, 4)),   # the issue's own repro geometry
    ((3, 3), (2, 2), (1, 1), True, True, None, (6, 8)),
    ((3, 3), (2, 2), (1, 1), True, False, None, (7, 9)),
    ((3, 3), (1, 1), (1, 1), False, False, None, (5, 5)),
    ((3, 2), (2, 1), (1, 1), True, True, None, (7, 9)),
    ((4, 3), (3, 2), (2, 1), True, False, None, (7, 9)),
    ((3, 3), (2, 2), (1, 0), False, True, 3, (6, 8)),
    ((2, 2), (2, 2), (1, 1), True, False, 2, (5, 7)),
]


@pytest.mark.parametrize("layout", ["channels_last", "cl_strided"])
@pytest.mark.parametrize("config", AVG_CL_PADDED, ids=_ids)
def test_avg_pool2d_backward_channels_last_padded(config, layout):
    # float64, C=5 (channels are the fastest-moving index), against both the definition and
    # torch's CPU kernel on an NCHW copy; the gradient fed in comes in three layouts.
    kernel, stride, padding, ceil_mode, count_include_pad, divisor, hw = config
    args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    i = AVG_CL_PADDED.index(config)
    torch.manual_seed(10 + i)
    x = _make((2, 5) + hw, layout, torch.float64)
    out = pool.avg_pool2d(x, *args)
    torch.testing.assert_close(out, F.avg_pool2d(x.detach().cpu().contiguous(), *args).to(DEVICE))
    for grad_layout in ("contiguous", "channels_last", "strided"):
        g = _make(out.shape, grad_layout, torch.float64)
        grad = pool.avg_pool2d_backward(g, x, *args)
        expected = _avg_grad_by_definition(g, hw, kernel, stride, padding, count_include_pad,
                                           divisor)
        torch.testing.assert_close(grad.cpu(), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, _avg_grad(args, x, g), rtol=1e-12, atol=1e-12)
        _assert_layout(x, out, grad)


# ---------------------------------------------------------------------------
# adaptive_avg_pool2d

# (output size, input size): even bins, overlapping bins, single elements, repeated bins
# (output larger than the input), a mixture.
ADAPTIVE = [
    ((1, 1), (7, 9)),
    ((3, 5), (7, 9)),
    ((7, 9), (7, 9)),
    ((10, 10), (7, 9)),
    ((4, 9), (7, 9)),
    ((2, 3), (5, 5)),
    ((2, 7), (1, 5)),
]


def _check_adaptive(x, output_size, grad_layout="contiguous"):
    expected = F.adaptive_avg_pool2d(x, output_size)
    actual = pool.adaptive_avg_pool2d(x, output_size)
    assert actual.shape == expected.shape and actual.dtype == x.dtype
    torch.testing.assert_close(actual, expected)
    g = _make(expected.shape, grad_layout, x.dtype)
    grad = pool.adaptive_avg_pool2d_backward(g, x)
    torch.testing.assert_close(grad, _grad(lambda t: F.adaptive_avg_pool2d(t, output_size), x, g))
    _assert_layout(x, actual, grad)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ADAPTIVE, ids=_ids)
def test_adaptive_avg_pool2d(config, layout):
    output_size, hw = config
    torch.manual_seed(0)
    dtype = DTYPES[(ADAPTIVE.index(config) + LAYOUTS.index(layout)) % len(DTYPES)]
    x = _make((N, C) + hw, layout, dtype)
    _check_adaptive(x, output_size, grad_layout=LAYOUTS[(LAYOUTS.index(layout) + 1) % 5])


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("config", [ADAPTIVE[1], ADAPTIVE[3]], ids=_ids)
def test_adaptive_avg_pool2d_reduced_precision(config, dtype):
    output_size, hw = config
    torch.manual_seed(0)
    x = _make((N, C) + hw, "channels_last", dtype)
    actual = pool.adaptive_avg_pool2d(x, output_size)
    _reduced_close(actual, F.adaptive_avg_pool2d(x.float(), output_size), dtype)
    g = _make(actual.shape, "strided", dtype)
    grad = pool.adaptive_avg_pool2d_backward(g, x)
    _reduced_close(grad, _grad(lambda t: F.adaptive_avg_pool2d(t, output_size), x.float(),
                               g.float()), dtype)
    _assert_layout(x, actual, grad)


# ---------------------------------------------------------------------------
# Pooling: empty tensors, broadcast gradients, 64-bit offsets.

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pooling_empty(layout):
    x = _make((0, C, 7, 9), layout, torch.float32)
    out, idx = pool.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), True)
    assert out.shape == idx.shape == (0, C, 4, 5) and idx.dtype == torch.int64
    assert pool.max_pool2d_backward(out, x, idx, (3, 3), (2, 2), (1, 1), (1, 1)).shape == x.shape
    avg = pool.avg_pool2d(x, (3, 3), (2, 2), (1, 1), True, False, None)
    assert avg.shape == (0, C, 4, 5)
    assert pool.avg_pool2d_backward(avg, x, (3, 3), (2, 2), (1, 1), True, False, None).shape \
        == x.shape
    ada = pool.adaptive_avg_pool2d(x, (3, 5))
    assert ada.shape == (0, C, 3, 5)
    assert pool.adaptive_avg_pool2d_backward(ada, x).shape == x.shape
    # No channels, or an output of no rows: empty outputs, zero gradients.
    x = _make((N, 0, 7, 9), layout, torch.float32)
    assert pool.adaptive_avg_pool2d(x, (3, 5)).shape == (N, 0, 3, 5)
    x = _make((N, C, 7, 9), layout, torch.float32)
    ada = pool.adaptive_avg_pool2d(x, (0, 3))
    assert ada.shape == (N, C, 0, 3)
    assert torch.equal(pool.adaptive_avg_pool2d_backward(ada, x), torch.zeros_like(x))


def test_pooling_expanded_grad_output():
    # out.sum().backward() hands the backward ops a stride-0 gradient.
    torch.manual_seed(5)
    x = _make((N, C, 7, 9), "channels_last", torch.float64)
    args = ((3, 3), (2, 2), (1, 1), (1, 1), True)
    out, idx = pool.max_pool2d(x, *args)
    g = torch.ones((), dtype=x.dtype, device=DEVICE).expand(out.shape)
    torch.testing.assert_close(pool.max_pool2d_backward(g, x, idx, *args[:4]),
                               _grad(lambda t: F.max_pool2d(t, *args), x, g))
    avg_args = args[:3] + (True, False, None)
    g = torch.ones((), dtype=x.dtype, device=DEVICE).expand(F.avg_pool2d(x, *avg_args).shape)
    torch.testing.assert_close(pool.avg_pool2d_backward(g, x, *avg_args),
                               _avg_grad(avg_args, x, g))


def test_several_programs(monkeypatch):
    # The other cases fit one block; small blocks make them span several programs, so block
    # boundaries and the tail mask are exercised too.
    monkeypatch.setattr(pool, "_MAX_BLOCK", 64)
    monkeypatch.setattr(pool, "_MAX_BLOCK_INTERPRETED", 64)
    monkeypatch.setattr(elementwise, "_MAX_BLOCK", 128)
    monkeypatch.setattr(elementwise, "_MAX_BLOCK_INTERPRETED", 128)
    torch.manual_seed(9)
    x = _make((N, 3, 7, 9), "channels_last", torch.float32)
    _check_max_pool2d(x, (3, 3), 1, 1, 1, False, grad_layout="contiguous")
    _check_avg_pool2d(x, (3, 2), (2, 1), (1, 0), True, True, None, grad_layout="strided")
    _check_adaptive(x, (4, 9), grad_layout="transposed")
    _check_add_relu(x, _make((N, 3, 7, 9), "strided", torch.float32))


def test_int64_offsets(monkeypatch):
    # Tensors past 2^31 elements do not fit here; lowering the threshold runs the 64-bit
    # offset variants of every kernel on small ones.
    monkeypatch.setattr(_common, "_INT32_LIMIT", 0)
    torch.manual_seed(6)
    x = _make((N, C, 7, 9), "channels_last", torch.float32)
    _check_max_pool2d(x, (3, 2), (2, 1), (1, 0), 2, True, grad_layout="strided")
    _check_avg_pool2d(x, (3, 3), 2, 1, True, False, None, grad_layout="strided")
    _check_adaptive(x, (3, 5), grad_layout="strided")
    y = _make((N, C, 7, 9), "strided", torch.float32)
    torch.testing.assert_close(elementwise.add_relu(x, y), F.relu(x + y))


# ---------------------------------------------------------------------------
# add_relu and its backward

def _check_add_relu(a, b, exact=True):
    expected = F.relu(a + b)
    actual = elementwise.add_relu(a, b)
    assert actual.shape == expected.shape and actual.dtype == a.dtype
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        _reduced_close(actual, F.relu(a.float() + b.float()), a.dtype)
    # The gradient through the ReLU, from torch.autograd on the same output.
    g = torch.randn_like(expected)
    expected_grad = _grad(lambda t: F.relu(t + b), a, g)
    grad = elementwise.add_relu_backward(g, actual)
    if exact:
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    else:  # the mask may differ where a rounded sum sits at 0
        assert torch.equal(grad, torch.where(actual > 0, g, 0))
    _assert_layout(a, actual)
    _assert_layout(actual, grad)


@pytest.mark.parametrize("dtype", DTYPES + REDUCED, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_relu(layout, dtype):
    torch.manual_seed(7)
    shape = (N, 3, 5, 7)
    a = _make(shape, layout, dtype)
    exact = dtype in DTYPES or (dtype == torch.float16 and DEVICE == "cpu")
    # The other operand in the same layout, in another one, and broadcast (stride 0).
    for b in (_make(shape, layout, dtype), _make(shape, "channels_last", dtype),
              _make((1, 3, 1, 1), "contiguous", dtype).expand(shape)):
        _check_add_relu(a, b, exact)
        _check_add_relu(b, a, exact)


@pytest.mark.parametrize("shapes", [((3, 5), (3, 5)), ((5,), (3, 1)), ((2, 3, 2, 2, 3), None)],
                         ids=["2d", "broadcast-2d", "5d"])
def test_add_relu_other_ranks(shapes):
    torch.manual_seed(8)
    a_shape, b_shape = shapes
    a = torch.randn(a_shape, device=DEVICE)
    b = torch.randn(b_shape or a_shape, device=DEVICE)
    if b_shape is None:  # a 5-D view whose leading dimensions do not merge
        b = b.transpose(0, 1).contiguous().transpose(0, 1)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    _check_add_relu(a.expand(shape), b.expand(shape))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_add_relu_special_values(layout):
    # NaN propagates and passes its gradient (torch's threshold_backward), a sum of exactly 0 or
    # -0.0 gives a zero gradient, inf - inf is NaN; an inf gradient stays inf, not NaN.
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([nan, 1.0, -1.0, inf, -inf, inf, 0.0, -0.0, 2.5, -2.5, nan, 0.5],
                          dtype=torch.float64)
    others = torch.tensor([1.0, nan, 1.0, -1.0, 1.0, -inf, 0.0, 0.0, -2.5, 2.5, -nan, -0.5],
                          dtype=torch.float64)
    shape = (1, 3, 2, 2)
    a = _make(shape, layout, torch.float64, values=values.reshape(shape))
    b = _make(shape, layout, torch.float64, values=others.reshape(shape))
    expected = F.relu(a + b)
    actual = elementwise.add_relu(a, b)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    real = ~expected.isnan()  # (a NaN's sign is not specified)
    assert torch.equal(torch.signbit(actual[real]), torch.signbit(expected[real]))
    g = torch.full(shape, inf, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(elementwise.add_relu_backward(g, actual),
                               _grad(lambda t: F.relu(t + b), a, g), rtol=0, atol=0)


def test_add_relu_empty():
    for layout in ("contiguous", "channels_last"):
        a = _make((0, 3, 5, 7), layout, torch.float32)
        out = elementwise.add_relu(a, a)
        assert out.shape == a.shape
        assert elementwise.add_relu_backward(out, out).shape == a.shape

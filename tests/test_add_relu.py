"""add_relu and cnnops.nn.AddReLU on every backend, against torch.relu(torch.add(input, other)).

Forward values, gradients w.r.t. both operands (torch.autograd.grad), broadcasting and type
promotion as torch.add, special values, empty batches and, on the compiled backends, the output
and gradient layout. The GPU entries (`cuda`, `triton-cuda`) run their own grid of
test_add_relu_matches_torch, float16/bfloat16 included (conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF
import cnnops.nn as cnn
from conftest import (DTYPES, GPU_DTYPES, LAYOUTS, assert_close, axis, const,
                      expected_memory_format, grads, grid, make_input, on_gpu, per_device)

ERRORS = (ValueError, TypeError, RuntimeError)
N, C, H, W = 2, 3, 5, 7


def _reference(input, other):
    return F.relu(torch.add(input, other))


def _assert_layout(backend, x, *outputs):
    if backend != "reference":
        fmt = expected_memory_format(x)
        for t in outputs:
            assert t.is_contiguous(memory_format=fmt), (t.shape, t.stride(), fmt)


def _check(backend, input, other, layout_of=None, equal_nan=False):
    """Compares add_relu with torch: output and the gradient of every operand that needs one.

    layout_of: the operand whose layout the output and its gradient must follow (None: no check).
    """
    expected = _reference(input, other)
    actual = CF.add_relu(input, other)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert_close(actual, expected, equal_nan=equal_nan)
    wrt = [t for t in (input, other) if t.requires_grad]
    assert actual.requires_grad == bool(wrt)
    grad_actual = []
    if wrt:
        g = torch.randn_like(expected)
        grad_actual, grad_expected = grads(actual, wrt, g), grads(expected, wrt, g)
        for t, a, e in zip(wrt, grad_actual, grad_expected):
            assert a.shape == t.shape and a.dtype == t.dtype
            assert_close(a, e)
    if layout_of is not None:
        operand_grads = dict(zip(map(id, wrt), grad_actual))
        _assert_layout(backend, layout_of, actual,
                       *([operand_grads[id(layout_of)]] if id(layout_of) in operand_grads else []))


# other's shape for input [N, C, H, W]: same, per-channel 4-D, per-channel 3-D, 0-dim.
OTHER_SHAPES = {"same": (N, C, H, W), "1C11": (1, C, 1, 1), "C11": (C, 1, 1), "0d": ()}


# The GPU grid: (input shape, other shape)
GPU_SHAPES = [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 33, 4, 5), (33, 1, 1)), ((7,), (7,)),
              ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6)), ((1001,), (1,))]


@per_device(cpu=grid(axis("other_shape", list(OTHER_SHAPES)), axis("layout", LAYOUTS),
                     axis("dtype", DTYPES, str), const(shapes=None)),
            gpu=grid(axis("dtype", GPU_DTYPES, str), axis("layout", LAYOUTS),
                     axis("shapes", GPU_SHAPES,
                          ["same", "broadcast-channel", "1d", "5d", "odd-length"]),
                     const(other_shape=None)))
def test_add_relu_matches_torch(backend, other_shape, layout, dtype, shapes):
    """CPU grid: input [N, C, H, W], other of OTHER_SHAPES[other_shape]; GPU grid: shapes."""
    if backend.gpu:
        torch.manual_seed(12)
        a_shape, b_shape = shapes
        a = backend.make(a_shape, dtype, layout if len(a_shape) == 4 or layout == "strided"
                         else "contiguous", grad=True)
        b = backend.make(b_shape, dtype, grad=True)
        out = backend.run_pair(lambda a, b: CF.add_relu(a, b), lambda a, b: a + b, [a, b],
                               dtype, relu=True, names=["input", "other"])
        assert out.is_contiguous(memory_format=expected_memory_format(a))
        return
    torch.manual_seed(0)
    x = make_input((N, C, H, W), layout, dtype, requires_grad=True)
    shape = OTHER_SHAPES[other_shape]
    other = make_input(shape, layout if len(shape) == 4 and shape[0] == N else "contiguous", dtype,
                       requires_grad=True)
    _check(backend, x, other, layout_of=x)


# (input dtype, other dtype, other shape): promotion as torch.add; a 0-dim tensor does not
# promote within its category; an integer operand takes the floating dtype.
MIXED = [
    (torch.float32, torch.float64, "same"),
    (torch.float64, torch.float32, "same"),
    (torch.float32, torch.float64, "1C11"),
    (torch.float64, torch.float32, "C11"),
    (torch.float32, torch.float64, "0d"),
    (torch.float32, torch.int64, "C11"),
    (torch.float64, torch.int32, "same"),
]


def _mixed_id(case):
    return "%s+%s-%s" % (str(case[0]).split(".")[-1], str(case[1]).split(".")[-1], case[2])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MIXED, ids=_mixed_id)
def test_add_relu_mixed_dtypes(backend, case, layout):
    input_dtype, other_dtype, other_shape = case
    torch.manual_seed(0)
    x = make_input((N, C, H, W), layout, input_dtype, requires_grad=True)
    shape = OTHER_SHAPES[other_shape]
    if other_dtype.is_floating_point:
        other = make_input(shape, "contiguous", other_dtype, requires_grad=True)
    else:
        other = torch.randint(-2, 3, shape, dtype=other_dtype)
    assert CF.add_relu(x, other).dtype == torch.result_type(x, other)
    _check(backend, x, other, layout_of=x)


# (input, other): an integer or bool tensor meets a 0-dim floating tensor, which then decides
# the dtype (its own, not the default dtype).
@pytest.mark.parametrize("case", [
    pytest.param((torch.int64, (N, C, H, W), torch.float32, ()), id="int64+0d-float32"),
    pytest.param((torch.int64, (N, C, H, W), torch.float64, ()), id="int64+0d-float64"),
    pytest.param((torch.bool, (N, C, H, W), torch.float64, ()), id="bool+0d-float64"),
    pytest.param((torch.float64, (), torch.int32, (N, C, H, W)), id="0d-float64+int32"),
])
def test_add_relu_zero_dim_float_with_integer_tensor(backend, case):
    torch.manual_seed(0)
    make = lambda dtype, shape: (torch.randn(shape, dtype=dtype).requires_grad_()
                                 if dtype.is_floating_point else
                                 torch.randint(-2, 3, shape).to(dtype))
    x, other = make(*case[:2]), make(*case[2:])
    _check(backend, x, other)


# (input shape, other shape): the input broadcast too, and operands of other ranks.
BROADCAST_BOTH = [
    ((1, C, 1, 1), (N, C, H, W)),
    ((N, 1, H, W), (1, C, 1, 1)),
    ((C, 1, 1), (N, C, H, W)),
    ((N, C, 1, W), (N, 1, H, 1)),
    ((5,), (3, 1)),
    ((3, 5), (3, 5)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", BROADCAST_BOTH, ids=lambda s: "%s+%s" % s)
def test_add_relu_broadcasts_both_operands(backend, shapes, dtype):
    torch.manual_seed(0)
    x = make_input(shapes[0], "contiguous", dtype, requires_grad=True)
    other = make_input(shapes[1], "contiguous", dtype, requires_grad=True)
    _check(backend, x, other)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)],
                         ids=["input-only", "other-only", "none"])
def test_add_relu_partial_gradients(backend, needs):
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, requires_grad=needs[0])
    bias = torch.randn(C, 1, 1, requires_grad=needs[1])
    _check(backend, x, bias, layout_of=x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_relu_special_values(backend, layout):
    # NaN propagates (its gradient passes, as torch's threshold_backward does); a sum of exactly 0
    # gives 0 with a zero gradient; inf - inf is NaN; -0.0 stays finite.
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([nan, 1.0, -1.0, inf, -inf, inf, 0.0, -0.0, 2.5, -2.5, nan, 0.5],
                          dtype=torch.float64)
    others = torch.tensor([1.0, nan, 1.0, -1.0, 1.0, -inf, 0.0, 0.0, -2.5, 2.5, -nan, -0.5],
                          dtype=torch.float64)
    shape = (1, 3, 2, 2)

    def lay(t):
        t = t.reshape(shape)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            wide = torch.zeros(shape[:-1] + (4,), dtype=t.dtype)
            wide[..., ::2] = t
            t = wide[..., ::2]
        return t.requires_grad_()

    x, other = lay(values), lay(others)
    _check(backend, x, other, layout_of=x, equal_nan=True)


@on_gpu()
def test_add_relu_keeps_nan_and_passes_its_gradient(backend):
    device = backend.device
    a = torch.tensor([float("nan"), -1.0, 0.0, 2.0, -0.0], device=device, requires_grad=True)
    b = torch.zeros(5, device=device)
    out = CF.add_relu(a, b)
    exp = torch.tensor([float("nan"), 0.0, 0.0, 2.0, 0.0], device=device)
    torch.testing.assert_close(out, exp, equal_nan=True)
    (g,) = torch.autograd.grad(out, a, torch.ones(5, device=device))
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], device=device))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_add_relu_empty_batch(backend, layout):
    x = make_input((0, C, H, W), layout, requires_grad=True)
    bias = torch.randn(1, C, 1, 1, requires_grad=True)
    actual = CF.add_relu(x, bias)
    assert actual.shape == (0, C, H, W)
    gx, gb = grads(actual, (x, bias), torch.zeros_like(actual))
    assert gx.shape == x.shape
    assert torch.equal(gb, torch.zeros_like(bias))


def test_add_relu_many_elements():
    # More elements than one parallel chunk of the cpu kernels (at::internal::GRAIN_SIZE = 32768),
    # so the work is split between threads.
    torch.manual_seed(0)
    x = make_input((1, 4, 96, 90), "channels_last", torch.float32, requires_grad=True)
    other = make_input((1, 4, 96, 90), "channels_last", torch.float32, requires_grad=True)
    with cnnops.use_backend("cpu"):
        _check("cpu", x, other, layout_of=x)


@pytest.mark.parametrize("shapes", [((N, C, H, W), (N, C, H, 3)), ((N, C, H, W), (2, 1, 1)),
                                    ((3,), (4,))], ids=lambda s: "%s+%s" % s)
def test_add_relu_rejects_what_torch_rejects(backend, shapes):
    x, other = torch.randn(shapes[0]), torch.randn(shapes[1])
    with pytest.raises(RuntimeError):
        _reference(x, other)
    with pytest.raises(ERRORS):
        CF.add_relu(x, other)


# ---------------------------------------------------------------------------
# AddReLU: no torch.nn twin; its unfused equivalent is relu(input + other).

def test_add_relu_module_is_stateless():
    module = cnn.AddReLU()
    assert isinstance(module, nn.Module)
    assert repr(module) == "AddReLU()"
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.state_dict() == {}
    module.load_state_dict({})
    # An unfused block's ReLU has no state either: checkpoints carry nothing for this module.
    assert module.state_dict().keys() == nn.ReLU().state_dict().keys()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("other_shape", ["same", "1C11"])
def test_add_relu_module_matches_torch(backend, other_shape, layout):
    torch.manual_seed(0)
    module = cnn.AddReLU()
    x = make_input((N, C, H, W), layout, torch.float64, requires_grad=True)
    other = make_input(OTHER_SHAPES[other_shape], "contiguous", torch.float64, requires_grad=True)
    for mode in (module.train, module.eval):
        mode()
        actual, expected = module(x, other), _reference(x, other)
        assert_close(actual, expected)
        g = torch.randn_like(expected)
        actual_grads, expected_grads = grads(actual, (x, other), g), grads(expected, (x, other), g)
        for a, e in zip(actual_grads, expected_grads):
            assert_close(a, e)
        _assert_layout(backend, x, actual, actual_grads[0])


def test_add_relu_module_runs_on_cnnops():
    # The cpu backend refuses float16 where torch.relu(a + b) would not: an error shows the
    # module goes through cnnops and honours the backend setting.
    from cnnops import _ext
    assert _ext.LOADED
    half = torch.randn(1, 2, 3, 3, dtype=torch.float16)
    with cnnops.use_backend("cpu"), pytest.raises(RuntimeError, match="float16"):
        cnn.AddReLU()(half, half)

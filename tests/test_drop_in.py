"""Calls that torch.nn.functional answers, answered the same way; and double backward refused.

* Unbatched input: torch's convolution and pooling (functions and modules) take [C, H, W] as a
  batch of one and drop the batch dimension from the result.
* Geometry beyond the kernels' int32 range that changes nothing: a stride past the last window
  start (the output is 1 wide) and the dilation of a one-tap kernel. torch returns an answer
  for these; so must cnnops. Padding that would make an output of 2**31 rows stays an error
  (torch fails to allocate it).
* create_graph=True through a cnnops op gives correct first derivatives; differentiating them
  again raises an error that names the op instead of silently dropping the op's contribution
  (the `reference` backend, plain PyTorch, computes second derivatives).
"""
import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import CONV_BACKENDS, CPU_CORES, assert_close, conv_cores, make_input, no_conv


def _compare(ours, theirs, inputs):
    """ours(*inputs) against theirs(*inputs) on separate leaves: values, shapes, gradients."""
    mine = [t.detach().clone().requires_grad_() for t in inputs]
    ref = [t.detach().clone().requires_grad_() for t in inputs]
    out, exp = ours(*mine), theirs(*ref)
    assert out.shape == exp.shape
    assert_close(out, exp)
    g = torch.randn_like(exp)
    for a, b in zip(torch.autograd.grad(out, mine, g), torch.autograd.grad(exp, ref, g)):
        assert_close(a, b)


# ---------------------------------------------------------------------------
# unbatched input [C, H, W]

UNBATCHED = [
    ("conv2d", lambda x, w: CF.conv2d(x, w, None, 1, 1), lambda x, w: F.conv2d(x, w, None, 1, 1)),
    ("conv2d-same", lambda x, w: CF.conv2d(x, w, padding="same", dilation=2),
     lambda x, w: F.conv2d(x, w, padding="same", dilation=2)),
    ("conv2d_relu", lambda x, w: CF.conv2d_relu(x, w, None, 2, 1),
     lambda x, w: F.relu(F.conv2d(x, w, None, 2, 1))),
    ("max_pool2d", lambda x, w: CF.max_pool2d(x, 3, 2, 1, ceil_mode=True),
     lambda x, w: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
    ("avg_pool2d", lambda x, w: CF.avg_pool2d(x, 3, 2, 1, True, False),
     lambda x, w: F.avg_pool2d(x, 3, 2, 1, True, False)),
    ("adaptive_avg_pool2d", lambda x, w: CF.adaptive_avg_pool2d(x, (3, 2)),
     lambda x, w: F.adaptive_avg_pool2d(x, (3, 2))),
]


def _cases(cases, ids=None):
    """pytest.params of `cases` (id: the first field, or from `ids`); those that run no
    convolution marked no_conv, so that they run on one cpu core."""
    ids = ids or [c[0] for c in cases]
    return [pytest.param(*c, id=i, marks=() if i.startswith("conv") else no_conv)
            for c, i in zip(cases, ids)]


@conv_cores
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name, ours, theirs", _cases(UNBATCHED))
def test_functional_takes_unbatched_input(backend, name, ours, theirs, layout):
    torch.manual_seed(0)
    x = make_input((1, 3, 9, 8), layout).squeeze(0)  # [C, H, W]
    w = torch.randn(4, 3, 3, 3)
    out = ours(x, w)
    assert out.dim() == 3
    _compare(lambda x: ours(x, w), lambda x: theirs(x, w), [x])


@conv_cores
def test_unbatched_conv2d_relu_takes_an_unbatched_residual(backend):
    torch.manual_seed(1)
    x, w, r = torch.randn(3, 7, 7), torch.randn(5, 3, 3, 3), torch.randn(5, 7, 7)
    _compare(lambda x, r: CF.conv2d_relu(x, w, None, 1, 1, residual=r),
             lambda x, r: F.relu(F.conv2d(x, w, None, 1, 1) + r), [x, r])


def test_unbatched_max_pool2d_returns_unbatched_indices(backend):
    x = torch.randn(3, 8, 7)
    out, idx = CF.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx) and idx.shape == (3, 4, 3)


MODULES = [
    (lambda: torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), cnnops.nn.Conv2d),
    (lambda: torch.nn.Conv2d(3, 6, 3, stride=2, groups=3, bias=True), cnnops.nn.Conv2d),
    (lambda: torch.nn.MaxPool2d(3, 2, 1), cnnops.nn.MaxPool2d),
    (lambda: torch.nn.AvgPool2d(2, ceil_mode=True), cnnops.nn.AvgPool2d),
    (lambda: torch.nn.AdaptiveAvgPool2d((2, 3)), cnnops.nn.AdaptiveAvgPool2d),
]


@conv_cores
@pytest.mark.parametrize("make_torch, cls", _cases(
    MODULES, ids=["conv-reflect", "conv-groups", "maxpool", "avgpool", "adaptive"]))
def test_modules_take_unbatched_input(backend, make_torch, cls):
    torch.manual_seed(2)
    theirs = make_torch()
    ours = cls.__new__(cls)
    ours.__dict__.update(theirs.__dict__)  # the same module, with cnnops' forward
    _compare(ours, theirs, [torch.randn(3, 9, 9)])


def test_batch_norm_still_needs_a_batch(backend):
    """BatchNorm2d and FusedConvBNReLU raise on 3-D input, as torch.nn.BatchNorm2d does."""
    with pytest.raises(ValueError, match=r"expected input to be 4-D \[N, C, H, W\], got 3-D"):
        CF.conv_bn_relu(torch.randn(3, 6, 6), torch.randn(4, 3, 3, 3), None, None, None,
                        None, None, training=True)
    with pytest.raises(ValueError, match="4D"):
        cnnops.nn.BatchNorm2d(3)(torch.randn(3, 6, 6))


# ---------------------------------------------------------------------------
# geometry beyond int32 that changes nothing

HUGE = [
    ("stride-2**62", (1, 1), dict(stride=2 ** 62)),
    ("stride-2**62-one-dim", (3, 3), dict(stride=(2 ** 62, 1), padding=1)),
    ("stride-2**40-padded", (1, 1), dict(stride=2 ** 40, padding=3)),
    ("stride-2**31", (3, 2), dict(stride=2 ** 31, padding=(1, 0))),
    ("dilation-2**62-one-tap", (1, 1), dict(dilation=2 ** 62)),
    ("dilation-2**62-one-tap-wide", (1, 3), dict(dilation=(2 ** 62, 1), padding=(0, 1))),
]


@conv_cores
@pytest.mark.parametrize("kernel, kw", [c[1:] for c in HUGE], ids=[c[0] for c in HUGE])
def test_conv2d_answers_where_torch_answers(backend, kernel, kw):
    torch.manual_seed(3)
    x, w = torch.randn(2, 3, 5, 4), torch.randn(4, 3, *kernel)
    _compare(lambda x, w: CF.conv2d(x, w, **kw), lambda x, w: F.conv2d(x, w, **kw), [x, w])
    _compare(lambda x, w: CF.conv2d_relu(x, w, **kw), lambda x, w: F.relu(F.conv2d(x, w, **kw)),
             [x, w])
    rm, rv = torch.zeros(4), torch.ones(4)
    _compare(lambda x, w: CF.conv_bn_relu(x, w, None, None, None, rm, rv, training=False, **kw),
             lambda x, w: F.relu(F.batch_norm(F.conv2d(x, w, **kw), rm, rv)), [x, w])


def test_conv2d_padding_past_int32_is_a_clear_error(backend):
    x, w = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"expected padding <= 2\*\*31 - 1, got \(1099511627776"):
        CF.conv2d(x, w, padding=2 ** 40)


# ---------------------------------------------------------------------------
# double backward

C = 4


def _bn_args():
    return torch.zeros(C), torch.ones(C)


DOUBLE = [
    ("conv2d", lambda x, w: CF.conv2d(x, w, None, 1, 1)),
    ("conv2d_relu", lambda x, w: CF.conv2d_relu(x, w, None, 1, 1)),
    ("conv_bn_relu", lambda x, w: CF.conv_bn_relu(x, w, None, None, None, *_bn_args(),
                                                  padding=1, training=True)),
    ("batch_norm", lambda x, w: CF.batch_norm(x, *_bn_args(), training=True) * w.sum()),
    ("bn_relu", lambda x, w: CF.bn_relu(x, *_bn_args(), None, None, training=True) * w.sum()),
    ("max_pool2d", lambda x, w: CF.max_pool2d(x, 2) * w.sum()),
    ("avg_pool2d", lambda x, w: CF.avg_pool2d(x, 2) * w.sum()),
    ("adaptive_avg_pool2d", lambda x, w: CF.adaptive_avg_pool2d(x, 3) * w.sum()),
    ("add_relu", lambda x, w: CF.add_relu(x, x * w.sum())),
]


@conv_cores
@pytest.mark.parametrize("name, fn", _cases(DOUBLE))
def test_double_backward_raises_naming_the_op(backend, name, fn):
    torch.manual_seed(4)
    x = torch.randn(2, C, 6, 6, requires_grad=True)
    w = torch.randn(C, C, 3, 3, requires_grad=True)
    # first derivatives under create_graph=True are still right
    (gx,) = torch.autograd.grad(fn(x, w).square().sum(), x, create_graph=True)
    with cnnops.use_backend("reference"):
        (expected,) = torch.autograd.grad(fn(x, w).square().sum(), x)
    assert_close(gx, expected)
    if backend == "reference":  # plain PyTorch: second derivatives exist
        torch.autograd.grad(gx.square().sum(), w)
        return
    with pytest.raises(RuntimeError, match=r"cnnops::%s: double backward" % name):
        torch.autograd.grad(gx.square().sum(), w)
    with pytest.raises(RuntimeError, match=r"cnnops::%s: double backward" % name):
        torch.autograd.grad(fn(x, w).square().sum(), x, create_graph=True)[0].sum().backward()


# The compiled ops' Autograd kernels (csrc/autograd.cpp): the reference backend is plain
# PyTorch, which has forward-mode AD.
COMPILED_CONV_BACKENDS = [b for b in CONV_BACKENDS if b in CPU_CORES]


@pytest.mark.parametrize("backend", COMPILED_CONV_BACKENDS, indirect=True)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name, fn", _cases(DOUBLE))
def test_forward_mode_ad_raises(backend, name, fn, grad_mode):
    """A forward-mode tangent is refused, never silently dropped: also under torch.no_grad,
    where the compiled ops skip their autograd node for plain tensors."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(5)
    x, w = torch.randn(2, C, 6, 6), torch.randn(C, C, 3, 3)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            fn(dual, w)

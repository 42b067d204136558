"""float16 / bfloat16 inputs and torch.autocast, on the backends that take them on CPU tensors.

The cpu backend takes bfloat16 (its convolutions on the oneDNN core, the other ops on
float32 copies) but not float16 (test_backends checks that it says so); the reference
backend takes any dtype and the triton backend runs half types in Triton's interpreter.
Expected values come from torch in float32 on the same (rounded) inputs, and outputs must
keep the input's dtype while BatchNorm statistics stay float32. (tests/test_cpu_conv_core.py
holds the cpu backend's bfloat16 to torch's own bfloat16 accuracy.)
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF
from conftest import CPU_BACKENDS

HALF = [torch.float16, torch.bfloat16]
TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
# (backend, dtype) pairs that run: every CPU backend in both, but the cpu backend bfloat16 only.
BACKEND_DTYPES = [pytest.param(b, d, id="%s-%s" % (b, str(d)[len("torch."):]))
                  for b in CPU_BACKENDS for d in HALF if (b, d) != ("cpu", torch.float16)]
with_dtypes = pytest.mark.parametrize("half_backend, dtype", BACKEND_DTYPES,
                                      indirect=["half_backend"])


@pytest.fixture(params=CPU_BACKENDS)
def half_backend(request):
    with cnnops.use_backend(request.param):
        yield request.param


def _close(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def _close_grad(actual, expected, dtype):
    """Gradients in half precision: a value rounded to the other side of 0 flips a ReLU
    decision now and then, so a few elements may differ; the rest must match."""
    assert actual.dtype in (dtype, torch.float32)
    scale = max(expected.abs().max().item(), 1e-2)  # exact zeros (a bias before BN) stay ~0
    tol = 3 * TOL[dtype]["atol"] * scale + 3 * TOL[dtype]["rtol"] * expected.abs()
    within = ((actual.float() - expected).abs() <= tol).float().mean().item()
    assert within >= 0.97, "only %.1f%% of the gradient matches" % (100 * within)


def _leaf(t):
    return t.detach().requires_grad_()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@with_dtypes
def test_conv_bn_relu_half(half_backend, dtype, training, layout):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 4, 7, 6).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(6, 4, 3, 3) * 0.3).to(dtype).requires_grad_()
    r = torch.randn(2, 6, 7, 6).to(dtype).requires_grad_()
    # Mixed precision, as in torch: BN parameters and statistics in float32.
    bw, bb = (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6).requires_grad_()
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()

    out = CF.conv_bn_relu(x, w, None, bw, bb, rm, rv, 1, 1, training=training, residual=r)
    x32, w32, r32, bw32, bb32 = (_leaf(t.float()) for t in (x, w, r, bw, bb))
    ref = F.relu(F.batch_norm(F.conv2d(x32, w32, None, 1, 1), rm_ref, rv_ref, bw32, bb32,
                              training) + r32)
    _close(out, ref, dtype)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-2, atol=1e-2)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w, r, bw, bb), g.to(dtype))
    want = torch.autograd.grad(ref, (x32, w32, r32, bw32, bb32), g)
    for a, e, t in zip(got, want, (x, w, r, bw, bb)):
        assert a.dtype == t.dtype
        _close_grad(a, e, dtype)


@with_dtypes
def test_conv2d_bn_relu_pool_add_half(half_backend, dtype):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8).to(dtype).requires_grad_()
    w = (torch.randn(4, 3, 3, 3) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(4).to(dtype)  # its gradient through training BN is 0: nothing to compare
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)

    def cnn(x, w, b, bw, bb, functional):
        y = functional.conv2d(x, w, b, 2, 1)
        if functional is F:
            y = F.relu(F.batch_norm(y, None, None, bw, bb, True))
        else:
            y = CF.bn_relu(y, None, None, bw, bb, True)
        m = functional.max_pool2d(y, 2, 1, ceil_mode=True)
        a = functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
        s = F.relu(m + a[..., :3, :3]) if functional is F else CF.add_relu(m, a[..., :3, :3])
        return functional.adaptive_avg_pool2d(s, (2, 3))

    out = cnn(x, w, b, bw, bb, CF)
    x32, w32 = (_leaf(t.float()) for t in (x, w))
    ref = cnn(x32, w32, b.float(), bw, bb, F)
    _close(out, ref, dtype)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w), g.to(dtype))
    want = torch.autograd.grad(ref, (x32, w32), g)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        _close_grad(a, e, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_matches_torch(half_backend, training):
    """Under torch.autocast the fused block casts as torch's conv does: conv in bfloat16, BN
    parameters and running statistics in float32, output bfloat16; gradients of the float32
    parameters come back float32."""
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                          nn.ReLU()).train(training)
    with torch.no_grad():
        plain[1].running_mean.normal_()
        plain[1].running_var.uniform_(0.5, 1.5)
    twin = copy.deepcopy(plain)
    fused = cnnops.FusedConvBNReLU.from_modules(twin[0], twin[1]).train(training)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = plain(x), fused(x)
    _close(out, ref, torch.bfloat16)
    torch.testing.assert_close(fused.bn.running_mean, plain[1].running_mean, rtol=2e-2, atol=2e-2)
    ref.float().square().sum().backward()
    out.float().square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32, name
        _close_grad(p.grad, q.grad, torch.bfloat16)

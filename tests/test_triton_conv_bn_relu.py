"""The conv-bias gradient of the Triton conv_bn_relu (cnnops_triton::conv_bn_relu_backward).

Under training-mode BatchNorm that gradient is zero: it is the per-channel sum of BN's
input gradient, which sums to zero. It used to be summed from that gradient after rounding
to the input dtype, which in bfloat16 leaves noise of order 0.05 (the first GPU run's
failing test_gpu.py::test_conv_bn_relu[triton-...-bfloat16-...-train-conv-bias], now
test_conv_bn_relu.py::test_conv_bn_relu_matches_torch[triton-cuda-...]); it is
now formed from BN's float32 sums. In eval mode it is k * sum(g') (k = BN's scale), which
the float32/float64 cases check tightly. Triton's interpreter runs the half types on CPU
tensors, so the bfloat16 case runs here as it does on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import cnnops  # noqa: E402
import cnnops.functional as CF  # noqa: E402
from conftest import CPU_BACKENDS, make_input  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in CPU_BACKENDS,
                                reason="the triton backend cannot run here")

# The GPU run's failing geometry: C3-OC8-k3-s1-p1-d1-g1 on 9x10 images, batch 3.
N, C, OC, H, W = 3, 3, 8, 9, 10


def _tensors(dtype, layout, param_dtype):
    torch.manual_seed(7)
    x = make_input((N, C, H, W), layout, dtype=dtype, requires_grad=True)
    w = (torch.randn(OC, C, 3, 3) / 27 ** 0.5).to(dtype).requires_grad_()
    cb = torch.randn(OC).to(dtype).requires_grad_()
    bw = (torch.rand(OC) + 0.5).to(param_dtype).requires_grad_()
    bb = torch.randn(OC).to(param_dtype).requires_grad_()
    rm, rv = (torch.randn(OC) * 0.1).to(param_dtype), (torch.rand(OC) + 0.5).to(param_dtype)
    return x, w, cb, bw, bb, rm, rv


def _grads(x, w, cb, bw, bb, rm, rv, training, g, ours):
    """(output, conv-bias gradient) of relu(batch_norm(conv2d(x, w, cb))) for the output
    gradient g: cnnops' triton backend (ours) or torch in float32/float64 on the same values."""
    if ours:
        with cnnops.use_backend("triton"):
            out = CF.conv_bn_relu(x, w, cb, bw, bb, rm.clone(), rv.clone(), 1, 1,
                                  training=training)
        return out, torch.autograd.grad(out, cb, g.to(out.dtype))[0]
    ref = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, w, cb, bw, bb = (t.detach().to(ref).requires_grad_() for t in (x, w, cb, bw, bb))
    out = F.relu(F.batch_norm(F.conv2d(x, w, cb, 1, 1), rm.to(ref), rv.to(ref), bw, bb,
                              training))
    return out, torch.autograd.grad(out, cb, g.to(ref))[0]


@pytest.mark.parametrize("param_dtype", ["same", "float32"], ids=["params-same", "params-fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_train_conv_bias_gradient_is_zero(dtype, layout, param_dtype):
    pdt = dtype if param_dtype == "same" else torch.float32
    tensors = _tensors(dtype, layout, pdt)
    g = torch.randn(N, OC, H, W)
    out, gcb = _grads(*tensors, True, g, ours=True)
    ref_out, ref_gcb = _grads(*tensors, True, g, ours=False)
    assert gcb.dtype == dtype
    # torch in float32 gives rounding noise (~1e-6); the gradient of a half-rounded grad_x
    # summed over 270 positions was ~5e-2.
    assert ref_gcb.abs().max() < 1e-4
    assert gcb.float().abs().max() < 1e-3, gcb
    # The rest of the block is right too (loosely: half precision).
    torch.testing.assert_close(out.float(), ref_out, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bias_gradient_matches_torch(dtype, training, layout):
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    tensors = _tensors(dtype, layout, pdt)
    g = torch.randn(N, OC, H, W, dtype=torch.float64)
    _, gcb = _grads(*tensors, training, g, ours=True)
    _, ref_gcb = _grads(*tensors, training, g, ours=False)
    assert gcb.dtype == dtype
    # Eval: k * sum(g'), nonzero (k = bn_weight * invstd); train: zero up to rounding.
    tol = {torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    scale = max(1.0, ref_gcb.abs().max().item())
    torch.testing.assert_close(gcb.to(ref_gcb.dtype), ref_gcb, rtol=tol, atol=tol * scale)
    if not training:
        assert ref_gcb.abs().max() > 1.0  # a real gradient, not zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bias_gradients_have_the_input_dtype(dtype):
    # The op schema (csrc/cnnops.cpp): a conv bias gradient has the input's dtype, which the
    # conv bias has; summed in float32 and rounded once.
    torch.manual_seed(3)
    ops = torch.ops.cnnops_triton
    x = torch.randn(N, C, H, W).to(dtype)
    w = torch.randn(OC, C, 3, 3).to(dtype)
    go = torch.randn(N, OC, H, W).to(dtype)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    _, _, gb = ops.conv2d_backward(go, x, w, *geo, [False, False, True])
    assert gb.dtype == dtype
    torch.testing.assert_close(gb.float(), go.float().sum((0, 2, 3)).to(dtype).float())
    sdt = torch.float32 if dtype != torch.float64 else dtype
    mean, invstd = torch.randn(OC, dtype=sdt), torch.rand(OC, dtype=sdt) + 0.5
    y = torch.randn(N, OC, H, W).to(dtype)
    for training in (True, False):
        grads = ops.conv_bn_relu_backward(go, y, x, w, torch.zeros(OC, dtype=dtype), y, None,
                                          mean, invstd, *geo, training, True,
                                          [False, False, True, False, False, False])
        assert grads[2].dtype == dtype and grads[2].shape == (OC,)

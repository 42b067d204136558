"""batch_norm and bn_relu against torch.nn.functional, with running statistics."""
import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import DTYPES, LAYOUTS, assert_close, expected_memory_format, grads, make_input


def _stats(C, dtype):
    return torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["bn", "bn-relu", "bn-add-relu", "bn-add"])
def test_bn_relu_matches_torch(backend, relu, residual, training, affine, layout, dtype):
    torch.manual_seed(0)
    N, C, H, W = 3, 4, 5, 6
    x = make_input((N, C, H, W), layout, dtype, requires_grad=True, scale=2.0)
    w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    r = make_input((N, C, H, W), layout, dtype, requires_grad=True) if residual else None
    rm, rv = _stats(C, dtype)
    rm2, rv2 = rm.clone(), rv.clone()

    expected = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if residual:
        expected = expected + r
    if relu:
        expected = F.relu(expected)
    if relu or residual:
        actual = CF.bn_relu(x, rm2, rv2, w, b, training, 0.1, 1e-5, relu=relu, residual=r)
    else:
        actual = CF.batch_norm(x, rm2, rv2, w, b, training, 0.1, 1e-5)
    assert_close(actual, expected)
    if backend != "reference":
        assert actual.is_contiguous(memory_format=expected_memory_format(x))
    assert_close(rm2, rm)
    assert_close(rv2, rv)

    g = torch.randn_like(expected)
    for a, e in zip(grads(actual, (x, w, b, r), g), grads(expected, (x, w, b, r), g)):
        assert_close(a, e)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_channels_last_many_rows(backend, training):
    """channels_last over several NHWC row blocks (297 positions, the last block partial) and
    an odd channel count, with a large mean, against float64: values, statistics, layout and
    every gradient."""
    torch.manual_seed(0)
    N, C, H, W = 3, 37, 9, 11
    x = (make_input((N, C, H, W), "channels_last", scale=2.0) + 50.0).requires_grad_()
    r = make_input((N, C, H, W), "channels_last", requires_grad=True)
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C, requires_grad=True)
    rm, rv = torch.randn(C) + 50.0, torch.rand(C) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    actual = CF.bn_relu(x, rm2, rv2, w, b, training, 0.1, 1e-5, relu=True, residual=r)
    rm64, rv64 = rm.double(), rv.double()
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    expected = F.relu(F.batch_norm(leaves[0], rm64, rv64, leaves[1], leaves[2], training,
                                   0.1, 1e-5) + leaves[3])
    assert_close(actual, expected.float())
    if backend != "reference":
        assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close(rm2, rm64.float())
    assert_close(rv2, rv64.float())
    g = torch.randn_like(expected)
    for a, e in zip(grads(actual, (x, w, b, r), g.float()), grads(expected, leaves, g)):
        assert_close(a, e.float(), rtol=1e-4, atol=2e-4)


def test_batch_norm_without_running_stats(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    actual = CF.batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x, None, None, training=True)
    assert_close(actual, expected)
    g = torch.randn_like(x)
    assert_close(grads(actual, (x,), g)[0], grads(expected, (x,), g)[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_large_mean_is_stable(backend, layout):
    # E[x^2] - E[x]^2 in float32 would lose every digit of this variance.
    # (256 positions: two NHWC row blocks, merged.)
    torch.manual_seed(0)
    x = make_input((4, 2, 8, 8), layout) * 0.01 + 1000.0
    rm, rv = torch.zeros(2), torch.ones(2)
    CF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact = x.double().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(rm.double(), exact.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), exact.var(1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["m0.1", "m0.5", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_batchnorm2d_module_steps(backend, momentum, track, affine):
    """Three training steps then eval: outputs, gradients and every buffer as torch.nn."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track, affine=affine)
    mod = cnnops.nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track, affine=affine)
    mod.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(4, 5, 6, 7) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mod(xa), ref(xb)
        assert_close(ya, yb)
        g = torch.randn_like(yb)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad)
        if affine:
            assert_close(mod.weight.grad, ref.weight.grad)
            assert_close(mod.bias.grad, ref.bias.grad)
    for (ka, va), (kb, vb) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert ka == kb
        assert_close(va, vb) if va.is_floating_point() else torch.testing.assert_close(va, vb)
    mod.eval()
    ref.eval()
    x = torch.randn(2, 5, 3, 3)
    assert_close(mod(x), ref(x))


def test_batch_norm_empty_batch(backend):
    ref = torch.nn.BatchNorm2d(3)
    mod = cnnops.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = mod(x)
    ref(torch.randn(0, 3, 4, 4))
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(mod.weight.grad, torch.zeros(3))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.state_dict()[key], value)


def test_batch_norm_single_value_per_channel_raises(backend):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        CF.batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True)


@pytest.mark.parametrize("count", [0, 1, 2, 150])
@pytest.mark.parametrize("buffers", ["both", "mean-only", "var-only", "strided", "float16"])
def test_update_running_stats_op(backend, buffers, count):
    """The running statistics update each backend runs after a training forward (one kernel on
    the compiled backends) against the formula: running = (1 - m) * running + m * batch, the
    variance recovered from save_invstd and made unbiased; count == 0 changes nothing."""
    from cnnops import backends, reference

    torch.manual_seed(12)
    C, momentum, eps = 6, 0.3, 1e-3
    save_mean, save_invstd = torch.randn(C), torch.rand(C) + 0.5
    dtype = torch.float16 if buffers == "float16" else torch.float32
    width = 2 if buffers == "strided" else 1
    rm = (torch.randn(C * width) * 0.1).to(dtype)[::width]
    rv = (torch.rand(C * width) + 0.5).to(dtype)[::width]
    rm = None if buffers == "var-only" else rm
    rv = None if buffers == "mean-only" else rv
    expected = [t.clone() if t is not None else None for t in (rm, rv)]
    reference.update_running_stats(*expected, save_mean, save_invstd, count, momentum, eps)
    impl = backends.implementation(save_mean)
    impl.update_running_stats(rm, rv, save_mean, save_invstd, count, momentum, eps)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
    for got, want in zip((rm, rv), expected):
        if want is not None:
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_synchronised_bn_phase_ops(backend, relu, affine, layout, dtype):
    """The phase ops of a synchronised BN (cnnops.distributed) on one process's batch, where
    they must give the training-mode BN of torch: batch_norm_stats is the biased var_mean;
    inference-mode bn_relu with it, the output; bn_relu_backward_elemt with the batch's
    gradient means, the input and residual gradients."""
    from cnnops import backends

    torch.manual_seed(3)
    N, C, H, W = 3, 4, 5, 6
    x = make_input((N, C, H, W), layout, dtype, requires_grad=True, scale=2.0)
    w = (torch.rand(C, dtype=dtype) + 0.5) if affine else None
    b = torch.randn(C, dtype=dtype) if affine else None
    r = make_input((N, C, H, W), layout, dtype, requires_grad=True)
    g = torch.randn(N, C, H, W, dtype=dtype)
    expected = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5) + r
    expected = F.relu(expected) if relu else expected
    gx, gr = torch.autograd.grad(expected, (x, r), g)
    x, r = x.detach(), r.detach()

    impl = backends.implementation(x)
    mean, var = impl.batch_norm_stats(x)
    want_var, want_mean = torch.var_mean(x, (0, 2, 3), correction=0)
    assert_close(mean, want_mean)
    assert_close(var, want_var)
    out, save_mean, save_invstd = impl.bn_relu(x, w, b, mean, var, r, False, 1e-5, relu)
    assert_close(out, expected)
    assert out.is_contiguous(memory_format=expected_memory_format(x)) or backend == "reference"

    gy = torch.where(out > 0, g, 0) if relu else g
    xhat = (x - save_mean[:, None, None]) * save_invstd[:, None, None]
    mean_dy, mean_dy_xhat = gy.mean((0, 2, 3)), (gy * xhat).mean((0, 2, 3))
    grad_input, grad_residual = impl.bn_relu_backward_elemt(
        g, out, x, w, save_mean, save_invstd, mean_dy, mean_dy_xhat, relu, [True, True])
    assert_close(grad_input, gx)
    assert_close(grad_residual, gr)

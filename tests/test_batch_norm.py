"""batch_norm and bn_relu against torch.nn.functional, with running statistics: the CPU entries
on the CPU grids, the GPU entries (`cuda`, `triton-cuda`) on the GPU grids, float16/bfloat16
included, with float32 BN tensors too (conftest.py)."""
import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import (DTYPES, GPU_BN_CASES, GPU_DEVICE, HALF, LAYOUTS, assert_close, axis,
                      bn_case_id, const, expected_memory_format, gpu_bn_tensors, grad_names,
                      grads, grid, grids, make, make_input, needs_cuda, on_gpu, per_device,
                      ref_dtype, to_ref)


def _stats(C, dtype):
    return torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5


# The GPU grids of batch_norm (5 shapes) and of bn_relu (one shape, every relu / residual).
BN_SHAPES = [(4, 6, 5, 7), (2, 40, 3, 3), (64, 3, 2, 3), (1, 5, 33, 31), (3, 70, 1, 2)]
GPU_BN_GRID = grid(axis("shape", BN_SHAPES, lambda s: "x".join(map(str, s))),
                   axis("dtype,mixed", GPU_BN_CASES, bn_case_id), axis("layout", LAYOUTS),
                   axis("training", [True, False], ["train", "eval"]),
                   axis("affine", [True, False], ["affine", "no-affine"]),
                   const(relu=False, residual=False, op="batch_norm"))
GPU_BN_RELU_GRID = grid(axis("dtype,mixed", GPU_BN_CASES, bn_case_id), axis("layout", LAYOUTS),
                        axis("training", [True, False], ["train", "eval"]),
                        axis("residual", [True, False], ["residual", "no-residual"]),
                        axis("relu", [True, False], ["relu", "no-relu"]),
                        const(affine=True, shape=(3, 36, 6, 5), op="bn_relu"))


def _gpu_bn_inputs(backend, op, shape, dtype, mixed, layout, affine, residual):
    """The GPU grids' input, BN tensors (float32 with a half input when `mixed`), residual
    and momentum."""
    if op == "batch_norm":
        torch.manual_seed(4)
        x = backend.make(shape, dtype, layout, grad=True, scale=2.0, offset=0.5)
        w, b, rm, rv = gpu_bn_tensors(shape[1], dtype, affine, mixed, device=backend.device)
        return x, w, b, None, rm, rv, 0.3
    torch.manual_seed(5)
    x = backend.make(shape, dtype, layout, grad=True)
    r = backend.make(shape, dtype, layout, grad=True) if residual else None
    w, b, rm, rv = gpu_bn_tensors(shape[1], dtype, affine, mixed, device=backend.device)
    return x, w, b, r, rm, rv, 0.1


@per_device(
    cpu=grid(axis("relu,residual,op", [(False, False, "batch_norm"), (True, False, "bn_relu"),
                                       (True, True, "bn_relu"), (False, True, "bn_relu")],
                  ["bn", "bn-relu", "bn-add-relu", "bn-add"]),
             axis("training", [True, False], ["train", "eval"]),
             axis("affine", [True, False], ["affine", "noaffine"]), axis("layout", LAYOUTS),
             axis("dtype", DTYPES, str), const(mixed=False, shape=(3, 4, 5, 6))),
    gpu=grids(GPU_BN_GRID, GPU_BN_RELU_GRID))
def test_bn_relu_matches_torch(backend, relu, residual, op, training, affine, layout, dtype,
                               mixed, shape):
    """op: batch_norm, or bn_relu with relu and residual."""
    if backend.gpu:
        x, w, b, r, rm, rv, momentum = _gpu_bn_inputs(backend, op, shape, dtype, mixed, layout,
                                                      affine, residual)
        rm_ref, rv_ref = to_ref(rm, ref_dtype(rm.dtype)), to_ref(rv, ref_dtype(rv.dtype))
    else:
        torch.manual_seed(0)
        N, C, H, W = shape
        x = make_input((N, C, H, W), layout, dtype, requires_grad=True, scale=2.0)
        w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_() if affine else None
        b = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
        r = make_input((N, C, H, W), layout, dtype, requires_grad=True) if residual else None
        rm_ref, rv_ref = _stats(C, dtype)
        rm, rv = rm_ref.clone(), rv_ref.clone()
        momentum = 0.1

    def ours(x, w, b, r):
        if op == "batch_norm":
            return CF.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
        return CF.bn_relu(x, rm, rv, w, b, training, momentum, 1e-5, relu=relu, residual=r)

    def reference(x, w, b, r):
        y = F.batch_norm(x, rm_ref, rv_ref, w, b, training, momentum, 1e-5)
        return y + r if r is not None else y

    actual = backend.run_pair(ours, reference, [x, w, b, r], dtype, relu=relu,
                              names=grad_names(input=x, weight=w, bias=b, residual=r))
    assert actual.dtype == dtype
    if backend != "reference":
        assert actual.is_contiguous(memory_format=expected_memory_format(x))
    backend.check(rm, rm_ref, dtype, "running_mean")
    backend.check(rv, rv_ref, dtype, "running_var")


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


@per_device(cpu=grid(axis("layout", ["contiguous", "channels_last"]),
                     axis("side", [8, 2], ["8x8", "2x2"])),
            gpu=grid(axis("layout", ["contiguous", "channels_last"]), axis("side", [8], str)))
def test_batch_norm_large_mean_is_stable(backend, layout, side):
    """E[x^2] - E[x]^2 in float32 would lose every digit of these variances; a Welford / Chan
    reduction and normalising as (x - mean) * invstd keep them. Float32 against float64 on the
    same values. CPU grid: mean 1000, standard deviation 0.01 over 256 positions (two NHWC row
    blocks, merged), or over 16 images of 2x2 (NCHW: a channel's small planes as one set);
    GPU grid: mean 100, standard deviation 0.1, the output compared too."""
    if not backend.gpu:
        torch.manual_seed(0)
        x = make_input((4 * (8 // side) ** 2, 2, side, side), layout) * 0.01 + 1000.0
        rm, rv = torch.zeros(2), torch.ones(2)
        CF.batch_norm(x, rm, rv, training=True, momentum=1.0)
        exact = x.double().transpose(0, 1).reshape(2, -1)
        torch.testing.assert_close(rm.double(), exact.mean(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(rv.double(), exact.var(1), rtol=1e-3, atol=0)
        return
    torch.manual_seed(6)
    x = backend.make((16, 8, 12, 12), torch.float32, layout, scale=0.1, offset=100.0)
    rm, rv = torch.zeros(8, device=x.device), torch.ones(8, device=x.device)
    rm64, rv64 = rm.double(), rv.double()
    out = CF.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    exp = F.batch_norm(x.double(), rm64, rv64, None, None, True, 1.0, 1e-5)
    torch.testing.assert_close(out.double(), exp, rtol=0, atol=2e-3)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-6, atol=0)


@on_gpu(axis("spread", [1.0, 1e-4], ["spread1", "spread1e-4"]))
def test_batch_norm_input_gradient_with_two_values_per_channel(backend, spread):
    """Training BN over two values per channel (N=2, H=W=1): the input gradient is what is left
    after terms of size w*invstd*|gy| (up to 1/sqrt(eps)) nearly cancel. cnnops must be about as
    accurate as torch's own float32 kernel, measured against float64. (The cuda backend once
    scaled each term before they cancelled, and was off by ~2e-3.)"""
    torch.manual_seed(7)
    C = 4096
    x = backend.make((2, C, 1, 1), torch.float32, scale=spread)
    g = backend.make((2, C, 1, 1), torch.float32)
    w = backend.make((C,), torch.float32, positive=True)

    def grad_input(fn, x, w):
        x = x.detach().clone().requires_grad_()
        return torch.autograd.grad(fn(x, None, None, w, None, True), x, g.to(x.dtype))[0]

    truth = grad_input(F.batch_norm, x.double(), w.double())
    floor = 1e-3 * truth.abs().max()

    def error(got):  # the worst elementwise error, relative to the element (or 1e-3 of the max)
        return ((got.double() - truth).abs() / (truth.abs() + floor)).max().item()

    ours, torchs = error(grad_input(CF.batch_norm, x, w)), error(grad_input(F.batch_norm, x, w))
    assert ours <= 2 * torchs + 2e-6, (ours, torchs)


@needs_cuda
@on_gpu(axis("dtype", HALF, str), backend=False)
def test_bn_parameter_gradients_are_float32_for_half_inputs(cuda_ops, dtype):
    """As aten's batch norm: the BN weight/bias gradients of a half input are float32 (the
    statistics dtype). Their sums over N*H*W values would overflow float16 otherwise: here
    grad_bias = 2 * 64 * 32 * 32 = 131072 > 65504. A conv bias gradient stays in the input's
    dtype, as aten's convolution's."""
    x = make((64, 4, 32, 32), dtype)
    g = torch.full_like(x, 2.0)
    w = torch.ones(4, device=GPU_DEVICE)
    mean, invstd = torch.zeros(4, device=GPU_DEVICE), torch.ones(4, device=GPU_DEVICE)
    _, gw, gb = cuda_ops.batch_norm_backward(g, x, w, mean, invstd, False, [False, True, True])
    assert gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(gb, torch.full((4,), 131072.0, device=GPU_DEVICE))

    cw = make((4, 4, 1, 1), dtype)
    cb = torch.zeros(4, device=GPU_DEVICE, dtype=dtype)
    out, conv_out, mean, invstd = cuda_ops.conv_bn_relu(
        x, cw, cb, w, None, mean, torch.ones(4, device=GPU_DEVICE), None, [1, 1], [0, 0], [1, 1],
        1, False, 1e-5, False)
    grads = cuda_ops.conv_bn_relu_backward(
        torch.full_like(out, 2.0), out, x, cw, cb, conv_out, w, mean, invstd, [1, 1], [0, 0],
        [1, 1], 1, False, False, [False, False, False, True, True, False])
    assert grads[3].dtype == grads[4].dtype == torch.float32
    torch.testing.assert_close(grads[4], torch.full((4,), 131072.0, device=GPU_DEVICE))


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


@per_device(cpu=grid(axis("relu", [True, False], ["relu", "norelu"]),
                     axis("affine", [True, False], ["affine", "noaffine"]),
                     axis("layout", LAYOUTS), axis("dtype", DTYPES, str), const(mixed=False)),
            gpu=grid(axis("dtype,mixed", GPU_BN_CASES, bn_case_id), axis("layout", LAYOUTS),
                     axis("relu", [True, False], ["relu", "no-relu"]), const(affine=True)))
def test_synchronised_bn_phase_ops(backend, relu, affine, layout, dtype, mixed):
    """The phase ops of a synchronised BN (cnnops.distributed) on one process's batch, where
    they must give the training-mode BN of torch: batch_norm_stats is the biased var_mean;
    inference-mode bn_relu with it, the output; bn_relu_backward_elemt with the batch's
    gradient means, the input and residual gradients. (tests/test_distributed.py runs them
    across processes.) Expected gradients: through torch's ReLU mask on the CPU entries,
    through our output's on the GPU entries (see conftest.run_pair)."""
    from cnnops import backends

    if backend.gpu:  # float32 BN tensors with a half input when `mixed`
        torch.manual_seed(6)
        shape = (3, 36, 6, 5)
        x = backend.make(shape, dtype, layout, scale=2.0, offset=0.5)
        r = backend.make(shape, dtype, layout)
        g = backend.make(shape, dtype)
        w, b, _, _ = gpu_bn_tensors(shape[1], dtype, affine, mixed, grad=False,
                                    device=backend.device)
    else:
        torch.manual_seed(3)
        shape = N, C, H, W = 3, 4, 5, 6
        x = make_input(shape, layout, dtype, scale=2.0)
        w = (torch.rand(C, dtype=dtype) + 0.5) if affine else None
        b = torch.randn(C, dtype=dtype) if affine else None
        r = make_input(shape, layout, dtype)
        g = torch.randn(shape, dtype=dtype)
    # torch's BN on leaves holding the same values: in the reference dtype on the GPU entries
    ref = ref_dtype(dtype) if backend.gpu else dtype
    xr, rr = (to_ref(x, ref), to_ref(r, ref)) if backend.gpu else (x.detach(), r.detach())
    xr, rr = xr.requires_grad_(), rr.requires_grad_()
    before_relu = F.batch_norm(xr, None, None, to_ref(w, ref), to_ref(b, ref), True) + rr

    impl = backends.implementation(x)
    mean, var = impl.batch_norm_stats(x)
    want_var, want_mean = torch.var_mean(xr.detach(), (0, 2, 3), correction=0)
    backend.check(mean, want_mean, dtype, "mean")
    backend.check(var, want_var, dtype, "variance")
    out, save_mean, save_invstd = impl.bn_relu(x, mean, var, w, b, r, False, 1e-5, relu)
    backend.check(out, F.relu(before_relu) if relu else before_relu, dtype)
    assert out.is_contiguous(memory_format=expected_memory_format(x)) or backend == "reference"

    ones = torch.ones_like(before_relu)
    mask = ((out if backend.gpu else before_relu).detach() > 0).to(ref) if relu else ones
    want_gx, want_gres = torch.autograd.grad(before_relu * mask, (xr, rr), g.to(ref))
    gy = g.to(ref) * ((out.detach() > 0).to(ref) if relu else ones)
    xhat = (xr.detach() - save_mean.to(ref)[:, None, None]) * save_invstd.to(ref)[:, None, None]
    stat = save_mean.dtype
    grad_input, grad_residual = impl.bn_relu_backward_elemt(
        g, out, x, w, save_mean, save_invstd, gy.mean((0, 2, 3)).to(stat),
        (gy * xhat).mean((0, 2, 3)).to(stat), relu, [True, True])
    backend.check(grad_input, want_gx, dtype, "grad of input")
    backend.check(grad_residual, want_gres, dtype, "grad of residual")
    if backend.gpu:
        assert grad_input.is_contiguous(memory_format=expected_memory_format(x))

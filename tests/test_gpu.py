"""Every op on the GPU backends (`cuda`, `triton`) against torch.nn.functional on CUDA.

Each test is marked `cuda` and skips without a CUDA device; a backend that cannot run here
(CUDA kernels not built, Triton missing) skips too. All calls go through the public API
(cnnops.functional, cnnops.fuse) inside ``cnnops.use_backend(name)``, except the tests that
target the C++ ops of the `cuda` backend (torch.ops.cnnops: opcheck, the AutocastCUDA kernels,
argument errors).

Comparisons: float64 and float32 against torch in the same dtype (TF32 off for cuDNN and
cuBLAS while comparing); float16 and bfloat16 against torch in float32 on the same (rounded)
inputs, with tolerances for the rounding of intermediate results (a few elements may land on
the other side of a ReLU), except max pooling, which is exact and is compared with torch in
the same dtype, indices included. Layouts: contiguous, channels_last and strided (sliced)
inputs; outputs must follow the layout rule (channels_last in, channels_last out).

Dry run: ``CNNOPS_GPU_TESTS_ON_CPU=1 pytest tests/test_gpu.py`` runs this harness against the
`cpu` backend on CPU tensors (float32/float64 only; CUDA-only tests skip), to check the tests
themselves on a machine without a GPU.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from cnnops import _ext

DRY_RUN = os.environ.get("CNNOPS_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
GPU_BACKENDS = ["cpu"] if DRY_RUN else ["cuda", "triton"]
DTYPES = [torch.float32, torch.float64] + ([] if DRY_RUN else [torch.float16, torch.bfloat16])
HALF = (torch.float16, torch.bfloat16)
LAYOUTS = ["contiguous", "channels_last", "strided"]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (DRY_RUN or torch.cuda.is_available()), reason="needs a CUDA device"),
]

needs_cuda = pytest.mark.skipif(DRY_RUN, reason="CUDA-only behaviour (dry run on the CPU)")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    """Runs the test with cnnops set to each GPU backend that can run here."""
    name = request.param
    if name not in cnnops.available_backends():
        pytest.skip("cnnops backend %r is not available here" % name)
    with cnnops.use_backend(name):
        yield name


@pytest.fixture
def cuda_ops():
    """The C++ CUDA kernels (torch.ops.cnnops on CUDA tensors), for op-level tests."""
    if "cuda" not in cnnops.available_backends() and not DRY_RUN:
        pytest.skip("the cuda backend (cnnops._C built with CUDA) is not available here")
    if DRY_RUN and not _ext.LOADED:
        pytest.skip("cnnops._C is not loaded")
    return torch.ops.cnnops


@pytest.fixture(autouse=True)
def full_fp32():
    """cuDNN and cuBLAS in full float32 while comparing: TF32 rounding (10-bit mantissa)
    would dominate every float32 difference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------
# inputs and comparisons

def make(shape, dtype=torch.float32, layout="contiguous", grad=False, scale=1.0, offset=0.0,
         positive=False):
    """A random tensor on DEVICE in the given layout, drawn on the CPU in float32 (so a test
    sees the same values on every device) and rounded to `dtype`.

    strided: a non-contiguous view (every other column of a wider tensor).
    """
    shape = tuple(shape)
    t = (torch.rand(shape) + 0.5) if positive else torch.randn(shape) * scale + offset
    t = t.to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype, device=DEVICE)
        wide[..., ::2] = t
        t = wide[..., ::2]
    elif layout != "contiguous":
        raise ValueError(layout)
    return t.requires_grad_(grad)


def ref_dtype(dtype):
    """The dtype torch computes the expected values in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_ref(t, dtype):
    """A separate leaf (never sharing memory with t) holding t's values in `dtype`; anything
    else is returned as is."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(dtype, copy=True).requires_grad_(t.requires_grad)


def expected_format(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# (rtol, atol) per dtype; atol is scaled by the largest expected magnitude (>= 1).
TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-4),
              torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
# Half types: the L2 error of the whole tensor relative to its norm, and the share of elements
# allowed outside the elementwise tolerance.
REL_L2 = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
MAX_BAD_FRACTION = 0.01


def check(actual, expected, dtype, what="output"):
    """actual (computed in `dtype`) against expected (computed in ref_dtype(dtype))."""
    assert actual is not None and expected is not None, what
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    a = actual.detach().to(expected.dtype)
    e = expected.detach()
    if e.numel() == 0:
        return
    rtol, atol = TOLERANCES[dtype]
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


def run_pair(ours, reference, inputs, dtype, relu=False, grad_format=None, names=None):
    """Runs ours(*inputs) and reference(*ref_inputs), ref_inputs being separate leaves with the
    same values in the reference dtype; compares the outputs and, with the same output
    gradient, the gradients of every input that requires grad. -> (output, expected)

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
        g = torch.randn(tuple(exp.shape)).to(device=DEVICE, dtype=out.dtype)
        g = g.contiguous(memory_format=grad_format or expected_format(out))
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(exp_for_grad, ref_leaves, g.to(exp.dtype))
        names = names or ["input %d" % i for i in range(len(leaves))]
        for name, a, b in zip(names, got, want):
            check(a, b, dtype, "grad of " + name)
    return out, exp


def grad_names(**tensors):
    """The names of the tensors that require grad, in argument order."""
    return [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]


# ---------------------------------------------------------------------------
# convolution

# (in_channels, out_channels, kernel, stride, padding, dilation, groups, H, W)
CONV_CONFIGS = [
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


def _conv_id(c):
    return "C%s-OC%s-k%s-s%s-p%s-d%s-g%s-%sx%s" % c


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_tensors(config, dtype, layout, bias, N=3, grad=True):
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = _pair(k)
    x = make((N, C, H, W), dtype, layout, grad=grad)
    w = make((OC, C // groups, kh, kw), dtype, grad=grad,
             scale=1.0 / math.sqrt(C // groups * kh * kw))
    b = make((OC,), dtype, grad=grad) if bias else None
    return x, w, b, (stride, padding, dilation, groups)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=_conv_id)
def test_conv2d(gpu_backend, config, dtype, layout, bias):
    torch.manual_seed(0)
    x, w, b, args = _conv_tensors(config, dtype, layout, bias)
    out, _ = run_pair(lambda x, w, b: CF.conv2d(x, w, b, *args),
                      lambda x, w, b: F.conv2d(x, w, b, *args), [x, w, b], dtype,
                      names=grad_names(input=x, weight=w, bias=b))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv2d_gradient_in_another_layout(gpu_backend, layout, grad_layout):
    """The output gradient may arrive in a layout other than the output's."""
    torch.manual_seed(1)
    x, w, b, args = _conv_tensors(CONV_CONFIGS[1], torch.float32, layout, True)
    fmt = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    run_pair(lambda x, w, b: CF.conv2d(x, w, b, *args), lambda x, w, b: F.conv2d(x, w, b, *args),
             [x, w, b], torch.float32, grad_format=fmt)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONV_CONFIGS[:4] + CONV_CONFIGS[6:8], ids=_conv_id)
def test_conv2d_relu(gpu_backend, config, dtype, layout, residual):
    torch.manual_seed(2)
    x, w, b, args = _conv_tensors(config, dtype, layout, True)
    shape = F.conv2d(x.detach().float(), w.detach().float(), None, *args).shape
    r = make(shape, dtype, layout, grad=True) if residual else None

    def ours(x, w, b, r):
        return CF.conv2d_relu(x, w, b, *args, residual=r)

    def reference(x, w, b, r):
        y = F.conv2d(x, w, b, *args)
        return y + r if r is not None else y

    out, _ = run_pair(ours, reference, [x, w, b, r], dtype, relu=True,
                      names=grad_names(input=x, weight=w, bias=b, residual=r))
    assert out.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [d for d in (torch.float32, torch.bfloat16) if d in DTYPES],
                         ids=str)
def test_conv2d_large_batch(gpu_backend, layout, dtype):
    """100 images of 64x64x64: the weight gradient sums 409600 positions (split across blocks
    and, in the Triton kernel, across fixed chunks): the splits must not show."""
    torch.manual_seed(3)
    N = 8 if DRY_RUN else 100
    x = make((N, 64, 64, 64), dtype, layout, grad=True)
    w = make((64, 64, 3, 3), dtype, grad=True, scale=1 / 24)
    b = make((64,), dtype, grad=True)
    run_pair(lambda x, w, b: CF.conv2d(x, w, b, 1, 1), lambda x, w, b: F.conv2d(x, w, b, 1, 1),
             [x, w, b], dtype, names=["input", "weight", "bias"])


# ---------------------------------------------------------------------------
# batch normalisation

BN_SHAPES = [(4, 6, 5, 7), (2, 40, 3, 3), (64, 3, 2, 3), (1, 5, 33, 31), (3, 70, 1, 2)]


def _bn_tensors(C, dtype, affine, mixed, grad=True):
    """BN weight/bias/running statistics: float32 with a half input when `mixed`."""
    pdt = torch.float32 if mixed else dtype
    w = make((C,), pdt, positive=True, grad=grad) if affine else None
    b = make((C,), pdt, grad=grad) if affine else None
    rm = make((C,), pdt, scale=0.1)
    rv = make((C,), pdt, positive=True)
    return w, b, rm, rv


def _mixed_params(dtype):
    return [False, True] if dtype in HALF else [False]


BN_CASES = [(d, m) for d in DTYPES for m in _mixed_params(d)]


def _bn_case_id(case):
    return str(case[0]) + ("-fp32-params" if case[1] else "")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_case_id)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm(gpu_backend, shape, case, layout, training, affine):
    dtype, mixed = case
    torch.manual_seed(4)
    x = make(shape, dtype, layout, grad=True, scale=2.0, offset=0.5)
    w, b, rm, rv = _bn_tensors(shape[1], dtype, affine, mixed)
    rm_ref, rv_ref = to_ref(rm, ref_dtype(rm.dtype)), to_ref(rv, ref_dtype(rv.dtype))
    momentum = 0.3
    out, _ = run_pair(
        lambda x, w, b: CF.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5),
        lambda x, w, b: F.batch_norm(x, rm_ref, rv_ref, w, b, training, momentum, 1e-5),
        [x, w, b], dtype, names=grad_names(input=x, weight=w, bias=b))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x))
    check(rm, rm_ref, dtype, "running_mean")
    check(rv, rv_ref, dtype, "running_var")


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_case_id)
def test_bn_relu(gpu_backend, case, layout, training, residual, relu):
    dtype, mixed = case
    torch.manual_seed(5)
    shape = (3, 36, 6, 5)
    x = make(shape, dtype, layout, grad=True)
    r = make(shape, dtype, layout, grad=True) if residual else None
    w, b, rm, rv = _bn_tensors(shape[1], dtype, True, mixed)
    rm_ref, rv_ref = to_ref(rm, ref_dtype(rm.dtype)), to_ref(rv, ref_dtype(rv.dtype))

    def ours(x, w, b, r):
        return CF.bn_relu(x, rm, rv, w, b, training, 0.1, 1e-5, relu=relu, residual=r)

    def reference(x, w, b, r):
        y = F.batch_norm(x, rm_ref, rv_ref, w, b, training, 0.1, 1e-5)
        return y + r if r is not None else y

    out, _ = run_pair(ours, reference, [x, w, b, r], dtype, relu=relu,
                      names=grad_names(input=x, weight=w, bias=b, residual=r))
    assert out.is_contiguous(memory_format=expected_format(x))
    check(rm, rm_ref, dtype, "running_mean")
    check(rv, rv_ref, dtype, "running_var")


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_case_id)
def test_synchronised_bn_phase_ops(gpu_backend, case, layout, relu):
    """The phase ops of a synchronised BN (cnnops.distributed) on one process's batch, where
    they give torch's training-mode BN: batch_norm_stats (the biased var_mean), inference-mode
    bn_relu with those statistics, bn_relu_backward_elemt with the batch's gradient means.
    (tests/test_distributed.py runs them across processes.)"""
    from cnnops import backends

    dtype, mixed = case
    torch.manual_seed(6)
    shape = (3, 36, 6, 5)
    x = make(shape, dtype, layout, scale=2.0, offset=0.5)
    r = make(shape, dtype, layout)
    g = make(shape, dtype)
    w, b, _, _ = _bn_tensors(shape[1], dtype, True, mixed, grad=False)
    ref = ref_dtype(dtype)
    xr, rr = to_ref(x, ref).requires_grad_(), to_ref(r, ref).requires_grad_()
    before_relu = F.batch_norm(xr, None, None, w.to(ref), b.to(ref), True) + rr
    impl = backends.implementation(x)

    mean, var = impl.batch_norm_stats(x)
    want_var, want_mean = torch.var_mean(xr.detach(), (0, 2, 3), correction=0)
    check(mean, want_mean, dtype, "mean")
    check(var, want_var, dtype, "variance")
    out, save_mean, save_invstd = impl.bn_relu(x, w, b, mean, var, r, False, 1e-5, relu)
    check(out, F.relu(before_relu) if relu else before_relu, dtype)
    assert out.is_contiguous(memory_format=expected_format(x))

    # Gradients through our output's ReLU mask (see run_pair), from the batch's means.
    mask = (out.detach() > 0).to(ref) if relu else torch.ones_like(before_relu)
    gr = g.to(ref)
    want_gx, want_gres = torch.autograd.grad(before_relu * mask, (xr, rr), gr)
    gy = gr * mask
    xhat = (xr.detach() - save_mean.to(ref)[:, None, None]) * save_invstd.to(ref)[:, None, None]
    stat = save_mean.dtype
    grad_input, grad_residual = impl.bn_relu_backward_elemt(
        g, out, x, w, save_mean, save_invstd, gy.mean((0, 2, 3)).to(stat),
        (gy * xhat).mean((0, 2, 3)).to(stat), relu, [True, True])
    check(grad_input, want_gx, dtype, "grad of input")
    check(grad_residual, want_gres, dtype, "grad of residual")
    assert grad_input.is_contiguous(memory_format=expected_format(x))


@needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bn_parameter_gradients_are_float32_for_half_inputs(cuda_ops, dtype):
    """As aten's batch norm: the BN weight/bias gradients of a half input are float32 (the
    statistics dtype). Their sums over N*H*W values would overflow float16 otherwise: here
    grad_bias = 2 * 64 * 32 * 32 = 131072 > 65504. A conv bias gradient stays in the input's
    dtype, as aten's convolution's."""
    x = make((64, 4, 32, 32), dtype)
    g = torch.full_like(x, 2.0)
    w = torch.ones(4, device=DEVICE)
    mean, invstd = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    _, gw, gb = cuda_ops.batch_norm_backward(g, x, w, mean, invstd, False, [False, True, True])
    assert gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(gb, torch.full((4,), 131072.0, device=DEVICE))

    cw = make((4, 4, 1, 1), dtype)
    cb = torch.zeros(4, device=DEVICE, dtype=dtype)
    out, conv_out, mean, invstd = cuda_ops.conv_bn_relu(
        x, cw, cb, w, None, mean, torch.ones(4, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1,
        False, 1e-5, False)
    grads = cuda_ops.conv_bn_relu_backward(
        torch.full_like(out, 2.0), out, x, cw, cb, conv_out, w, mean, invstd, [1, 1], [0, 0],
        [1, 1], 1, False, False, [False, False, False, True, True, False])
    assert grads[3].dtype == grads[4].dtype == torch.float32
    torch.testing.assert_close(grads[4], torch.full((4,), 131072.0, device=DEVICE))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_statistics_are_stable_for_large_means(gpu_backend, layout):
    """Mean 100, standard deviation 0.1, float32: E[x^2] - E[x]^2 would lose every digit of
    the variance; a Welford / Chan reduction and normalising as (x - mean) * invstd keep it.
    Compared with float64 on the same values."""
    torch.manual_seed(6)
    x = make((16, 8, 12, 12), torch.float32, layout, scale=0.1, offset=100.0)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    rm64, rv64 = rm.double(), rv.double()
    out = CF.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    exp = F.batch_norm(x.double(), rm64, rv64, None, None, True, 1.0, 1e-5)
    torch.testing.assert_close(out.double(), exp, rtol=0, atol=2e-3)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spread", [1.0, 1e-4], ids=["spread1", "spread1e-4"])
def test_batch_norm_input_gradient_with_two_values_per_channel(gpu_backend, spread):
    """Training BN over two values per channel (N=2, H=W=1): the input gradient is what is left
    after terms of size w*invstd*|gy| (up to 1/sqrt(eps)) nearly cancel. cnnops must be about as
    accurate as torch's own float32 kernel, measured against float64. (The cuda backend once
    scaled each term before they cancelled, and was off by ~2e-3.)"""
    torch.manual_seed(7)
    C = 4096
    x = make((2, C, 1, 1), torch.float32, scale=spread)
    g = make((2, C, 1, 1), torch.float32)
    w = make((C,), torch.float32, positive=True)

    def grad_input(fn, x, w):
        x = x.detach().clone().requires_grad_()
        return torch.autograd.grad(fn(x, None, None, w, None, True), x, g.to(x.dtype))[0]

    truth = grad_input(F.batch_norm, x.double(), w.double())
    floor = 1e-3 * truth.abs().max()

    def error(got):  # the worst elementwise error, relative to the element (or 1e-3 of the max)
        return ((got.double() - truth).abs() / (truth.abs() + floor)).max().item()

    ours, torchs = error(grad_input(CF.batch_norm, x, w)), error(grad_input(F.batch_norm, x, w))
    assert ours <= 2 * torchs + 2e-6, (ours, torchs)


# ---------------------------------------------------------------------------
# conv -> BN -> (+ residual) -> ReLU

CBR_CONFIGS = [CONV_CONFIGS[i] for i in (0, 1, 2, 3, 5, 9)]
CBR_VARIANTS = ["plain", "conv-bias", "residual", "no-relu", "no-affine"]


@pytest.mark.parametrize("variant", CBR_VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_case_id)
@pytest.mark.parametrize("config", CBR_CONFIGS, ids=_conv_id)
def test_conv_bn_relu(gpu_backend, config, case, layout, training, variant):
    """Forward, backward (in eval too: the BN affine parameters train with frozen statistics)
    and running statistics against conv2d -> batch_norm -> (+ residual) -> relu."""
    dtype, mixed = case
    torch.manual_seed(7)
    x, w, cb, args = _conv_tensors(config, dtype, layout, variant == "conv-bias")
    OC = w.shape[0]
    bw, bb, rm, rv = _bn_tensors(OC, dtype, variant != "no-affine", mixed)
    rm_ref, rv_ref = to_ref(rm, ref_dtype(rm.dtype)), to_ref(rv, ref_dtype(rv.dtype))
    relu = variant != "no-relu"
    shape = F.conv2d(x.detach().float(), w.detach().float(), None, *args).shape
    r = make(shape, dtype, layout, grad=True) if variant == "residual" else None
    stride, padding, dilation, groups = args

    def ours(x, w, cb, bw, bb, r):
        return CF.conv_bn_relu(x, w, cb, bw, bb, rm, rv, stride, padding, dilation, groups,
                               training, 0.1, 1e-5, relu, r)

    def reference(x, w, cb, bw, bb, r):
        y = F.batch_norm(F.conv2d(x, w, cb, *args), rm_ref, rv_ref, bw, bb, training, 0.1, 1e-5)
        return y + r if r is not None else y

    out, _ = run_pair(ours, reference, [x, w, cb, bw, bb, r], dtype, relu=relu,
                      names=grad_names(input=x, weight=w, conv_bias=cb, bn_weight=bw,
                                       bn_bias=bb, residual=r))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x))
    check(rm, rm_ref, dtype, "running_mean")
    check(rv, rv_ref, dtype, "running_var")


@needs_cuda
@pytest.mark.parametrize("fusion", ["cudnn-fused", "fallback"])
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [CONV_CONFIGS[i] for i in (0, 1, 3)], ids=_conv_id)
def test_cuda_inference_paths(cuda_ops, monkeypatch, config, dtype, layout, residual, fusion):
    """The cuda backend's two inference paths for conv -> BN (-> + residual) -> ReLU and for
    conv2d_relu: BN folded into one fused cuDNN conv + bias (+ add) + ReLU call, and the
    fallback, cuDNN's convolution and one cnnops epilogue pass (CNNOPS_CUDNN_FUSION=0; also
    what float64, relu=False and configurations cuDNN refuses take)."""
    if fusion == "fallback":
        monkeypatch.setenv("CNNOPS_CUDNN_FUSION", "0")
    torch.manual_seed(19)
    x, w, cb, args = _conv_tensors(config, dtype, layout, True)
    OC = w.shape[0]
    bw, bb, rm, rv = _bn_tensors(OC, dtype, True, dtype in HALF)
    shape = F.conv2d(x.detach().float(), w.detach().float(), None, *args).shape
    r = make(shape, dtype, layout, grad=True) if residual else None
    with cnnops.use_backend("cuda"):
        out, _ = run_pair(
            lambda x, w, cb, r: CF.conv_bn_relu(x, w, cb, bw, bb, rm, rv, *args, residual=r),
            lambda x, w, cb, r: (F.batch_norm(F.conv2d(x, w, cb, *args), rm.to(x.dtype),
                                              rv.to(x.dtype), bw.to(x.dtype), bb.to(x.dtype))
                                 + (r if r is not None else 0)),
            [x, w, cb, r], dtype, relu=True, names=grad_names(input=x, weight=w, conv_bias=cb,
                                                               residual=r))
        assert out.is_contiguous(memory_format=expected_format(x))
        out, _ = run_pair(lambda x, w, cb, r: CF.conv2d_relu(x, w, cb, *args, residual=r),
                          lambda x, w, cb, r: F.conv2d(x, w, cb, *args) + (r if r is not None
                                                                           else 0),
                          [x, w, cb, r], dtype, relu=True,
                          names=grad_names(input=x, weight=w, bias=cb, residual=r))
        assert out.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_relu_weight_gradient_only(gpu_backend, layout, training):
    """Frozen input (no input gradient), BN weight only: the backward skips what is not
    asked for and still gets the rest right."""
    torch.manual_seed(8)
    x, w, _, args = _conv_tensors(CONV_CONFIGS[0], torch.float32, layout, False, grad=False)
    w.requires_grad_()
    bw, bb, rm, rv = _bn_tensors(w.shape[0], torch.float32, True, False, grad=False)
    bw.requires_grad_()
    run_pair(lambda w, bw: CF.conv_bn_relu(x, w, None, bw, bb, rm.clone(), rv.clone(), *args,
                                           training=training),
             lambda w, bw: F.batch_norm(F.conv2d(x, w, None, *args), rm.clone(), rv.clone(), bw,
                                        bb, training),
             [w, bw], torch.float32, relu=True, names=["weight", "bn_weight"])


# ---------------------------------------------------------------------------
# pooling

# (kernel, stride, padding, dilation, ceil_mode); every window holds at least one input
# element (torch reports no meaningful index otherwise; see the edge-case test below)
MAX_CONFIGS = [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
               ((3, 2), (2, 1), (1, 1), (1, 2), True), (2, 1, 0, 2, False), (3, 3, 1, 1, True),
               (5, 2, 2, 1, False), (3, 1, 1, 1, False)]
POOL_SHAPES = [(2, 3, 11, 10), (2, 40, 7, 9)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", MAX_CONFIGS, ids=lambda c: "k%s-s%s-p%s-d%s-ceil%s" % c)
def test_max_pool2d(gpu_backend, config, shape, dtype, layout):
    """Exact: values and indices equal torch's (same dtype; ties keep the first maximum in
    both), and the gradient is torch's."""
    k, s, p, d, ceil = config
    torch.manual_seed(9)
    x = make(shape, dtype, layout, grad=True)
    out, idx = CF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    xr = x.detach().clone().requires_grad_()
    exp, exp_idx = F.max_pool2d(xr, k, s, p, d, ceil, return_indices=True)
    assert out.dtype == dtype and idx.dtype == torch.int64
    assert out.is_contiguous(memory_format=expected_format(x))
    assert torch.equal(out, exp)
    assert torch.equal(idx, exp_idx)
    g = torch.randn(tuple(out.shape)).to(device=DEVICE, dtype=dtype)
    (gi,) = torch.autograd.grad(out, x, g)
    (gi_exp,) = torch.autograd.grad(exp, xr, g)
    check(gi, gi_exp.to(ref_dtype(dtype)), dtype, "grad of input")
    assert gi.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_max_pool2d_edge_semantics_match_the_cpu_kernels(gpu_backend, dtype, layout):
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
        xd = x.to(DEVICE)
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
        (gi,) = torch.autograd.grad(out, xd, gg.to(DEVICE))
        (gi_exp,) = torch.autograd.grad(exp, xc, gg)
        torch.testing.assert_close(gi.cpu(), gi_exp)
    assert (idx == -1).any()  # the last case has windows without any element


# (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CONFIGS = [(2, 2, 0, False, True, None), (3, 2, 1, False, True, None),
               (3, 2, 1, True, False, None), (3, 2, 1, True, True, None),
               ((3, 2), (2, 1), (1, 0), True, False, None), (2, 1, 1, False, True, 3),
               (3, 3, 1, True, True, None), (4, 3, 2, True, False, None),
               (3, 2, 1, True, True, -2)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", AVG_CONFIGS,
                         ids=lambda c: "k%s-s%s-p%s-ceil%s-pad%s-div%s" % c)
def test_avg_pool2d(gpu_backend, config, shape, dtype, layout):
    k, s, p, ceil, include_pad, divisor = config
    torch.manual_seed(10)
    x = make(shape, dtype, layout, grad=True)
    # The reference pools an NCHW copy: torch's own CUDA avg_pool2d backward is wrong for
    # channels_last input with padding > 0 (pytorch/pytorch#188344, seen with torch 2.11).
    out, _ = run_pair(lambda x: CF.avg_pool2d(x, k, s, p, ceil, include_pad, divisor),
                      lambda x: F.avg_pool2d(x.contiguous(), k, s, p, ceil, include_pad, divisor),
                      [x], dtype)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("output_size", [(1, 1), (3, 5), (7, 7), (4, 13), (10, 9)],
                         ids=lambda s: "%sx%s" % s)
def test_adaptive_avg_pool2d(gpu_backend, output_size, dtype, layout):
    torch.manual_seed(11)
    x = make((2, 37, 10, 9), dtype, layout, grad=True)
    out, _ = run_pair(lambda x: CF.adaptive_avg_pool2d(x, output_size),
                      lambda x: F.adaptive_avg_pool2d(x, output_size), [x], dtype)
    assert out.is_contiguous(memory_format=expected_format(x))


# ---------------------------------------------------------------------------
# add_relu

@pytest.mark.parametrize("shapes", [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 33, 4, 5), (33, 1, 1)),
                                    ((7,), (7,)), ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6)),
                                    ((1001,), (1,))],
                         ids=["same", "broadcast-channel", "1d", "5d", "odd-length"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_relu(gpu_backend, shapes, layout, dtype):
    torch.manual_seed(12)
    a_shape, b_shape = shapes
    a = make(a_shape, dtype, layout if len(a_shape) == 4 or layout == "strided" else "contiguous",
             grad=True)
    b = make(b_shape, dtype, grad=True)
    out, _ = run_pair(lambda a, b: CF.add_relu(a, b), lambda a, b: a + b, [a, b], dtype,
                      relu=True, names=["input", "other"])
    assert out.is_contiguous(memory_format=expected_format(a))


def test_add_relu_keeps_nan_and_passes_its_gradient(gpu_backend):
    a = torch.tensor([float("nan"), -1.0, 0.0, 2.0, -0.0], device=DEVICE, requires_grad=True)
    b = torch.zeros(5, device=DEVICE)
    out = CF.add_relu(a, b)
    exp = torch.tensor([float("nan"), 0.0, 0.0, 2.0, 0.0], device=DEVICE)
    torch.testing.assert_close(out, exp, equal_nan=True)
    (g,) = torch.autograd.grad(out, a, torch.ones(5, device=DEVICE))
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], device=DEVICE))


# ---------------------------------------------------------------------------
# empty batches, determinism, streams, devices

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if not DRY_RUN
                         else [torch.float32], ids=str)
def test_empty_batch(gpu_backend, dtype, layout):
    """N = 0 behaves as in PyTorch: empty outputs, zero parameter gradients, running
    statistics unchanged."""
    x = make((0, 4, 6, 6), dtype, layout, grad=True)
    w = make((6, 4, 3, 3), dtype, grad=True)
    b = make((6,), dtype, grad=True)
    bw, bb, rm, rv = _bn_tensors(6, dtype, True, False)
    rm0, rv0 = rm.clone(), rv.clone()
    outs = [
        CF.conv2d(x, w, b, 1, 1),
        CF.conv2d_relu(x, w, b, 1, 1),
        CF.conv_bn_relu(x, w, b, bw, bb, rm, rv, 1, 1, training=True),
        CF.conv_bn_relu(x, w, b, bw, bb, rm, rv, 1, 1, training=False),
        CF.batch_norm(x, rm[:4], rv[:4], bw[:4], bb[:4], training=True),
        CF.bn_relu(x, rm[:4], rv[:4], bw[:4], bb[:4], training=False),
        CF.max_pool2d(x, 2),
        CF.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
        CF.adaptive_avg_pool2d(x, (2, 3)),
        CF.add_relu(x, x),
    ]
    expected_shapes = [(0, 6, 6, 6)] * 4 + [(0, 4, 6, 6)] * 2 + [(0, 4, 3, 3), (0, 4, 4, 4),
                                                                 (0, 4, 2, 3), (0, 4, 6, 6)]
    for out, shape in zip(outs, expected_shapes):
        assert tuple(out.shape) == shape and out.dtype == dtype
    loss = sum(o.sum() for o in outs)
    gx, gw, gb, gbw, gbb = torch.autograd.grad(loss, [x, w, b, bw, bb])
    assert gx.shape == x.shape
    for g in (gw, gb, gbw, gbb):
        assert torch.count_nonzero(g) == 0
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def _backward_run(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    g = torch.ones_like(out) if out.dim() == 0 else torch.linspace(
        -1, 1, out.numel(), device=out.device, dtype=out.dtype).view(out.shape)
    out.backward(g)
    return [out.detach().clone()] + [t.grad.clone() for t in inputs]


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_backward_is_deterministic(cuda_ops, monkeypatch, layout):
    """The cuda backend's reductions and scatters have a fixed order: two runs agree bit for
    bit (overlapping max-pool windows included). The convolutions are cuDNN's, deterministic
    when torch.backends.cudnn.deterministic says so, as in eager PyTorch."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(13)
    x = make((8, 24, 15, 15), torch.float32, layout, grad=True)
    w = make((32, 24, 3, 3), torch.float32, grad=True, scale=0.1)
    bw, bb, rm, rv = _bn_tensors(32, torch.float32, True, False)
    cases = [
        (lambda x, w: CF.conv2d(x, w, None, 2, 1), [x, w]),
        (lambda x, bw, bb: CF.batch_norm(x, None, None, bw[:24], bb[:24], True), [x, bw, bb]),
        (lambda x, w, bw, bb: CF.conv_bn_relu(x, w, None, bw, bb, rm, rv, 1, 1, training=True),
         [x, w, bw, bb]),
        (lambda x: CF.max_pool2d(x, 3, 1, 1), [x]),
        (lambda x: CF.avg_pool2d(x, 3, 2, 1, ceil_mode=True), [x]),
        (lambda x: CF.adaptive_avg_pool2d(x, (4, 6)), [x]),
    ]
    with cnnops.use_backend("cuda"):
        for fn, inputs in cases:
            first = _backward_run(fn, inputs)
            second = _backward_run(fn, inputs)
            for a, b in zip(first, second):
                assert torch.equal(a, b)


@needs_cuda
def test_ops_run_on_the_current_stream(gpu_backend):
    """Launched on a side stream, the ops give the default stream's results."""
    torch.manual_seed(14)
    x, w, _, args = _conv_tensors(CONV_CONFIGS[0], torch.float32, "channels_last", False)
    bw, bb, rm, rv = _bn_tensors(w.shape[0], torch.float32, True, False)

    def step():
        out = CF.conv_bn_relu(x, w, None, bw, bb, rm.clone(), rv.clone(), *args, training=True)
        out = CF.max_pool2d(out, 2)
        gx, gw = torch.autograd.grad(out.square().sum(), [x, w])
        return out.detach(), gx, gw

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.skipif(DRY_RUN or not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_ops_run_on_the_inputs_device(gpu_backend):
    """Inputs on cuda:1 while cuda:0 is current: kernels run on cuda:1 (device guard)."""
    torch.manual_seed(15)
    x = torch.randn(2, 3, 9, 9, device="cuda:1", requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        out = CF.max_pool2d(CF.conv2d_relu(x, w, None, 1, 1), 2)
        exp = F.max_pool2d(F.relu(F.conv2d(x, w, None, 1, 1)), 2)
        assert out.device == x.device
        torch.testing.assert_close(out, exp)
        (gx,) = torch.autograd.grad(out.sum(), x)
        (gx_exp,) = torch.autograd.grad(exp.sum(), x)
        torch.testing.assert_close(gx, gx_exp)


# ---------------------------------------------------------------------------
# autocast

@needs_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_autocast_conv_bn_relu(gpu_backend, amp_dtype, training, layout):
    """Under torch.autocast the convolution runs in the autocast dtype (input, weight, conv
    bias and residual cast) and BN keeps its float32 parameters and statistics, as
    conv2d -> batch_norm -> add -> relu do in torch; gradients reach the float32 leaves.

    The reference is torch in float32 on the values autocast rounds (this file's rule for half
    types), not torch under autocast: in training, the conv bias gradient is zero up to
    rounding, and torch's bfloat16 sum of bfloat16-rounded terms is ~0.05 of noise where
    cnnops' float32 sums give ~1e-7, so an autocast reference failed the more exact result."""
    torch.manual_seed(16)
    x = make((4, 8, 10, 10), torch.float32, layout, grad=True)
    w = make((12, 8, 3, 3), torch.float32, grad=True, scale=0.12)
    cb = make((12,), torch.float32, grad=True)
    bw, bb, rm, rv = _bn_tensors(12, torch.float32, True, False)
    r = make((4, 12, 10, 10), torch.float32, layout, grad=True)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    leaves = [x, w, cb, bw, bb, r]
    ref_leaves = [to_ref(t, torch.float32) for t in leaves]
    with torch.autocast("cuda", dtype=amp_dtype):
        out = CF.conv_bn_relu(x, w, cb, bw, bb, rm, rv, 1, 1, training=training, residual=r)

    def rounded(t):  # autocast's cast of the value; the gradient passes in float32
        return t + (t.to(amp_dtype).float() - t).detach()

    xr, wr, cbr, bwr, bbr, rr = ref_leaves
    # cnnops casts the residual with the convolution's tensors (torch would promote
    # half + float32 to float32), so it is rounded here too
    pre = F.batch_norm(F.conv2d(rounded(xr), rounded(wr), rounded(cbr), 1, 1), rm_ref, rv_ref,
                       bwr, bbr, training) + rounded(rr)
    exp = F.relu(pre)
    assert out.dtype == amp_dtype
    check(out, exp, amp_dtype)
    check(rm, rm_ref, amp_dtype, "running_mean")
    check(rv, rv_ref, amp_dtype, "running_var")
    g = torch.randn(tuple(out.shape), device=DEVICE)
    got = torch.autograd.grad((out.float() * g).sum(), leaves)
    # through our output's ReLU mask (see run_pair)
    want = torch.autograd.grad((pre * (out > 0) * g).sum(), ref_leaves)
    for name, a, b in zip(["input", "weight", "conv_bias", "bn_weight", "bn_bias", "residual"],
                          got, want):
        assert a.dtype == torch.float32, name
        check(a, b, amp_dtype, "grad of " + name)


@needs_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_other_ops_run_in_their_input_dtype(gpu_backend, amp_dtype):
    x = make((2, 6, 8, 8), torch.float32, grad=True)
    w = make((6, 6, 3, 3), torch.float32, grad=True)
    with torch.autocast("cuda", dtype=amp_dtype):
        assert CF.conv2d(x, w, None, 1, 1).dtype == amp_dtype
        assert CF.conv2d_relu(x, w, None, 1, 1).dtype == amp_dtype
        assert CF.batch_norm(x, None, None, training=True).dtype == torch.float32
        assert CF.bn_relu(x, None, None, None, None, training=True).dtype == torch.float32
        assert CF.max_pool2d(x, 2).dtype == torch.float32
        assert CF.avg_pool2d(x, 2).dtype == torch.float32
        assert CF.adaptive_avg_pool2d(x, 1).dtype == torch.float32
        assert CF.add_relu(x, x).dtype == torch.float32
        y = CF.conv2d(x, w, None, 1, 1)
        # a half activation with float32 BN tensors, as a network under autocast produces
        z = CF.bn_relu(y, torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE),
                       torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE),
                       training=True)
        assert z.dtype == amp_dtype
    z.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_kernels_of_the_cuda_ops(cuda_ops, amp_dtype):
    """The AutocastCUDA kernels registered in C++ (csrc/autocast.cpp), called through
    torch.ops directly: float32 arguments, the convolutions run in the autocast dtype, BN
    tensors stay float32 (statistics float32), float64 is left alone, other ops untouched."""
    x = torch.randn(2, 4, 7, 7, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    b = torch.randn(6, device=DEVICE)
    r = torch.randn(2, 6, 7, 7, device=DEVICE)
    bw, bb = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with torch.autocast("cuda", dtype=amp_dtype):
        y = cuda_ops.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
        y2 = cuda_ops.conv2d_relu(x, w, b, r, [1, 1], [1, 1], [1, 1], 1)
        out, conv_out, mean, invstd = cuda_ops.conv_bn_relu(
            x, w, b, bw, bb, rm, rv, r, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, True)
        out_eval = cuda_ops.conv_bn_relu(
            x, w, b, bw, bb, rm, rv, r, [1, 1], [1, 1], [1, 1], 1, False, 1e-5, True)[0]
        y64 = cuda_ops.conv2d(x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], 1)
        p = cuda_ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[0]
        s = cuda_ops.add_relu(x, x)
    assert y.dtype == y2.dtype == out.dtype == conv_out.dtype == out_eval.dtype == amp_dtype
    assert mean.dtype == invstd.dtype == torch.float32
    assert y64.dtype == torch.float64
    assert p.dtype == s.dtype == torch.float32
    exp = F.conv2d(x.to(amp_dtype).float(), w.to(amp_dtype).float(), b.to(amp_dtype).float(),
                   1, 1)
    check(y, exp, amp_dtype)
    exp_out = F.relu(F.batch_norm(exp, None, None, bw, bb, True) + r.to(amp_dtype).float())
    check(out, exp_out, amp_dtype)


# ---------------------------------------------------------------------------
# opcheck and argument errors of the C++ CUDA ops

def _opcheck_samples(dtype, lib=torch.ops.cnnops):
    def t(*shape, grad=False, positive=False, layout=None):
        v = make(shape, dtype, layout or "contiguous", positive=positive)
        return v.requires_grad_(grad)

    half = dtype in HALF
    p = (lambda *s, **k: make(s, torch.float32, positive=k.get("positive", False))) if half \
        else (lambda *s, **k: t(*s, positive=k.get("positive", False)))
    samples = []
    for layout in ("contiguous", "channels_last"):
        x = t(2, 4, 6, 5, grad=True, layout=layout)
        w = t(6, 2, 3, 3, grad=True)
        b = t(6, grad=True)
        samples.append(("conv2d", (x, w, b, [2, 1], [1, 1], [1, 2], 2)))
        samples.append(("conv2d_relu", (x, w, b, t(2, 6, 3, 3, grad=True, layout=layout),
                                        [2, 1], [1, 1], [1, 2], 2)))
        for training in (True, False):
            bw, bb = p(4, positive=True), p(4)
            samples.append(("batch_norm", (x, bw, bb, p(4), p(4, positive=True), training,
                                           1e-5)))
            samples.append(("bn_relu", (x, bw, bb, p(4), p(4, positive=True),
                                        t(2, 4, 6, 5, grad=True, layout=layout), training, 1e-5,
                                        True)))
            samples.append(("conv_bn_relu", (x, w, b, p(6, positive=True), p(6), p(6),
                                             p(6, positive=True),
                                             t(2, 6, 3, 3, grad=True, layout=layout),
                                             [2, 1], [1, 1], [1, 2], 2, training, 1e-5, True)))
        samples.append(("max_pool2d", (x, [3, 2], [2, 1], [1, 1], [1, 1], True)))
        samples.append(("avg_pool2d", (x, [3, 2], [2, 2], [1, 0], True, False, None)))
        samples.append(("adaptive_avg_pool2d", (x, [4, 3])))
        samples.append(("add_relu", (x, t(2, 4, 6, 5, grad=True, layout=layout))))
    x, w = t(2, 4, 6, 5), t(6, 2, 3, 3)
    idx = lib.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[1]
    out = t(2, 4, 6, 5).relu()
    cout, conv_out, mean, invstd = lib.conv_bn_relu(
        x, w, None, p(6), p(6), None, None, None, [1, 1], [1, 1], [1, 2], 2, True, 1e-5, True)
    samples += [
        ("conv2d_backward", (t(2, 6, 6, 3), x, w, [1, 1], [1, 1], [1, 2], 2, [True] * 3)),
        ("conv2d_backward", (t(2, 6, 6, 3), x, w, [1, 1], [1, 1], [1, 2], 2,
                             [False, True, False])),
        ("batch_norm_backward", (t(2, 4, 6, 5), x, p(4), mean[:4], invstd[:4], True,
                                 [True] * 3)),
        ("bn_relu_backward", (t(2, 4, 6, 5), out, x, None, mean[:4], invstd[:4], False, True,
                              [True, False, True, True])),
        ("conv_bn_relu_backward", (t(2, 6, 6, 3), cout, x, w, None, conv_out, p(6), mean,
                                   invstd, [1, 1], [1, 1], [1, 2], 2, True, True, [True] * 6)),
        ("max_pool2d_backward", (t(2, 4, 3, 2), x, idx, [2, 2], [2, 2], [0, 0], [1, 1])),
        ("avg_pool2d_backward", (t(2, 4, 3, 2), x, [2, 2], [2, 2], [0, 0], False, True, None)),
        ("adaptive_avg_pool2d_backward", (t(2, 4, 4, 3), x)),
        ("add_relu_backward", (t(2, 4, 6, 5), out)),
        ("update_running_stats", (p(6), p(6, positive=True), mean, invstd, 9, 0.1, 1e-5)),
        ("batch_norm_stats", (x,)),
        ("batch_norm_stats", (x.contiguous(memory_format=torch.channels_last),)),
        ("bn_relu_backward_elemt", (t(2, 4, 6, 5), out, x, p(4), mean[:4], invstd[:4], p(4),
                                    p(4), True, [True, True])),
    ]
    return samples


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cuda_ops(cuda_ops, dtype):
    """torch.library.opcheck (schema, fake kernel incl. strides and dtypes, autograd
    registration, AOT dispatch) of every op on CUDA tensors; half types with float32 BN
    tensors, as autocast produces."""
    torch.manual_seed(17)
    for name, args in _opcheck_samples(dtype):
        torch.library.opcheck(getattr(cuda_ops, name).default, args)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_triton_ops(dtype):
    """The same opcheck for the Triton ops (torch.ops.cnnops_triton), compiled on the GPU: their
    fake kernels are the triton_op functions themselves, traced with wrap_triton."""
    if "triton" not in cnnops.available_backends():
        pytest.skip("the triton backend is not available here")
    from cnnops.triton_kernels import ops as triton_ops  # registers torch.ops.cnnops_triton

    lib = getattr(torch.ops, triton_ops.NS)
    torch.manual_seed(17)
    for name, args in _opcheck_samples(dtype, lib):
        torch.library.opcheck(getattr(lib, name).default, args)


_CUDA_BAD_ARGUMENTS = """
import pytest, torch
cuda_ops = torch.ops.cnnops
import cnnops  # loads cnnops._C
DEVICE = "cuda"
x = torch.randn(2, 4, 6, 6, device=DEVICE)
w = torch.randn(6, 4, 3, 3, device=DEVICE)
with pytest.raises(TypeError, match="float32, float64, float16 and bfloat16"):
    cuda_ops.conv2d(x.int(), w.int(), None, [1, 1], [0, 0], [1, 1], 1)
with pytest.raises(ValueError, match="weight on the device of input"):
    cuda_ops.conv2d(x, w.cpu(), None, [1, 1], [0, 0], [1, 1], 1)
with pytest.raises(ValueError, match=r"in_channels \\(4\\) must be divisible by groups \\(3\\)"):
    cuda_ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 3)
with pytest.raises(ValueError, match="expected padding <= 2147483647"):
    cuda_ops.conv2d(x, w, None, [1, 1], [2 ** 40, 0], [1, 1], 1)
with pytest.raises(TypeError, match="running_mean to have the dtype of input"):
    cuda_ops.batch_norm(x, None, None, torch.zeros(4, device=DEVICE, dtype=torch.float64),
                        torch.ones(4, device=DEVICE), False, 1e-5)
with pytest.raises(ValueError, match="expected grad_output of shape"):
    cuda_ops.conv2d_backward(torch.randn(2, 6, 5, 5, device=DEVICE), x, w, [1, 1], [0, 0],
                             [1, 1], 1, [True, True, True])
with pytest.raises(TypeError, match="indices of dtype int64"):
    cuda_ops.max_pool2d_backward(torch.randn(2, 4, 3, 3, device=DEVICE), x,
                                 torch.zeros(2, 4, 3, 3, device=DEVICE), [2, 2], [2, 2],
                                 [0, 0], [1, 1])
with pytest.raises(ValueError, match="padding to be at most half"):
    cuda_ops.max_pool2d(x, [2, 2], [2, 2], [2, 2], [1, 1], False)
with pytest.raises(ValueError, match="shape of input"):
    cuda_ops.add_relu(x, x[:1])
# half input, float32 BN tensors: accepted; float16 input, bfloat16 tensors: not
xh = x.half()
out = cuda_ops.batch_norm(xh, torch.ones(4, device=DEVICE), None, None, None, True, 1e-5)
assert out[0].dtype == torch.float16 and out[1].dtype == torch.float32
with pytest.raises(TypeError, match="or float32"):
    cuda_ops.batch_norm(xh, torch.ones(4, device=DEVICE, dtype=torch.bfloat16), None, None,
                        None, True, 1e-5)
torch.cuda.synchronize()  # no asynchronous error either
print("OK")
"""


@needs_cuda
def test_cuda_ops_reject_bad_arguments_cleanly(cuda_ops):
    """Bad arguments raise Python exceptions naming the argument; nothing crashes. In a child
    process, so a crash fails this test rather than the run (every RAW_CASE of test_errors.py
    runs on CUDA the same way); these are the CUDA-only cases."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CUDA_BAD_ARGUMENTS], capture_output=True,
                       text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (
        "exit status %d\n%s" % (r.returncode, r.stderr[-3000:]))


# ---------------------------------------------------------------------------
# a ResNet-ish model: one training step and inference, fused against torch.nn

def _twin_resnet(dtype, layout):
    from cnnops.models.plain import TvBasicBlock, TvResNet

    torch.manual_seed(18)
    plain = TvResNet(TvBasicBlock, [1, 1, 1, 1], num_classes=10, in_channels=3, width=8)
    for m in plain.modules():  # non-trivial BN parameters and statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    plain = plain.to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        plain = plain.to(memory_format=torch.channels_last)
    fused = cnnops.fuse(plain)
    assert fused is not plain
    return plain, fused


def _train_step(model, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return out.detach(), loss.detach(), grads


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_resnet_training_step_matches_torch(gpu_backend, dtype, layout):
    """cnnops.fuse(model) against the model itself: one SGD step (outputs, loss, every
    gradient, updated parameters, running statistics, num_batches_tracked), then inference."""
    plain, fused = _twin_resnet(dtype, layout)
    x = make((6, 3, 32, 32), dtype, layout)
    y = torch.randint(0, 10, (6,)).to(DEVICE)
    out_p, loss_p, grads_p = _train_step(plain, x, y)
    out_f, loss_f, grads_f = _train_step(fused, x, y)
    check(out_f, out_p, dtype, "logits")
    check(loss_f, loss_p, dtype, "loss")
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        check(grads_f[name], grads_p[name], dtype, "grad of " + name)
    state_p, state_f = plain.state_dict(), fused.state_dict()
    assert state_p.keys() == state_f.keys()
    for name in state_p:
        if state_p[name].is_floating_point():
            check(state_f[name], state_p[name], dtype, name)
        else:
            assert torch.equal(state_f[name], state_p[name]), name
    plain.eval()
    fused.eval()
    with torch.no_grad():
        check(fused(x), plain(x), dtype, "eval logits")


@needs_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_resnet_training_step_under_autocast(gpu_backend, amp_dtype):
    """The same step under torch.autocast. Gradients are judged against the float32 step: cnnops
    under autocast must be about as accurate as torch under autocast.

    Comparing the two autocast runs with each other tests noise: in bfloat16 torch's own
    gradients of this net are 20-50% off the float32 step (relative L2 over all parameters
    0.19-0.33 over 4 seeds, bn1.bias 0.22-0.50; measured on the CPU), so a fused-vs-eager
    difference of 0.30 (the first GPU run) says nothing about either. A wrong gradient is off
    by ~1 or more and still fails."""
    import copy

    plain, fused = _twin_resnet(torch.float32, "channels_last")
    exact = copy.deepcopy(plain)
    x = make((6, 3, 32, 32), torch.float32, "channels_last")
    y = torch.randint(0, 10, (6,)).to(DEVICE)
    _, _, grads_e = _train_step(exact, x, y)
    with torch.autocast("cuda", dtype=amp_dtype):
        out_p, loss_p, grads_p = _train_step(plain, x, y)
        out_f, loss_f, grads_f = _train_step(fused, x, y)
    assert out_f.dtype == out_p.dtype
    check(out_f, out_p.float(), amp_dtype, "logits")
    assert abs(loss_f.item() - loss_p.item()) < 0.02 * abs(loss_p.item())

    def error(grads, names):
        a = torch.cat([grads[n].double().flatten() for n in names])
        b = torch.cat([grads_e[n].double().flatten() for n in names])
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    names = list(grads_e)
    assert error(grads_f, names) <= 1.25 * error(grads_p, names) + 0.02, (
        error(grads_f, names), error(grads_p, names))
    for name in names:
        assert error(grads_f, [name]) <= 2 * error(grads_p, [name]) + 0.05, (
            name, error(grads_f, [name]), error(grads_p, [name]))


@needs_cuda
def test_compiled_fused_model_matches_eager(gpu_backend):
    """torch.compile(fullgraph=True) of a fused model on CUDA: same outputs and gradients."""
    plain, fused = _twin_resnet(torch.float32, "contiguous")
    x = make((4, 3, 32, 32), torch.float32, grad=True)
    fused.train()
    compiled = torch.compile(fused, fullgraph=True)
    eager_out = fused(x)
    (eager_gx,) = torch.autograd.grad(eager_out.sum(), x)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    check(out, eager_out, torch.float32)
    check(gx, eager_gx, torch.float32, "grad of input")

"""The Winograd CPU convolution core (csrc/cpu/winograd.h, winograd.cpp): F(2x2, 3x3) at
stride 1 and its stride-2 counterpart.

Its index math and transforms are checked in Python against torch's convolution first (and
the input gradient as a convolution), then the C++ core on the op paths it runs (conv_bn_relu
in inference: the op, the output-only inference op and the write-into-residual op; in
training: the convolution of the forward and the input gradient of the backward), the calls
it leaves to the other cores, and auto's measurement of it. The `conv_cores` tests of every
convolution op (conv2d, conv2d_relu, conv_bn_relu: forward and backward) run it too, as the
`cpu-winograd` entry (conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from cnnops import _ext
from conftest import assert_close, tolerances

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the compiled ops")
FORCED = "forced (set_cpu_conv / CNNOPS_CPU_CONV)"

# The matrices of winograd.h (B^T, G, A^T) at each stride: F(2, 3) at stride 1, and at
# stride 2 F(2, 2) on the even inputs with taps 0 and 2 plus the odd inputs times tap 1.
MATRICES = {
    1: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    2: ([[1, 0, -1, 0, 0], [0, 0, 1, 0, 0], [0, 0, -1, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]],
        [[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0]],
        [[1, 1, 0, 1, 0], [0, 1, 1, 0, 1]]),
}


def winograd_conv(x, w, ph, pw, stride=1):
    """The core's algorithm in torch: 2x2 output tiles, tile (th, tw) reading the n x n input
    patch at (2S*th - ph, 2S*tw - pw) (n = 4 at stride S = 1, 5 at stride 2), V = B^T d B,
    U = G g G^T, M[e] = U[e] @ V[e] over channels for each of the n*n entries e, output tile
    A^T M A, cropped to the output."""
    bt, g, at = (torch.tensor(m, dtype=x.dtype) for m in MATRICES[stride])
    n = bt.shape[0]
    N, C, H, W = x.shape
    K = w.shape[0]
    OH, OW = (H + 2 * ph - 3) // stride + 1, (W + 2 * pw - 3) // stride + 1
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    step = 2 * stride  # input rows (columns) between tiles
    xp = F.pad(x, (pw, step * (TW - 1) + n - W - pw, ph, step * (TH - 1) + n - H - ph))
    d = xp.unfold(2, n, step).unfold(3, n, step)             # N C TH TW n n
    v = (bt @ d @ bt.T).permute(4, 5, 1, 0, 2, 3).reshape(n * n, C, -1)
    u = (g @ w @ g.T).permute(2, 3, 0, 1).reshape(n * n, K, C)
    m = (u @ v).reshape(n, n, K, N, TH, TW).permute(3, 2, 4, 5, 0, 1)
    y = at @ m @ at.T                                        # N K TH TW 2 2
    return y.permute(0, 1, 2, 4, 3, 5).reshape(N, K, 2 * TH, 2 * TW)[:, :, :OH, :OW]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape, padding", [
    ((2, 3, 5, 7), (1, 1)), ((1, 4, 1, 1), (1, 1)), ((2, 2, 6, 9), (0, 0)),
    ((1, 3, 7, 4), (2, 0)), ((1, 5, 3, 3), (0, 2)), ((1, 2, 8, 10), (1, 1))])
def test_the_algorithm_is_torch_s_convolution(shape, padding, stride):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(6, shape[1], 3, 3, dtype=torch.float64)
    assert_close(winograd_conv(x, w, *padding, stride),
                 F.conv2d(x, w, stride=stride, padding=padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [(1, 1), (0, 0), (2, 0), (0, 2)])
def test_the_input_gradient_is_a_convolution(padding):
    """What winograd_conv_input_grad computes: the input gradient of a stride-1 3x3
    convolution with padding p is the convolution of the output gradient, padded by 2 - p,
    with the filters rotated by 180 degrees and their in and out channels swapped; so the
    core runs it as a forward (here: the algorithm above)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    g = torch.randn_like(F.conv2d(x, w, padding=padding))
    expected = torch.nn.grad.conv2d_input(x.shape, w, g, padding=padding)
    rotated = w.transpose(0, 1).flip(2, 3)
    assert_close(winograd_conv(g, rotated, 2 - padding[0], 2 - padding[1]), expected,
                 rtol=1e-12, atol=1e-12)


def test_float32_error_is_no_larger_than_the_direct_convolution_s():
    """F(2x2, 3x3) in float32 lands as close to the exact result as torch's float32
    convolution (measured: a third of its error here)."""
    torch.manual_seed(1)
    x, w = torch.randn(2, 64, 14, 14), torch.randn(64, 64, 3, 3) / 24
    exact = F.conv2d(x.double(), w.double(), padding=1)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("winograd"), torch.no_grad():
        ours = CF.conv_bn_relu(x, w, None, None, None, torch.zeros(64), torch.ones(64),
                               padding=1, training=False, eps=0.0, relu=False)
    direct = F.conv2d(x, w, padding=1)
    assert (ours.double() - exact).abs().max() <= 2 * (direct.double() - exact).abs().max()


def _bn(k, dtype):
    torch.manual_seed(2)
    return (torch.rand(k, dtype=dtype) + 0.5, torch.randn(k, dtype=dtype),
            torch.randn(k, dtype=dtype), torch.rand(k, dtype=dtype) + 0.5)


def _expected(x, w, cb, bn, residual, padding, relu, stride=1):
    bw, bb, rm, rv = bn
    y = F.batch_norm(F.conv2d(x, w, cb, stride, padding), rm, rv, bw, bb, False, 0.0, 1e-5)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


# (N, C, K, H, W, padding, stride): odd and even sizes, 1x1 and 2x2 images, padding 0 and 2,
# at both strides; each in both dtypes and layouts. (2, 19, 37, 9, 9, 1): the channels_last
# float32 GEMM kernel's whole and partial 6x16 blocks: 37 output channels (two 16-column
# panels and 5 columns) and at stride 1 50 tiles an entry (on 2 threads, two tasks of 25:
# four 6-row blocks and a row). An NCHW float32 call runs in channels_last (winograd.cpp's
# working_layout) but at stride 1 with at most 64 x 64 channels: (2, 65, 70, 5, 6, 1) is
# one past that.
SHAPES = [(2, 3, 5, 5, 7, 1), (1, 8, 4, 1, 1, 1), (3, 4, 6, 2, 2, 1), (2, 6, 8, 6, 9, 0),
          (1, 5, 3, 7, 6, 2), (2, 19, 37, 9, 9, 1), (2, 65, 70, 5, 6, 1)]
CASES = [(shape + (stride,), dtype, layout) for shape in SHAPES for stride in (1, 2)
         for dtype in (torch.float32, torch.float64)
         for layout in ("contiguous", "channels_last")]
# A batch whose V and M pass the chunk size (16 MB): three chunks, the last one short; in
# channels_last (float32, U of 64 channels within a task's size) tasks instead: twenty of 8
# tile rows, the last of 3; at stride 2, 16 tile rows, in eight tasks of 10 and 2 rows.
CASES += [((5, 64, 64, 62, 64, 1, stride), torch.float32, layout)
          for stride in (1, 2) for layout in ("contiguous", "channels_last")]
# In channels_last float32, a transformed weight past a task's size (192 x 192 channels: 2.4
# MB): chunks, with the GEMM kernel; the second with 97 tiles an entry, which the kernel's
# row blocks split in two (49 and 48 rows, in 6-row steps 54 and 43).
CASES += [((1, 192, 192, 4, 4, 1, 1), torch.float32, "channels_last"),
          ((1, 192, 192, 2, 194, 1, 1), torch.float32, "channels_last")]


def _out_size(size, p, stride):
    return (size + 2 * p - 3) // stride + 1


@pytest.mark.parametrize("shape, dtype, layout", CASES,
                         ids=["x".join(map(str, s[:-1])) + "-s%d-%s-%s" % (s[-1], str(d)[6:], l)
                              for s, d, l in CASES])
def test_inference_op_matches_torch(shape, dtype, layout):
    N, C, K, H, W, p, s = shape
    torch.manual_seed(3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, C, H, W, dtype=dtype).to(memory_format=fmt)
    w = (torch.randn(K, C, 3, 3, dtype=dtype) / (3 * C ** 0.5)).to(memory_format=fmt)
    cb, bn = torch.randn(K, dtype=dtype), _bn(K, dtype)
    residual = torch.randn(N, K, _out_size(H, p, s), _out_size(W, p, s), dtype=dtype)
    with cnnops.use_cpu_conv("winograd"), torch.no_grad():
        for conv_bias, r, relu in [(cb, residual, True), (None, None, False), (cb, None, True)]:
            out = torch.ops.cnnops.conv_bn_relu_inference(
                x, w, conv_bias, *bn, r, [s, s], [p, p], [1, 1], 1, 1e-5, relu)
            expected = _expected(x, w, conv_bias, bn, r, p, relu, s)
            assert_close(out, expected)
            assert out.is_contiguous(memory_format=fmt)
            # the general op's output is the same
            general = torch.ops.cnnops.conv_bn_relu(x, w, conv_bias, *bn, r, [s, s], [p, p],
                                                    [1, 1], 1, False, 1e-5, relu)[0]
            assert torch.equal(general, out)


# (training's batch statistics need more than one value per channel)
TRAIN_CASES = [c for c in CASES
               if c[0][0] * _out_size(c[0][3], c[0][5], c[0][6])
               * _out_size(c[0][4], c[0][5], c[0][6]) > 1]


@pytest.mark.parametrize("shape, dtype, layout", TRAIN_CASES,
                         ids=["x".join(map(str, s[:-1])) + "-s%d-%s-%s" % (s[-1], str(d)[6:], l)
                              for s, d, l in TRAIN_CASES])
def test_training_matches_torch(shape, dtype, layout):
    """Training: the forward's convolution on the core, and at stride 1 the backward's input
    gradient (a convolution of K into C channels padded by 2 - p: the shapes above run it with
    the channel counts swapped; at stride 2 it runs on im2col), the weight gradient on oneDNN
    (im2col for float64). With a ReLU where the output is small: a large one has elements
    within float32 rounding of 0, whose ReLU mask two convolutions summing in another order
    may set differently."""
    N, C, K, H, W, p, s = shape
    relu = N * K * H * W <= 50_000
    torch.manual_seed(8)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, C, H, W, dtype=dtype).to(memory_format=fmt).requires_grad_()
    w = (torch.randn(K, C, 3, 3, dtype=dtype) / (3 * C ** 0.5)).requires_grad_()
    cb, bw, bb = (torch.randn(K, dtype=dtype).requires_grad_() for _ in range(3))
    residual = torch.randn(N, K, _out_size(H, p, s), _out_size(W, p, s),
                           dtype=dtype).requires_grad_()
    leaves = [x, w, cb, bw, bb, residual]
    stats = [torch.zeros(K, dtype=dtype), torch.ones(K, dtype=dtype)]
    expected = F.batch_norm(F.conv2d(x, w, cb, s, p), *[t.clone() for t in stats], bw, bb,
                            True, 0.1, 1e-5) + residual
    expected = F.relu(expected) if relu else expected
    g = torch.randn_like(expected)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("winograd"):
        out = CF.conv_bn_relu(x, w, cb, bw, bb, *stats, stride=s, padding=p, training=True,
                              relu=relu, residual=residual)
        assert_close(out, expected)
        ours = torch.autograd.grad(out, leaves, g)
        theirs = torch.autograd.grad(expected, leaves, g)
        for a, b in zip(ours[:1] + ours[5:], theirs[:1] + theirs[5:]):  # input, residual
            assert_close(a, b)
        # The weight and bias gradients sum N * OH * OW terms (2e4 at the largest shape),
        # whose rounding grows as the root of their count; the conv bias's is 0 up to it.
        atol = tolerances(dtype)["atol"] * expected[:, 0].numel() ** 0.5
        for a, b in zip(ours[1:5], theirs[1:5]):
            assert_close(a, b, atol=atol)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_into_residual_writes_the_residual(dtype, fmt, stride):
    """(NCHW float32 at stride 2 computes in channels_last, then writes the residual)"""
    torch.manual_seed(4)
    x = torch.randn(2, 6, 9, 8, dtype=dtype).to(memory_format=fmt)
    w = torch.randn(5, 6, 3, 3, dtype=dtype)
    bn = _bn(5, dtype)
    residual = torch.randn(2, 5, _out_size(9, 1, stride), _out_size(8, 1, stride),
                           dtype=dtype).to(memory_format=fmt)
    expected = _expected(x, w, None, bn, residual, 1, True, stride)
    ptr = residual.data_ptr()
    with cnnops.use_cpu_conv("winograd"), torch.no_grad():
        torch.ops.cnnops.conv_bn_relu_into_residual(residual, x, w, None, *bn, [stride, stride],
                                                    [1, 1], [1, 1], 1, 1e-5, True)
    assert residual.data_ptr() == ptr
    assert_close(residual, expected)


def test_an_updated_weight_is_transformed_again():
    """The transformed weight is kept per weight while it is unchanged: an in-place update (a
    training step between evaluations) is seen once it settles."""
    torch.manual_seed(5)
    conv = cnnops.FusedConvBNReLU(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 8, 8)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("winograd"), torch.no_grad():
        for _ in range(3):
            conv.conv.weight.mul_(1.5)
            expected = F.relu(conv.bn(F.conv2d(x, conv.conv.weight, conv.conv.bias, padding=1)))
            assert_close(conv(x), expected)
            assert_close(conv(x), expected)


def test_forced_winograd_runs_what_it_can_and_says_where_it_cannot():
    torch.manual_seed(6)
    x = torch.randn(2, 4, 8, 8)
    others = "forced winograd, which does not run this call"
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("winograd"):
        fused = cnnops.FusedConvBNReLU(4, 6, 3, padding=1)
        assert [(r["call"].split()[0], r["core"], r["reason"])
                for r in cnnops.explain(fused, x)] == [("conv_bn_relu", "winograd", FORCED)]
        # training: the forward, and the backward where it takes the input gradient; the
        # plain convolution's too
        assert [(r["call"].split()[0], r["core"], r["reason"])
                for r in cnnops.explain(fused, x.clone().requires_grad_(), train=True)] == [
            ("conv_bn_relu", "winograd", FORCED), ("conv_bn_relu_backward", "winograd", FORCED)]
        conv = cnnops.nn.Conv2d(4, 6, 3, padding=1)
        assert [(r["call"].split()[0], r["core"], r["reason"])
                for r in cnnops.explain(conv, x.clone().requires_grad_(), train=True)] == [
            ("conv2d", "winograd", FORCED), ("conv2d_backward", "winograd", FORCED)]
        # stride 2: its forward; the backward's input gradient is not a stride-1 convolution
        strided = cnnops.FusedConvBNReLU(4, 6, 3, stride=2, padding=1)
        assert [(r["call"].split()[0], r["core"], r["reason"])
                for r in cnnops.explain(strided, x)] == [("conv_bn_relu", "winograd", FORCED)]
        for model, grad_input in [(fused, False),  # (a first layer: no input gradient)
                                  (cnnops.FusedConvBNReLU(4, 6, 3, padding=3), True),
                                  (strided, True)]:
            rows = cnnops.explain(model, x.clone().requires_grad_(grad_input), train=True)
            assert [(r["call"].split()[0], r["core"]) for r in rows] == [
                ("conv_bn_relu", "winograd"), ("conv_bn_relu_backward", "im2col")], rows
            assert rows[1]["reason"].startswith(others), rows
        # convolutions it has no kernel for run on im2col and say why
        for model, train in [(cnnops.FusedConvBNReLU(4, 6, 1), False),
                             (cnnops.FusedConvBNReLU(4, 6, 3, stride=3, padding=1), False),
                             (cnnops.FusedConvBNReLU(4, 6, 3, padding=2, dilation=2), False),
                             (cnnops.FusedConvBNReLU(4, 6, 3, padding=1, groups=2), False)]:
            rows = cnnops.explain(model, x.clone().requires_grad_(train), train=train)
            assert rows and all(r["core"] == "im2col" and r["reason"].startswith(others)
                                for r in rows), rows
        # bfloat16 runs on oneDNN, the only core for it
        rows = cnnops.explain(cnnops.FusedConvBNReLU(4, 6, 3, padding=1).to(torch.bfloat16),
                              x.to(torch.bfloat16))
        assert [(r["core"], r["reason"].startswith(others)) for r in rows] == [("onednn", True)]


def test_auto_measures_winograd_where_it_runs():
    """auto times winograd with the other cores for a 3x3 stride-1 call (float32: three
    cores; float64: im2col and winograd): inference, and in training the forward and the
    backward that takes the input gradient; at stride 2, the forward."""
    torch.manual_seed(7)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("auto"):
        fused = cnnops.FusedConvBNReLU(5, 7, 3, padding=1)
        x = torch.randn(1, 5, 13, 17)
        (row,) = cnnops.explain(fused, x)
        assert row["reason"].startswith("measured: im2col ") and ", onednn " in row["reason"] \
            and ", winograd " in row["reason"], row
        (row,) = cnnops.explain(fused.double(), x.double())
        assert row["reason"].startswith("measured: im2col ") and ", winograd " in row["reason"] \
            and "onednn" not in row["reason"], row
        rows = cnnops.explain(fused.float(), x.clone().requires_grad_(), train=True)
        assert [r["call"].split()[0] for r in rows] == ["conv_bn_relu", "conv_bn_relu_backward"]
        assert all(", winograd " in r["reason"] for r in rows), rows
        rows = cnnops.explain(fused.float(), x, train=True)  # no input gradient
        assert ", winograd " in rows[0]["reason"] and "winograd" not in rows[1]["reason"], rows
        strided = cnnops.FusedConvBNReLU(5, 7, 3, stride=2, padding=1)
        rows = cnnops.explain(strided, x.clone().requires_grad_(), train=True)
        assert ", winograd " in rows[0]["reason"] and "winograd" not in rows[1]["reason"], rows

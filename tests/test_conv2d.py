"""conv2d and conv2d_relu on every backend against torch.nn.functional.conv2d, forward and
backward: the CPU entries on the CPU grids, the GPU entries (`cuda`, `triton-cuda`) on the GPU
grids, float16/bfloat16 included (conftest.py)."""
import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import (CPU_BACKENDS, DTYPES, GPU_CONV_CONFIGS, GPU_DTYPES, TILE_CONFIGS, LAYOUTS,
                      DRY_RUN, assert_close, axis, conv_cores, conv_id, expected_memory_format,
                      gpu_conv_tensors, grad_names, grads, grid, make_input, needs_cuda, on_gpu,
                      per_device)

# (in_channels, out_channels, kernel, stride, padding, dilation, groups, H, W)
CONFIGS = [
    (3, 4, 3, 1, 0, 1, 1, 7, 9),
    (3, 4, 3, 1, 1, 1, 1, 7, 9),
    (4, 6, 3, 2, 1, 1, 2, 9, 8),
    (4, 4, 3, 1, 1, 1, 4, 6, 6),           # depthwise
    (2, 3, (3, 1), (2, 1), (1, 0), 1, 1, 7, 5),
    (2, 3, (1, 5), 1, (0, 2), 1, 1, 5, 9),
    (3, 5, 3, 1, 2, 2, 1, 8, 8),           # dilated
    (3, 2, 2, 2, 0, 1, 1, 8, 7),           # even kernel
    (6, 4, 1, 1, 0, 1, 1, 5, 5),           # pointwise: no im2col
    (6, 4, 1, 2, 0, 1, 2, 5, 5),           # strided 1x1
    (3, 4, 7, 2, 3, 1, 1, 16, 16),         # ResNet stem
    (2, 2, 3, 3, 1, (2, 1), 1, 10, 7),
    (2, 3, 5, 1, 0, 1, 1, 5, 5),           # output 1x1
    (2, 3, 3, 1, "same", 1, 1, 6, 7),
    (2, 3, (2, 4), 1, "same", (1, 2), 1, 6, 7),  # asymmetric 'same'
    (2, 3, 3, 1, "valid", 1, 1, 6, 7),
    (2, 3, 5, 1, 2, 1, 1, 1, 1),           # padding reaches past the whole output row
    (2, 3, (7, 9), 1, (3, 4), 1, 1, 2, 3),
]


def _ids(c):
    return "C%s-OC%s-k%s-s%s-p%s-d%s-g%s-%sx%s" % c


@per_device(
    cpu=grid(axis("config", CONFIGS, _ids), axis("bias", [True, False], ["bias", "nobias"]),
             axis("layout", LAYOUTS), axis("dtype", DTYPES, str)),
    gpu=grid(axis("config", GPU_CONV_CONFIGS, conv_id), axis("dtype", GPU_DTYPES, str),
             axis("layout", LAYOUTS), axis("bias", [True, False], ["bias", "no-bias"])),
    conv=True)
def test_conv2d_matches_torch(backend, config, bias, layout, dtype):
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = (k, k) if isinstance(k, int) else k
    torch.manual_seed(0)
    if backend.gpu:  # 3 images, the weight scaled by 1/sqrt(fan-in)
        x, w, b, _ = gpu_conv_tensors(config, dtype, layout, bias, device=backend.device)
    else:
        x = make_input((2, C, H, W), layout, dtype, requires_grad=True)
        w = make_input((OC, C // groups, kh, kw), "contiguous", dtype, requires_grad=True)
        b = torch.randn(OC, dtype=dtype, requires_grad=True) if bias else None
    args = (stride, padding, dilation, groups)
    actual = backend.run_pair(lambda x, w, b: CF.conv2d(x, w, b, *args),
                              lambda x, w, b: F.conv2d(x, w, b, *args), [x, w, b], dtype,
                              names=grad_names(input=x, weight=w, bias=b))
    assert actual.dtype == dtype
    if backend != "reference" and padding != "same":  # 'same' may pad (copy) the input first
        assert actual.is_contiguous(memory_format=expected_memory_format(x))


@on_gpu(axis("layout", ["contiguous", "channels_last"]),
        axis("grad_layout", ["contiguous", "channels_last"]))
def test_conv2d_gradient_in_another_layout(backend, layout, grad_layout):
    """The output gradient may arrive in a layout other than the output's."""
    torch.manual_seed(1)
    x, w, b, args = gpu_conv_tensors(GPU_CONV_CONFIGS[1], torch.float32, layout, True,
                                     device=backend.device)
    fmt = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    backend.run_pair(lambda x, w, b: CF.conv2d(x, w, b, *args),
                     lambda x, w, b: F.conv2d(x, w, b, *args), [x, w, b], torch.float32,
                     grad_format=fmt)


@on_gpu(axis("dtype", [d for d in (torch.float32, torch.bfloat16) if d in GPU_DTYPES], str),
        axis("layout", ["contiguous", "channels_last"]))
def test_conv2d_large_batch(backend, layout, dtype):
    """100 images of 64x64x64: the weight gradient sums 409600 positions (split across blocks
    and, in the Triton kernel, across fixed chunks): the splits must not show."""
    torch.manual_seed(3)
    N = 8 if DRY_RUN else 100
    x = backend.make((N, 64, 64, 64), dtype, layout, grad=True)
    w = backend.make((64, 64, 3, 3), dtype, grad=True, scale=1 / 24)
    b = backend.make((64,), dtype, grad=True)
    backend.run_pair(lambda x, w, b: CF.conv2d(x, w, b, 1, 1),
                     lambda x, w, b: F.conv2d(x, w, b, 1, 1), [x, w, b], dtype,
                     names=["input", "weight", "bias"])


@needs_cuda
@pytest.mark.skipif(DRY_RUN or not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
@on_gpu()
def test_ops_run_on_the_inputs_device(backend):
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


# (input shape, input layout, weight shape): convolutions whose weight is channels_last
# (a model moved with .to(memory_format=torch.channels_last)), so that PyTorch returns a
# channels_last output even where the input is NCHW.
WEIGHT_LAYOUT_CASES = [
    ((2, 1, 7, 7), "contiguous", (4, 1, 3, 3)),   # a first layer: one channel reads as both
    ((2, 3, 7, 7), "contiguous", (4, 3, 3, 3)),
    ((2, 3, 5, 5), "contiguous", (4, 3, 1, 1)),   # 1x1: the weight reads as both layouts
    ((2, 3, 7, 7), "channels_last", (4, 3, 3, 3)),
]


@conv_cores
@pytest.mark.parametrize("case", WEIGHT_LAYOUT_CASES,
                         ids=["C1", "nchw", "nchw-1x1", "channels_last"])
def test_conv_layout_follows_a_channels_last_weight(backend, case):
    shape, layout, wshape = case
    torch.manual_seed(0)
    x = make_input(shape, layout, torch.float32, requires_grad=True)
    conv = torch.nn.Conv2d(wshape[1], wshape[0], wshape[2:], padding=1)
    conv = conv.to(memory_format=torch.channels_last)
    w, b = conv.weight, conv.bias
    ones, zeros = torch.ones(wshape[0]), torch.zeros(wshape[0])
    expected = F.conv2d(x, w, b, 1, 1)
    # PyTorch's rule, which cnnops follows: channels_last here in every case
    assert not expected.is_contiguous()
    assert expected.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(expected)
    for name, actual, relu in (
            ("conv2d", CF.conv2d(x, w, b, 1, 1), False),
            ("conv2d_relu", CF.conv2d_relu(x, w, b, 1, 1), True),
            ("conv_bn_relu", CF.conv_bn_relu(x, w, b, ones, zeros, zeros, ones, 1, 1, eps=0.0),
             True)):
        reference = F.conv2d(x, w, b, 1, 1)
        reference = reference.relu() if relu else reference
        assert_close(actual, reference)
        if backend != "reference":
            assert actual.is_contiguous(memory_format=torch.channels_last), (name, actual.stride())
        got = grads(actual, (x, w, b), g)
        assert_close_all(got, grads(reference, (x, w, b), g))
        if backend != "reference":
            # the weight's gradient in the weight's layout, so that it reaches .grad uncopied
            assert got[1].is_contiguous(memory_format=torch.channels_last), (name, got[1].stride())


def assert_close_all(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@conv_cores
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["input-only", "weight-only"])
def test_conv2d_partial_gradients(backend, needs):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=needs[0])
    w = torch.randn(4, 3, 3, 3, requires_grad=needs[1])
    out = CF.conv2d(x, w, None, 1, 1)
    ref = F.conv2d(x, w, None, 1, 1)
    wrt = [t for t in (x, w) if t.requires_grad]
    g = torch.randn_like(ref)
    assert_close_all(grads(out, wrt, g), grads(ref, wrt, g))


@conv_cores
def test_conv2d_empty_batch(backend):
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = CF.conv2d(x, w, b, padding=1)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_conv2d_batch_larger_than_threads(backend):
    # More images than threads: each thread takes a chunk with its own buffers.
    torch.manual_seed(0)
    x = torch.randn(7, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out, ref = CF.conv2d(x, w, stride=2, padding=1), F.conv2d(x, w, stride=2, padding=1)
    g = torch.randn_like(ref)
    assert_close(out, ref)
    assert_close_all(grads(out, (x, w), g), grads(ref, (x, w), g))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("config", TILE_CONFIGS, ids=lambda c: "N%s-C%s-OC%s-k%s-s%s-p%s-g%s-%sx%s" % c)
def test_cpu_conv_tiles_match_torch(config):
    N, C, OC, k, stride, padding, groups, H, W = config
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OC, C // groups, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OC, dtype=torch.float64, requires_grad=True)
    with cnnops.use_backend("cpu"):
        out = CF.conv2d(x, w, b, stride, padding, 1, groups)
    ref = F.conv2d(x, w, b, stride, padding, 1, groups)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    assert_close_all(grads(out, (x, w, b), g), grads(ref, (x, w, b), g))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("config", [
    # (N, C, OC, kernel, stride, padding, dilation, H, W): outputs of 16 positions or fewer,
    # which im2col and col2im copy through a tap table
    (2, 6, 5, (3, 2), (1, 2), (1, 0), 1, 4, 5),
    (3, 4, 6, 3, 1, 1, 2, 4, 4),
    (2, 5, 4, 5, 1, 2, 1, 3, 3),
    (1, 3, 4, 2, 2, 0, 1, 5, 3),
], ids=str)
def test_cpu_conv_small_images_match_torch(config):
    N, C, OC, k, stride, padding, dilation, H, W = config
    kh, kw = (k, k) if isinstance(k, int) else k
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OC, C, kh, kw, dtype=torch.float64, requires_grad=True)
    with cnnops.use_backend("cpu"):
        out = CF.conv2d(x, w, None, stride, padding, dilation)
    ref = F.conv2d(x, w, None, stride, padding, dilation)
    assert 0 < ref.shape[2] * ref.shape[3] <= 16
    assert_close(out, ref)
    g = torch.randn_like(ref)
    assert_close_all(grads(out, (x, w), g), grads(ref, (x, w), g))


@per_device(
    cpu=grid(axis("config", CONFIGS[::3], _ids), axis("residual", [False, True],
                                                      ["plain", "residual"]),
             axis("layout", LAYOUTS), axis("dtype", DTYPES, str)),
    gpu=grid(axis("config", GPU_CONV_CONFIGS[:4] + GPU_CONV_CONFIGS[6:8], conv_id),
             axis("dtype", GPU_DTYPES, str), axis("layout", LAYOUTS),
             axis("residual", [True, False], ["residual", "no-residual"])),
    conv=True)
def test_conv2d_relu_matches_torch(backend, config, residual, layout, dtype):
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = (k, k) if isinstance(k, int) else k
    if backend.gpu:  # 3 images, the weight scaled by 1/sqrt(fan-in)
        torch.manual_seed(2)
        x, w, b, _ = gpu_conv_tensors(config, dtype, layout, True, device=backend.device)
    else:
        torch.manual_seed(0)
        x = make_input((2, C, H, W), layout, dtype, requires_grad=True)
        w = make_input((OC, C // groups, kh, kw), "contiguous", dtype, requires_grad=True)
        b = torch.randn(OC, dtype=dtype, requires_grad=True)
    args = (stride, padding, dilation, groups)
    shape = F.conv2d(x.detach().float(), w.detach().float(), None, *args).shape
    r = None
    if residual:
        r = backend.make(shape, dtype, layout, grad=True) if backend.gpu else \
            make_input(tuple(shape), layout, dtype, requires_grad=True)

    def reference(x, w, b, r):
        y = F.conv2d(x, w, b, *args)
        return y + r if r is not None else y

    actual = backend.run_pair(lambda x, w, b, r: CF.conv2d_relu(x, w, b, *args, residual=r),
                              reference, [x, w, b, r], dtype, relu=True,
                              names=grad_names(input=x, weight=w, bias=b, residual=r))
    if backend.gpu:
        assert actual.is_contiguous(memory_format=expected_memory_format(x))


@conv_cores
def test_apply_conv_relu_uses_module_settings(backend):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", groups=1)
    x = torch.randn(2, 3, 5, 5)
    assert_close(cnnops.nn.apply_conv_relu(conv, x), F.relu(conv(x)))

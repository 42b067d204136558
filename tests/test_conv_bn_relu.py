"""conv_bn_relu and FusedConvBNReLU against conv -> BatchNorm -> (+residual) -> ReLU in torch."""
import copy

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import (CPU_BACKENDS, DTYPES, TILE_CONFIGS, LAYOUTS, assert_close, conv_cores,
                      expected_memory_format, grads, make_input)

# (in_channels, out_channels, kernel, stride, padding, dilation, groups, H, W)
CONFIGS = [
    (3, 4, 3, 1, 1, 1, 1, 6, 7),
    (4, 6, 3, 2, 1, 1, 2, 7, 7),
    (4, 4, 3, 1, 1, 1, 4, 5, 5),
    (6, 4, 1, 1, 0, 1, 1, 5, 6),
    (3, 5, (3, 1), (1, 2), (1, 0), 2, 1, 8, 6),
    (3, 4, 7, 2, 3, 1, 1, 11, 11),
]


def _torch_cbr(x, w, cb, bw, bb, rm, rv, stride, padding, dilation, groups, training, eps, relu, r):
    y = F.batch_norm(F.conv2d(x, w, cb, stride, padding, dilation, groups), rm, rv, bw, bb,
                     training, 0.1, eps)
    if r is not None:
        y = y + r
    return F.relu(y) if relu else y


@conv_cores
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["plain", "conv-bias", "residual", "no-relu", "no-affine"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "C%s-OC%s-k%s-s%s-p%s-d%s-g%s-%sx%s" % c)
def test_conv_bn_relu_matches_torch(backend, config, variant, training, layout, dtype):
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = (k, k) if isinstance(k, int) else k
    torch.manual_seed(0)
    x = make_input((3, C, H, W), layout, dtype, requires_grad=True)
    w = make_input((OC, C // groups, kh, kw), "contiguous", dtype, requires_grad=True)
    cb = torch.randn(OC, dtype=dtype, requires_grad=True) if variant == "conv-bias" else None
    affine = variant != "no-affine"
    bw = (torch.rand(OC, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bb = torch.randn(OC, dtype=dtype, requires_grad=True) if affine else None
    rm, rv = torch.randn(OC, dtype=dtype), torch.rand(OC, dtype=dtype) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    relu = variant != "no-relu"
    out_shape = F.conv2d(x.detach(), w.detach(), None, stride, padding, dilation, groups).shape
    r = make_input(tuple(out_shape), layout, dtype, requires_grad=True) \
        if variant == "residual" else None
    expected = _torch_cbr(x, w, cb, bw, bb, rm, rv, stride, padding, dilation, groups, training,
                          1e-5, relu, r)

    actual = CF.conv_bn_relu(x, w, cb, bw, bb, rm2, rv2, stride, padding, dilation, groups,
                             training, 0.1, 1e-5, relu, r)
    assert_close(actual, expected)
    if backend != "reference":
        assert actual.is_contiguous(memory_format=expected_memory_format(x))
    assert_close(rm2, rm)
    assert_close(rv2, rv)
    g = torch.randn_like(expected)
    wrt = (x, w, cb, bw, bb, r)
    for a, e in zip(grads(actual, wrt, g), grads(expected, wrt, g)):
        assert_close(a, e)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("config", [c for c in TILE_CONFIGS if c[6] == 1],
                         ids=lambda c: "N%s-C%s-OC%s-k%s-s%s-p%s-g%s-%sx%s" % c)
def test_cpu_tiles_merge_batch_statistics(config):
    # Batch statistics are merged over the CPU kernel's position tiles and image chunks, and the
    # backward's BN gradient is formed tile by tile: both must match torch at any tiling.
    N, C, OC, k, stride, padding, _, H, W = config
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OC, C, k, k, dtype=torch.float64, requires_grad=True)
    bw = torch.rand(OC, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(OC, dtype=torch.float64, requires_grad=True)
    r = torch.randn(F.conv2d(x, w, None, stride, padding).shape, dtype=torch.float64,
                    requires_grad=True)
    rm, rv = torch.zeros(OC, dtype=torch.float64), torch.ones(OC, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    with cnnops.use_backend("cpu"):
        out = CF.conv_bn_relu(x, w, None, bw, bb, rm, rv, residual=r, stride=stride,
                              padding=padding, training=True)
    ref = _torch_cbr(x, w, None, bw, bb, rm2, rv2, stride, padding, 1, 1, True, 1e-5, True, r)
    assert_close(out, ref)
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    g = torch.randn_like(ref)
    leaves = (x, w, bw, bb, r)
    for a, e in zip(grads(out, leaves, g), grads(ref, leaves, g)):
        assert_close(a, e)


@conv_cores
def test_eval_mode_trains_bn_affine_with_frozen_statistics(backend):
    # Eval mode with trainable BN affine: the op recomputes the conv output for bn_weight's gradient.
    # (float32 on the oneDNN core, which has no float64 convolution)
    dtype = torch.float32 if backend == "cpu-onednn" else torch.float64
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=True)
    cb, bw, bb = (torch.randn(4, dtype=dtype, requires_grad=True) for _ in range(3))
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    actual = CF.conv_bn_relu(x, w, cb, bw, bb, rm, rv, padding=1, training=False)
    expected = _torch_cbr(x, w, cb, bw, bb, rm, rv, 1, 1, 1, 1, False, 1e-5, True, None)
    g = torch.randn_like(expected)
    for a, e in zip(grads(actual, (x, w, cb, bw, bb), g), grads(expected, (x, w, cb, bw, bb), g)):
        assert_close(a, e)


def _twin(in_c, out_c, k, stride, padding, bias, groups=1):
    conv = torch.nn.Conv2d(in_c, out_c, k, stride, padding, groups=groups, bias=bias)
    bn = torch.nn.BatchNorm2d(out_c)
    return conv, bn


@conv_cores
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_module_matches_sequence_over_steps(backend, bias):
    """Three training steps with SGD, then eval: outputs, gradients, parameters and buffers."""
    torch.manual_seed(0)
    conv, bn = _twin(3, 8, 3, 2, 1, bias)
    ref = torch.nn.Sequential(conv, bn, torch.nn.ReLU())
    fused = cnnops.FusedConvBNReLU(3, 8, 3, stride=2, padding=1, bias=bias)
    fused.load_state_dict({"conv." + k[2:] if k.startswith("0.") else "bn." + k[2:]: v
                           for k, v in ref.state_dict().items()})
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 3, 9, 9)
        ya, yb = fused(x), ref(x)
        assert_close(ya, yb)
        for opt, y in ((opt_fused, ya), (opt_ref, yb)):
            opt.zero_grad()
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            opt.step()
    fused_sd, ref_sd = fused.state_dict(), ref.state_dict()
    assert_close(fused_sd["conv.weight"], ref_sd["0.weight"])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert_close(fused_sd["bn." + name], ref_sd["1." + name])
    assert int(fused_sd["bn.num_batches_tracked"]) == int(ref_sd["1.num_batches_tracked"]) == 3
    fused.eval()
    ref.eval()
    x = torch.randn(2, 3, 9, 9)
    assert_close(fused(x), ref(x))


@conv_cores
def test_from_modules_shares_parameters(backend):
    torch.manual_seed(0)
    conv, bn = _twin(3, 4, 3, 1, 1, False)
    fused = cnnops.FusedConvBNReLU.from_modules(conv, bn, relu=True)
    assert fused.conv is conv and fused.bn is bn
    assert fused.conv.weight.data_ptr() == conv.weight.data_ptr()
    x = torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(torch.nn.Sequential(conv, bn, torch.nn.ReLU()))
    out = fused(x)
    assert_close(out, reference(x))
    assert int(bn.num_batches_tracked) == 1  # the shared BN saw the batch
    assert_close(bn.running_mean, reference[1].running_mean)


@conv_cores
def test_fused_module_residual_and_no_relu(backend):
    torch.manual_seed(0)
    conv, bn = _twin(4, 4, 3, 1, 1, False)
    fused = cnnops.FusedConvBNReLU.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=False)
    x = torch.randn(2, 4, 6, 6)
    identity = torch.randn(2, 4, 6, 6)
    assert_close(fused(x, identity), bn(conv(x)) + identity)


def test_fused_module_state_dict_round_trip():
    torch.manual_seed(0)
    fused = cnnops.FusedConvBNReLU(3, 4, 3, padding=1, bias=True)
    plain = torch.nn.Module()
    plain.conv, plain.bn = _twin(3, 4, 3, 1, 1, True)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(plain.state_dict(), strict=True)


@conv_cores
def test_padding_modes_and_bn_variants(backend):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    bn = torch.nn.BatchNorm2d(4, track_running_stats=False, affine=False)
    fused = cnnops.FusedConvBNReLU.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    x = torch.randn(2, 3, 6, 6)
    assert_close(fused(x), torch.relu(bn(conv(x))))
    fused.eval()
    bn.eval()
    assert_close(fused(x), torch.relu(bn(conv(x))))  # no running stats: batch statistics


@conv_cores
def test_bnrelu_module_and_apply_helpers(backend):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    mod = cnnops.nn.BNReLU(4)
    mod.load_state_dict(bn.state_dict())
    x, r = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert_close(mod(x, r), torch.relu(bn(x) + r))
    assert_close(mod.running_var, bn.running_var)
    conv = torch.nn.Conv2d(4, 4, 1)
    bn2 = copy.deepcopy(bn)
    out = cnnops.nn.apply_conv_bn_relu(conv, bn2, x, residual=r)
    assert_close(out, torch.relu(bn(conv(x)) + r))
    assert_close(bn2.running_mean, bn.running_mean)

"""conv_bn_relu and FusedConvBNReLU against conv -> BatchNorm -> (+residual) -> ReLU in torch:
the CPU entries on the CPU grids, the GPU entries (`cuda`, `triton-cuda`) on the GPU grids,
float16/bfloat16 included (conftest.py). The last section holds the GPU behaviour of every op:
the cuda backend's inference paths, empty batches, determinism, streams and autocast."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import (CPU_BACKENDS, DRY_RUN, DTYPES, GPU_BN_CASES, GPU_CONV_CONFIGS, GPU_DTYPES,
                      HALF, TILE_CONFIGS, LAYOUTS, assert_close, axis, bn_case_id, check, const,
                      conv_cores, conv_id, expected_memory_format, gpu_bn_tensors,
                      gpu_conv_tensors, grad_names, grads, grid, make_input, needs_cuda, on_gpu,
                      make, per_device, ref_dtype, run_pair, to_ref, OpRecorder)

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


VARIANTS = ["plain", "conv-bias", "residual", "no-relu", "no-affine"]


@per_device(
    cpu=grid(axis("config", CONFIGS, conv_id), axis("variant", VARIANTS),
             axis("training", [True, False], ["train", "eval"]), axis("layout", LAYOUTS),
             axis("dtype", DTYPES, str), const(mixed=False)),
    gpu=grid(axis("config", [GPU_CONV_CONFIGS[i] for i in (0, 1, 2, 3, 5, 9)], conv_id),
             axis("dtype,mixed", GPU_BN_CASES, bn_case_id), axis("layout", LAYOUTS),
             axis("training", [True, False], ["train", "eval"]), axis("variant", VARIANTS)),
    conv=True)
def test_conv_bn_relu_matches_torch(backend, config, variant, training, layout, dtype, mixed):
    """Forward, backward (in eval too: the BN affine parameters train with frozen statistics)
    and running statistics against conv2d -> batch_norm -> (+ residual) -> relu. GPU grid:
    float32 BN tensors with a half input when `mixed`."""
    C, OC, k, stride, padding, dilation, groups, H, W = config
    kh, kw = (k, k) if isinstance(k, int) else k
    affine = variant != "no-affine"
    if backend.gpu:  # 3 images, the weight scaled by 1/sqrt(fan-in)
        torch.manual_seed(7)
        x, w, cb, _ = gpu_conv_tensors(config, dtype, layout, variant == "conv-bias",
                                       device=backend.device)
        bw, bb, rm, rv = gpu_bn_tensors(OC, dtype, affine, mixed, device=backend.device)
        rm_ref, rv_ref = to_ref(rm, ref_dtype(rm.dtype)), to_ref(rv, ref_dtype(rv.dtype))
    else:
        torch.manual_seed(0)
        x = make_input((3, C, H, W), layout, dtype, requires_grad=True)
        w = make_input((OC, C // groups, kh, kw), "contiguous", dtype, requires_grad=True)
        cb = torch.randn(OC, dtype=dtype, requires_grad=True) if variant == "conv-bias" else None
        bw = (torch.rand(OC, dtype=dtype) + 0.5).requires_grad_() if affine else None
        bb = torch.randn(OC, dtype=dtype, requires_grad=True) if affine else None
        rm_ref, rv_ref = torch.randn(OC, dtype=dtype), torch.rand(OC, dtype=dtype) + 0.5
        rm, rv = rm_ref.clone(), rv_ref.clone()
    relu = variant != "no-relu"
    args = (stride, padding, dilation, groups)
    shape = F.conv2d(x.detach().float(), w.detach().float(), None, *args).shape
    r = None
    if variant == "residual":
        r = backend.make(shape, dtype, layout, grad=True) if backend.gpu else \
            make_input(tuple(shape), layout, dtype, requires_grad=True)

    def ours(x, w, cb, bw, bb, r):
        return CF.conv_bn_relu(x, w, cb, bw, bb, rm, rv, *args, training, 0.1, 1e-5, relu, r)

    def reference(x, w, cb, bw, bb, r):
        return _torch_cbr(x, w, cb, bw, bb, rm_ref, rv_ref, *args, training, 1e-5, False, r)

    actual = backend.run_pair(ours, reference, [x, w, cb, bw, bb, r], dtype, relu=relu,
                              names=grad_names(input=x, weight=w, conv_bias=cb, bn_weight=bw,
                                               bn_bias=bb, residual=r))
    assert actual.dtype == dtype
    if backend != "reference":
        assert actual.is_contiguous(memory_format=expected_memory_format(x))
    backend.check(rm, rm_ref, dtype, "running_mean")
    backend.check(rv, rv_ref, dtype, "running_var")


@on_gpu(axis("layout", ["contiguous", "channels_last"]),
        axis("training", [True, False], ["train", "eval"]))
def test_conv_bn_relu_weight_gradient_only(backend, layout, training):
    """Frozen input (no input gradient), BN weight only: the backward skips what is not
    asked for and still gets the rest right."""
    torch.manual_seed(8)
    x, w, _, args = gpu_conv_tensors(GPU_CONV_CONFIGS[0], torch.float32, layout, False,
                                     grad=False, device=backend.device)
    w.requires_grad_()
    bw, bb, rm, rv = gpu_bn_tensors(w.shape[0], torch.float32, True, False, grad=False,
                                    device=backend.device)
    bw.requires_grad_()
    backend.run_pair(lambda w, bw: CF.conv_bn_relu(x, w, None, bw, bb, rm.clone(), rv.clone(),
                                                   *args, training=training),
                     lambda w, bw: F.batch_norm(F.conv2d(x, w, None, *args), rm.clone(),
                                                rv.clone(), bw, bb, training),
                     [w, bw], torch.float32, relu=True, names=["weight", "bn_weight"])


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


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
def test_backward_fills_no_gradient_for_outputs_without_one():
    """The ops' extra outputs (batch statistics, max-pool indices, conv_bn_relu's saved conv
    output) have no gradient: their nodes' backward gets them undefined, not as zeros made
    every step (an activation-sized fill for the conv output). A node reached with no
    gradient for its output gives none to its inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(cnnops.FusedConvBNReLU(3, 4, 3, padding=1), cnnops.nn.BNReLU(4),
                                cnnops.nn.MaxPool2d(2)).train()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with cnnops.use_backend("cpu"):
        model(x).sum().backward()  # (the core choice's first-call runs, outside the profile)
        with torch.profiler.profile() as prof:
            model(x).sum().backward()
    nodes = [e for e in prof.events() if e.name.startswith("torch::autograd::CppNode<cnnops::")]
    assert sorted({e.name for e in nodes}) == [
        "torch::autograd::CppNode<cnnops::BnReluBackward>",
        "torch::autograd::CppNode<cnnops::ConvBnReluBackward>",
        "torch::autograd::CppNode<cnnops::MaxPool2dBackward>"]
    fills = [e.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zeros_like") and e.cpu_parent in nodes]
    assert fills == []

    class GradientForTheSecondOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return b * 1.0

        @staticmethod
        def backward(ctx, g):
            return None, g

    x.grad = None
    b = torch.ones(3, requires_grad=True)
    with cnnops.use_backend("cpu"):
        GradientForTheSecondOnly.apply(model(x), b).sum().backward()
    assert x.grad is None and model[0].conv.weight.grad is not None  # (from the first backward)
    assert_close(b.grad, torch.ones(3))


def _into_residual_case(dtype, layout, relu, conv_bias):
    torch.manual_seed(5)
    x = make_input((2, 6, 7, 6), layout, dtype=dtype)
    w = torch.randn(8, 3, 3, 3, dtype=dtype)                     # groups=2, stride 2
    cb = torch.randn(8, dtype=dtype) if conv_bias else None
    bw, bb, rm = (torch.randn(8, dtype=dtype) for _ in range(3))
    rv = torch.rand(8, dtype=dtype) + 0.5
    r = make_input((2, 8, 4, 3), layout, dtype=dtype)
    geometry = ([2, 2], [1, 1], [1, 1], 2)
    return (x, w, cb, bw, bb, rm, rv), r, geometry


def _inference_cases(test):
    """The inference-only ops' cases: each core with each dtype it runs, each layout."""
    cases = [(core, dtype) for core in ("im2col", "onednn", "auto")
             for dtype in (torch.float32, torch.float64, torch.bfloat16)
             if (core, dtype) not in (("im2col", torch.bfloat16), ("onednn", torch.float64))]
    test = pytest.mark.parametrize("layout", ["contiguous", "channels_last"])(test)
    test = pytest.mark.parametrize("core,dtype", cases,
                                   ids=lambda v: str(v).replace("torch.", ""))(test)
    return pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")(test)


@_inference_cases
@pytest.mark.parametrize("relu,conv_bias", [(True, False), (False, True)],
                         ids=["relu", "conv_bias-no_relu"])
def test_conv_bn_relu_into_residual_matches_the_op(core, dtype, layout, relu, conv_bias):
    """cnnops::conv_bn_relu_into_residual writes inference conv_bn_relu(..., residual) into
    the residual's own memory, on each core and layout: in auto mode the configuration's
    first call (the core measured on runs that leave the residual alone) and the calls
    after it."""
    (x, w, cb, bw, bb, rm, rv), r, geometry = _into_residual_case(dtype, layout, relu,
                                                                  conv_bias)
    with cnnops.use_cpu_conv(core), torch.no_grad():
        for call in range(3):
            x_before = x.clone()
            out = r.clone()
            address, strides = out.data_ptr(), out.stride()
            torch.ops.cnnops.conv_bn_relu_into_residual(out, x, w, cb, bw, bb, rm, rv,
                                                        *geometry, 1e-5, relu)
            want = torch.ops.cnnops.conv_bn_relu(x, w, cb, bw, bb, rm, rv, r, *geometry,
                                                 False, 1e-5, relu)[0]
            assert (out.data_ptr(), out.stride()) == (address, strides)
            # (bfloat16: both round the same float32 result once; oneDNN's in-place sum
            # may differ from its out-of-place binary post-op by that rounding)
            assert_close(out, want, torch.float32 if dtype == torch.bfloat16 else dtype,
                         **(dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}))
            assert torch.equal(x, x_before)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
def test_conv_bn_relu_into_residual_refuses_what_it_cannot_do():
    """A residual of another shape or dtype, or sharing the input's memory, is an error
    before anything is written; so is a gradient asked through it (inference only)."""
    (x, w, cb, bw, bb, rm, rv), r, geometry = _into_residual_case(torch.float32, "contiguous",
                                                                  True, False)
    op = torch.ops.cnnops.conv_bn_relu_into_residual
    for bad, match in [(r[:, :4].clone(), "shape"), (r.double(), "dtype|float")]:
        before = bad.clone()
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            op(bad, x, w, cb, bw, bb, rm, rv, *geometry, 1e-5, True)
        assert torch.equal(bad, before)
    square = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="shares memory"):
        op(square, square, torch.randn(8, 8, 1, 1), None, bw, bb, rm, rv, [1, 1], [0, 0],
           [1, 1], 1, 1e-5, True)
    w.requires_grad_(True)
    out = r.clone()
    with pytest.raises(RuntimeError, match="inference only"):
        op(out, x, w, cb, bw, bb, rm, rv, *geometry, 1e-5, True)
    assert torch.equal(out, r)
    with torch.no_grad():
        op(out, x, w, cb, bw, bb, rm, rv, *geometry, 1e-5, True)
    assert out._version == r.clone()._version + 1


@_inference_cases
@pytest.mark.parametrize("relu,conv_bias,residual", [(True, False, True), (False, True, False)],
                         ids=["relu-residual", "conv_bias-no_relu"])
def test_conv_bn_relu_inference_is_the_op_s_output(core, dtype, layout, relu, conv_bias,
                                                    residual):
    """cnnops::conv_bn_relu_inference returns inference conv_bn_relu's output, the same
    values in the same layout, on each core (auto: the configuration's first call, which
    measures the cores, and the calls after it)."""
    (x, w, cb, bw, bb, rm, rv), r, geometry = _into_residual_case(dtype, layout, relu,
                                                                  conv_bias)
    r = r if residual else None
    with cnnops.use_cpu_conv(core), torch.no_grad():
        for call in range(3):
            out = torch.ops.cnnops.conv_bn_relu_inference(x, w, cb, bw, bb, rm, rv, r,
                                                          *geometry, 1e-5, relu)
            want = torch.ops.cnnops.conv_bn_relu(x, w, cb, bw, bb, rm, rv, r, *geometry,
                                                 False, 1e-5, relu)[0]
            assert out.dtype == want.dtype and out.stride() == want.stride(), call
            assert torch.equal(out, want), call


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
def test_conv_bn_relu_inference_refuses_autograd_and_bad_arguments():
    """Where autograd would record it, an error that names the op to use; a residual of
    another shape or a BN vector of another length, the errors conv_bn_relu raises."""
    (x, w, cb, bw, bb, rm, rv), r, geometry = _into_residual_case(torch.float32, "contiguous",
                                                                  True, False)
    op = torch.ops.cnnops.conv_bn_relu_inference
    with pytest.raises(ValueError, match="shape"):
        op(x, w, cb, bw, bb, rm, rv, r[:, :4], *geometry, 1e-5, True)
    with pytest.raises((ValueError, RuntimeError), match="running_mean"):
        op(x, w, cb, bw, bb, rm[:5], rv, r, *geometry, 1e-5, True)
    w.requires_grad_(True)
    with pytest.raises(RuntimeError, match="conv_bn_relu_inference is inference only"):
        op(x, w, cb, bw, bb, rm, rv, r, *geometry, 1e-5, True)
    with torch.no_grad():
        op(x, w, cb, bw, bb, rm, rv, r, *geometry, 1e-5, True)


def _cnnops_calls(module, *args, context=contextlib.nullcontext):
    """module(*args) inside context -> (output, the cnnops ops it dispatched and how often)."""
    recorder = OpRecorder()
    with context(), recorder:
        out = module(*args)
    return out, {k[len("cnnops::"):]: n for k, n in recorder.calls.items()
                 if k.startswith("cnnops::")}


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inference_outside_autograd_takes_the_inference_op(layout):
    """apply_conv_bn_relu (FusedConvBNReLU, cnnops.models, cnnops.fuse) in eval mode under
    torch.no_grad or torch.inference_mode runs the one inference op (no statistics made),
    with or without a residual. Each call that needs more takes the general path: autograd
    recording, torch.autocast, another backend, a reflect-padded convolution, a BN without
    running statistics, a residual the op refuses (the general path's error). Same outputs
    as torch.nn throughout."""
    torch.manual_seed(9)
    x = make_input((2, 3, 9, 9), layout)
    r = make_input((2, 8, 5, 5), layout)
    for padding_mode in ("zeros", "reflect"):
        fused = cnnops.FusedConvBNReLU(3, 8, 3, stride=2, padding=1, bias=True).eval()
        fused.conv.padding_mode = padding_mode
        fused.bn.running_mean.uniform_(-0.5, 0.5)
        fused.bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            want = torch.relu(fused.bn(fused.conv(x)))
            want_r = torch.relu(fused.bn(fused.conv(x)) + r)
        op = "conv_bn_relu_inference" if padding_mode == "zeros" else "conv_bn_relu"
        for context in (torch.no_grad, torch.inference_mode):
            out, calls = _cnnops_calls(fused, x, context=context)
            assert calls == {op: 1}
            assert_close(out, want)
            assert out.is_contiguous(memory_format=expected_memory_format(x))
            out, calls = _cnnops_calls(fused, x, r, context=context)
            assert calls == {op: 1}
            assert_close(out, want_r)
    out, calls = _cnnops_calls(fused, x)  # autograd records it: the op with a backward
    assert calls == {"conv_bn_relu": 1} and out.requires_grad
    assert_close(out, want)
    fused.conv.padding_mode = "zeros"
    with torch.no_grad():
        out, calls = _cnnops_calls(fused, x, context=lambda: torch.autocast("cpu", torch.bfloat16))
        assert calls == {"conv_bn_relu": 1} and out.dtype == torch.bfloat16
        out, calls = _cnnops_calls(fused, x, context=lambda: cnnops.use_backend("reference"))
        assert calls == {}
        with pytest.raises(ValueError, match="residual"):
            fused(x, r[:, :, :4])
        fused.bn.track_running_stats = False  # eval with batch statistics, as torch.nn
        fused.bn.running_mean = fused.bn.running_var = None
        out, calls = _cnnops_calls(fused, x)
        assert calls == {"conv_bn_relu": 1}
        assert_close(out, torch.relu(fused.bn(fused.conv(x))))


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


# ---------------------------------------------------------------------------
# GPU entries only: the cuda backend's inference paths, and every op's GPU behaviour (empty
# batches, determinism, streams, autocast)

@needs_cuda
@on_gpu(axis("config", [GPU_CONV_CONFIGS[i] for i in (0, 1, 3)], conv_id),
        axis("dtype", GPU_DTYPES, str), axis("layout", LAYOUTS),
        axis("residual", [False, True], ["no-residual", "residual"]),
        axis("fusion", ["cudnn-fused", "fallback"]), backend=False)
def test_cuda_inference_paths(cuda_ops, monkeypatch, config, dtype, layout, residual, fusion):
    """The cuda backend's two inference paths for conv -> BN (-> + residual) -> ReLU and for
    conv2d_relu: BN folded into one fused cuDNN conv + bias (+ add) + ReLU call, and the
    fallback, cuDNN's convolution and one cnnops epilogue pass (CNNOPS_CUDNN_FUSION=0; also
    what float64, relu=False and configurations cuDNN refuses take)."""
    if fusion == "fallback":
        monkeypatch.setenv("CNNOPS_CUDNN_FUSION", "0")
    torch.manual_seed(19)
    x, w, cb, args = gpu_conv_tensors(config, dtype, layout, True)
    OC = w.shape[0]
    bw, bb, rm, rv = gpu_bn_tensors(OC, dtype, True, dtype in HALF)
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
        assert out.is_contiguous(memory_format=expected_memory_format(x))
        out, _ = run_pair(lambda x, w, cb, r: CF.conv2d_relu(x, w, cb, *args, residual=r),
                          lambda x, w, cb, r: F.conv2d(x, w, cb, *args) + (r if r is not None
                                                                           else 0),
                          [x, w, cb, r], dtype, relu=True,
                          names=grad_names(input=x, weight=w, bias=cb, residual=r))
        assert out.is_contiguous(memory_format=expected_memory_format(x))


@on_gpu(axis("dtype", [torch.float32, torch.float16] if not DRY_RUN else [torch.float32], str),
        axis("layout", ["contiguous", "channels_last"]))
def test_every_op_on_an_empty_batch(backend, dtype, layout):
    """N = 0 behaves as in PyTorch: empty outputs, zero parameter gradients, running
    statistics unchanged."""
    x = backend.make((0, 4, 6, 6), dtype, layout, grad=True)
    w = backend.make((6, 4, 3, 3), dtype, grad=True)
    b = backend.make((6,), dtype, grad=True)
    bw, bb, rm, rv = gpu_bn_tensors(6, dtype, True, False, device=backend.device)
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
@on_gpu(axis("layout", ["contiguous", "channels_last"]), backend=False)
def test_cuda_backward_is_deterministic(cuda_ops, monkeypatch, layout):
    """The cuda backend's reductions and scatters have a fixed order: two runs agree bit for
    bit (overlapping max-pool windows included). The convolutions are cuDNN's, deterministic
    when torch.backends.cudnn.deterministic says so, as in eager PyTorch."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(13)
    x = make((8, 24, 15, 15), torch.float32, layout, grad=True)
    w = make((32, 24, 3, 3), torch.float32, grad=True, scale=0.1)
    bw, bb, rm, rv = gpu_bn_tensors(32, torch.float32, True, False)
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
@on_gpu()
def test_ops_run_on_the_current_stream(backend):
    """Launched on a side stream, the ops give the default stream's results."""
    torch.manual_seed(14)
    x, w, _, args = gpu_conv_tensors(GPU_CONV_CONFIGS[0], torch.float32, "channels_last", False,
                                     device=backend.device)
    bw, bb, rm, rv = gpu_bn_tensors(w.shape[0], torch.float32, True, False,
                                    device=backend.device)

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
@on_gpu(axis("layout", ["contiguous", "channels_last"]),
        axis("training", [True, False], ["train", "eval"]), axis("amp_dtype", HALF, str))
def test_autocast_conv_bn_relu(backend, amp_dtype, training, layout):
    """Under torch.autocast the convolution runs in the autocast dtype (input, weight, conv
    bias and residual cast) and BN keeps its float32 parameters and statistics, as
    conv2d -> batch_norm -> add -> relu do in torch; gradients reach the float32 leaves.

    The reference is torch in float32 on the values autocast rounds (the GPU rule for half
    types), not torch under autocast: in training, the conv bias gradient is zero up to
    rounding, and torch's bfloat16 sum of bfloat16-rounded terms is ~0.05 of noise where
    cnnops' float32 sums give ~1e-7, so an autocast reference failed the more exact result."""
    torch.manual_seed(16)
    x = backend.make((4, 8, 10, 10), torch.float32, layout, grad=True)
    w = backend.make((12, 8, 3, 3), torch.float32, grad=True, scale=0.12)
    cb = backend.make((12,), torch.float32, grad=True)
    bw, bb, rm, rv = gpu_bn_tensors(12, torch.float32, True, False, device=backend.device)
    r = backend.make((4, 12, 10, 10), torch.float32, layout, grad=True)
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
    g = torch.randn(tuple(out.shape), device=backend.device)
    got = torch.autograd.grad((out.float() * g).sum(), leaves)
    # through our output's ReLU mask (see conftest.run_pair)
    want = torch.autograd.grad((pre * (out > 0) * g).sum(), ref_leaves)
    for name, a, b in zip(["input", "weight", "conv_bias", "bn_weight", "bn_bias", "residual"],
                          got, want):
        assert a.dtype == torch.float32, name
        check(a, b, amp_dtype, "grad of " + name)


@needs_cuda
@on_gpu(axis("amp_dtype", HALF, str))
def test_autocast_other_ops_run_in_their_input_dtype(backend, amp_dtype):
    x = backend.make((2, 6, 8, 8), torch.float32, grad=True)
    w = backend.make((6, 6, 3, 3), torch.float32, grad=True)
    device = backend.device
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
        z = CF.bn_relu(y, torch.zeros(6, device=device), torch.ones(6, device=device),
                       torch.ones(6, device=device), torch.zeros(6, device=device),
                       training=True)
        assert z.dtype == amp_dtype
    z.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@needs_cuda
@on_gpu(axis("amp_dtype", HALF, str), backend=False)
def test_autocast_kernels_of_the_cuda_ops(cuda_ops, amp_dtype):
    """The AutocastCUDA kernels registered in C++ (csrc/autocast.cpp), called through
    torch.ops directly: float32 arguments, the convolutions run in the autocast dtype, BN
    tensors stay float32 (statistics float32), float64 is left alone, other ops untouched."""
    x = torch.randn(2, 4, 7, 7, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    b = torch.randn(6, device="cuda")
    r = torch.randn(2, 6, 7, 7, device="cuda")
    bw, bb = torch.rand(6, device="cuda") + 0.5, torch.randn(6, device="cuda")
    rm, rv = torch.zeros(6, device="cuda"), torch.ones(6, device="cuda")
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

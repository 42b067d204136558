"""Per-op benchmarks: conv2d, conv_bn_relu (eval; train forward + backward), bn_relu,
add_relu and pooling at the layer shapes of ResNet-18/50, DenseNet-121 and GoogLeNet.

Each test is one (device, shape, implementation); the group is the comparison. Inputs
are made outside the timed function, from fixed seeds, so every implementation of a
group sees the same values; each implementation's result is checked against the eager
one, before timing and again on the last timed round's output.
Inference runs under torch.no_grad(); training rounds are forward + backward of the
same block via torch.autograd.grad with a fixed output gradient (so nothing
accumulates in .grad and nothing needs zeroing). conv_bn_relu also has a training
forward without backward ("train-fwd": BatchNorm in training mode, batch statistics,
autograd recording as in a training step; quick mode: CUDA only).

The convolution groups (conv2d, conv_bn_relu) time the cpu backend three ways: "cnnops cpu"
with its convolution core on auto (which times both cores in the correctness check, a
configuration's first call, before the warm-up), and "cnnops cpu (im2col)" / "cnnops cpu
(onednn)" with the core forced (benchlib.running). torch.compile rows of inference groups
compile with inductor's freezing on the CPU (the check call, under torch.no_grad, compiles).

Tensors and modules follow the run's Variant (--bench-dtype, --bench-channels-last):
made in float32 from the seeds, then cast and laid out; BatchNorm parameters and
statistics stay float32. A cnnops row whose backend cannot run the dtype on the device
(the cpu backend and half types) is skipped with the reason.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF
import cnnops.nn as cnn
from benchlib import (COMPILE, EAGER, FULL_ACTS, FULL_POOLS, HALF, QUICK_POOLS, RESNET18_ACTS,
                      assert_close, compiled, conv_layers, finish, impl_backend, impl_id,
                      named_params, not_timed_reason, paired, randn, randomize_bn, running,
                      time_it)


def cases(op, items):
    """Decorator: parametrize a test over (device, item, impl) for the op's implementations."""
    def make(settings):
        for device in settings.devices:
            for item in items(settings):
                for impl in settings.layer_impls(device, op):
                    yield ("%s-%s-%s" % (device, item.id, impl_id(impl)), device, item, impl)

    def decorate(fn):
        fn.bench_cases = make
        return fn
    return decorate


def _convs(settings):
    return conv_layers(settings.nets)


def _acts(settings):
    acts = FULL_ACTS if settings.full else RESNET18_ACTS
    return [a for a in acts if any(n in settings.nets for n in a.nets)] or acts[:4]


def _pools(settings):
    return FULL_POOLS if settings.full else QUICK_POOLS


def _quick_or_full(quick, full):
    """Items for quick mode and for --full (full-only ops have no quick items)."""
    return lambda settings: full(settings) if settings.full else quick(settings)


def _none(settings):
    return []


def _describe(benchmark, bench, op, mode, label, impl, device, batch, nets, **extra):
    """Names the group and fills extra_info; skips a cnnops row whose backend does not run
    the run's dtype on this device. Returns the run's Variant."""
    variant = bench.variant
    benchmark.group = "%s %s | %s | b%d %s %s" % (op, mode, label, batch, device, variant.label)
    benchmark.extra_info.update(dict(op=op, mode=mode, shape=label, impl=impl, device=device,
                                     backend=impl_backend(impl), batch=batch, sets=list(nets),
                                     **variant.info(), **extra))
    benchmark.extra_info["tolerance"] = str(bench.tol("op_grad" if mode == "train" else "op",
                                                     device))
    reason, _ = not_timed_reason(impl, device, variant.compute_dtype)
    if reason:
        pytest.skip(reason)
    return variant


# ---------------------------------------------------------------------------
# conv2d

def _conv2d_timed(benchmark, bench, device, layer, impl, train):
    N = bench.batch
    v = _describe(benchmark, bench, "conv2d", "train" if train else "eval", layer.label, impl,
                  device, N, layer.nets)
    x = randn((N, layer.C, layer.H, layer.W), device, 0, requires_grad=train and not layer.first,
              variant=v)
    w = randn((layer.OC, layer.C, layer.k, layer.k), device, 1,
              (2.0 / (layer.C * layer.k ** 2)) ** 0.5, requires_grad=train, variant=v)
    b = randn((layer.OC,), device, 2, 0.1, requires_grad=train, variant=v) if layer.bias else None
    s, p = layer.s, layer.pad

    def eager(x, w, b):
        return F.conv2d(x, w, b, s, p)

    fn = {EAGER: eager, COMPILE: compiled(eager) if impl == COMPILE else None}.get(
        impl, lambda x, w, b: CF.conv2d(x, w, b, s, p))
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    go = randn((N, layer.OC) + layer.out_hw, device, 3, variant=v) if train else None

    def run(f):
        if not train:
            return f(x, w, b)
        return torch.autograd.grad(f(x, w, b), leaves, go)

    tol = bench.tol("op_grad" if train else "op", device)
    with torch.set_grad_enabled(train), running(impl, device, train, benchmark.extra_info):
        expected = run(eager)
        assert_close(run(fn), expected, impl, tol=tol)
        result = time_it(benchmark, bench, lambda: run(fn), device,
                         baseline=paired(impl, lambda: run(eager)))
    assert_close(result, expected, impl + " (timed)", tol=tol)
    finish(benchmark, bench, device,
           flops=layer.train_flops(N) if train else layer.flops(N))


@cases("conv2d eval", _convs)
def test_conv2d_eval(benchmark, bench, device, case, impl):
    _conv2d_timed(benchmark, bench, device, case, impl, train=False)


@cases("conv2d train", _quick_or_full(_none, _convs))
def test_conv2d_train(benchmark, bench, device, case, impl):
    _conv2d_timed(benchmark, bench, device, case, impl, train=True)


# ---------------------------------------------------------------------------
# conv_bn_relu: FusedConvBNReLU against Conv2d -> BatchNorm2d -> ReLU

class PlainConvBNReLU(nn.Module):
    """torch.nn's unfused block, with FusedConvBNReLU's state_dict keys (conv.*, bn.*)."""

    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv2d(layer.C, layer.OC, layer.k, layer.s, layer.pad, bias=layer.bias)
        self.bn = nn.BatchNorm2d(layer.OC)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _conv_bn_relu_timed(benchmark, bench, device, layer, impl, mode):
    """mode: "eval" (inference, no_grad), "train" (forward + backward) or "train-fwd" (the
    training forward alone: batch statistics, running-statistics update, autograd recording
    what backward would need; the output is dropped)."""
    N = bench.batch
    train = mode != "eval"
    v = _describe(benchmark, bench, "conv_bn_relu", mode, layer.label, impl, device, N,
                  layer.nets, bn_dtype="float32")
    torch.manual_seed(0)
    plain = PlainConvBNReLU(layer)
    randomize_bn(plain)
    fused = None
    if impl not in (EAGER, COMPILE):
        fused = cnnops.FusedConvBNReLU(layer.C, layer.OC, layer.k, layer.s, layer.pad,
                                       bias=layer.bias)
        fused.load_state_dict(plain.state_dict())
        fused = v.module(fused, device).train(train)
    plain = v.module(plain, device).train(train)
    module = {EAGER: plain, COMPILE: compiled(plain) if impl == COMPILE else None}.get(impl, fused)
    x = randn((N, layer.C, layer.H, layer.W), device, 0, requires_grad=train and not layer.first,
              variant=v)
    backward = mode == "train"
    go = randn((N, layer.OC) + layer.out_hw, device, 3, variant=v) if backward else None
    names = (["x"] if x.requires_grad else []) + [n for n, _ in named_params(plain)]

    def run(m, x=x, go=go):
        if not backward:
            return m(x)
        leaves = ([x] if x.requires_grad else []) + [p for _, p in named_params(m)]
        return torch.autograd.grad(m(x), leaves, go)

    def checked(result):
        # A conv bias before training-mode BN has a zero gradient: in a half dtype both
        # implementations return rounding noise there, nothing to compare.
        if backward and v.dtype in HALF:
            return [r for n, r in zip(names, result) if n != "conv.bias"]
        return result

    def float64_results():
        """eager's results computed in float64, as float32."""
        plain64 = copy.deepcopy(plain).double()
        x64 = x.detach().double().requires_grad_(x.requires_grad)
        out = run(plain64, x64, go.double() if backward else None)
        return checked([t.float() for t in out] if backward else out.float())

    def assert_as_close(actual, expected):
        """actual within the tolerance of eager's float32 results, or, for cnnops in float32
        on the CPU, at least as close to float64's as eager's are. float32 eager rounds past
        the tolerance in channels_last: its stem weight gradient (3x224x224 k7) came 2.5e-3 of
        its largest value from float64's, where cnnops' came within 1e-6."""
        try:
            assert_close(actual, expected, impl, tol=tol)
        except AssertionError:
            if impl in (EAGER, COMPILE) or device != "cpu" or v.dtype != torch.float32:
                raise
            truth = float64_results()
            pairs = zip(actual, expected, truth) if backward else [(actual, expected, truth)]
            for i, (a, e, t) in enumerate(pairs):
                ours, eagers = (a - t).abs().max().item(), (e - t).abs().max().item()
                assert ours <= eagers, "%s[%d]: max |impl - float64| = %.3g > eager's %.3g" % (
                    impl, i, ours, eagers)

    assert [n for n, _ in named_params(module)] == [n for n, _ in named_params(plain)]
    tol = bench.tol("op_grad" if backward else "op", device)
    with torch.set_grad_enabled(train), running(impl, device, train, benchmark.extra_info):
        expected = checked(run(plain))
        assert_as_close(checked(run(module)), expected)  # torch.compile compiles
        result = time_it(benchmark, bench, lambda: run(module), device,
                         baseline=paired(impl, lambda: run(plain)))
    assert_as_close(checked(result), expected)
    finish(benchmark, bench, device,
           flops=layer.train_flops(N) if backward else layer.flops(N))


@cases("conv_bn_relu eval", _convs)
def test_conv_bn_relu_eval(benchmark, bench, device, case, impl):
    _conv_bn_relu_timed(benchmark, bench, device, case, impl, "eval")


@cases("conv_bn_relu train", _convs)
def test_conv_bn_relu_train(benchmark, bench, device, case, impl):
    _conv_bn_relu_timed(benchmark, bench, device, case, impl, "train")


@cases("conv_bn_relu train-fwd", _convs)
def test_conv_bn_relu_train_fwd(benchmark, bench, device, case, impl):
    _conv_bn_relu_timed(benchmark, bench, device, case, impl, "train-fwd")


# ---------------------------------------------------------------------------
# bn_relu: BNReLU against BatchNorm2d -> (+ residual) -> ReLU

class PlainBNReLU(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return self.relu(y)


class CnnopsBNReLU(nn.Module):
    """cnnops.nn.BNReLU under the name ``bn``, so the state_dict is PlainBNReLU's."""

    def __init__(self, C):
        super().__init__()
        self.bn = cnn.BNReLU(C)

    def forward(self, x, residual=None):
        return self.bn(x, residual)


def _bn_relu_timed(benchmark, bench, device, act, impl, train):
    N = bench.batch
    v = _describe(benchmark, bench, "bn_relu", "train" if train else "eval", act.label, impl,
                  device, N, act.nets, bn_dtype="float32")
    plain = PlainBNReLU(act.C)
    randomize_bn(plain)
    plain = v.module(plain, device).train(train)
    if impl == EAGER:
        module = plain
    elif impl == COMPILE:
        module = compiled(plain)
    else:
        module = v.module(CnnopsBNReLU(act.C), device)
        module.load_state_dict(plain.state_dict())
        module.train(train)
    shape = (N, act.C, act.H, act.W)
    x = randn(shape, device, 0, requires_grad=train, variant=v)
    r = randn(shape, device, 1, requires_grad=train, variant=v) if act.residual else None
    go = randn(shape, device, 3, variant=v) if train else None

    def run(m):
        if not train:
            return m(x, r)
        leaves = [t for t in (x, r) if t is not None] + [p for _, p in named_params(m)]
        return torch.autograd.grad(m(x, r), leaves, go)

    tol = bench.tol("op_grad" if train else "op", device)
    with torch.set_grad_enabled(train), running(impl, device, train, benchmark.extra_info):
        expected = run(plain)
        assert_close(run(module), expected, impl, tol=tol)
        result = time_it(benchmark, bench, lambda: run(module), device,
                         baseline=paired(impl, lambda: run(plain)))
    assert_close(result, expected, impl + " (timed)", tol=tol)
    tensors = (3 if act.residual else 2) * (2 if train else 1)  # read x (, r), write out; x2 train
    finish(benchmark, bench, device, nbytes=tensors * act.numel(N) * x.element_size())


@cases("bn_relu eval", _acts)
def test_bn_relu_eval(benchmark, bench, device, case, impl):
    _bn_relu_timed(benchmark, bench, device, case, impl, train=False)


@cases("bn_relu train", _acts)
def test_bn_relu_train(benchmark, bench, device, case, impl):
    _bn_relu_timed(benchmark, bench, device, case, impl, train=True)


# ---------------------------------------------------------------------------
# functional ops: add_relu, pooling

def _functional_timed(benchmark, bench, device, op, label, nets, impl, train, eager, ours,
                      inputs, out_shape, nbytes):
    """inputs: float32 tensors, cast and laid out here; nbytes: float32 bytes moved."""
    N = bench.batch
    v = _describe(benchmark, bench, op, "train" if train else "eval", label, impl, device, N,
                  nets)
    fn = {EAGER: eager, COMPILE: compiled(eager) if impl == COMPILE else None}.get(impl, ours)
    inputs = [v.tensor(t) for t in inputs]
    for t in inputs:
        t.requires_grad_(train)
    nbytes = nbytes // 4 * inputs[0].element_size()
    go = randn(out_shape, device, 3, variant=v) if train else None

    def run(f):
        if not train:
            return f(*inputs)
        return torch.autograd.grad(f(*inputs), inputs, go)

    tol = bench.tol("op_grad" if train else "op", device)
    with torch.set_grad_enabled(train), running(impl, device, train, benchmark.extra_info):
        expected = run(eager)
        assert_close(run(fn), expected, impl, tol=tol)
        result = time_it(benchmark, bench, lambda: run(fn), device,
                         baseline=paired(impl, lambda: run(eager)))
    assert_close(result, expected, impl + " (timed)", tol=tol)
    finish(benchmark, bench, device, nbytes=nbytes * (2 if train else 1))


def _add_relu_timed(benchmark, bench, device, act, impl, train):
    shape = (bench.batch, act.C, act.H, act.W)
    inputs = [randn(shape, device, 0), randn(shape, device, 1)]
    _functional_timed(benchmark, bench, device, "add_relu", act.label, act.nets, impl, train,
                      lambda a, b: torch.relu_(a + b), CF.add_relu, inputs, shape,
                      3 * act.numel(bench.batch) * 4)


@cases("add_relu eval", _acts)
def test_add_relu_eval(benchmark, bench, device, case, impl):
    _add_relu_timed(benchmark, bench, device, case, impl, train=False)


@cases("add_relu train", _quick_or_full(_none, _acts))
def test_add_relu_train(benchmark, bench, device, case, impl):
    _add_relu_timed(benchmark, bench, device, case, impl, train=True)


def _pool_timed(benchmark, bench, device, pool, impl, train):
    N = bench.batch
    if pool.kind == "max":
        eager = lambda x: F.max_pool2d(x, pool.k, pool.s, pool.p)  # noqa: E731
        ours = lambda x: CF.max_pool2d(x, pool.k, pool.s, pool.p)  # noqa: E731
    elif pool.kind == "avg":
        eager = lambda x: F.avg_pool2d(x, pool.k, pool.s, pool.p)  # noqa: E731
        ours = lambda x: CF.avg_pool2d(x, pool.k, pool.s, pool.p)  # noqa: E731
    else:
        eager = lambda x: F.adaptive_avg_pool2d(x, 1)  # noqa: E731
        ours = lambda x: CF.adaptive_avg_pool2d(x, 1)  # noqa: E731
    o = pool.out_hw()
    inputs = [randn((N, pool.C, pool.H, pool.H), device, 0)]
    nbytes = (N * pool.C * pool.H * pool.H + N * pool.C * o * o) * 4
    _functional_timed(benchmark, bench, device, "pool2d", pool.label, pool.nets,
                      impl, train, eager, ours, inputs, (N, pool.C, o, o), nbytes)


@cases("pool eval", _pools)
def test_pool_eval(benchmark, bench, device, case, impl):
    _pool_timed(benchmark, bench, device, case, impl, train=False)


@cases("pool train", _quick_or_full(_none, _pools))
def test_pool_train(benchmark, bench, device, case, impl):
    _pool_timed(benchmark, bench, device, case, impl, train=True)

"""The cpu backend's convolution core (csrc/cpu/conv_core.h) and bfloat16 on the CPU.

The op grids (test_conv2d.py, test_conv_bn_relu.py, ...) run each core, forced, against
torch. Here, what they cannot show:

* the override: get/set/use_cpu_conv, CNNOPS_CPU_CONV at import, a forced core's dtype errors;
* auto: the first call of a configuration measures both cores and records the faster (with
  both times), later calls reuse the record; a dtype only one core runs takes that core;
* cnnops.explain / explain_table on a small model, eval and train;
* the two cores give the same outputs, gradients and running statistics;
* bfloat16 on the CPU: each op (the convolutions natively on the oneDNN core, the others on
  float32 copies) against float32 torch on the same bfloat16-rounded inputs, no further off
  than torch's own bfloat16 op; a bfloat16 autocast training step of a small ResNet; the
  AutocastCPU kernels of the direct torch.ops.cnnops calls.
"""
import copy
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF
import cnnops.models as M
from cnnops import _ext
from cnnops.models.plain import TvBasicBlock, TvResNet
from conftest import assert_close, expected_memory_format, make_input

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the compiled ops")

BF16 = torch.bfloat16
# auto's reason: each candidate core's best time (winograd's only where it runs the call)
MEASURED = re.compile(r"^measured: im2col ([0-9.e+-]+) ms, onednn ([0-9.e+-]+) ms"
                      r"(?:, winograd ([0-9.e+-]+) ms)?$")
FORCED = "forced (set_cpu_conv / CNNOPS_CPU_CONV)"


@pytest.fixture(autouse=True)
def _restore_settings():
    """Every test leaves the backend and core settings as it found them."""
    backend, core = cnnops.get_backend(), cnnops.get_cpu_conv()
    yield
    assert (cnnops.get_backend(), cnnops.get_cpu_conv()) == (backend, core)


class Call(nn.Module):
    """A function as a module, for cnnops.explain."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


# ---------------------------------------------------------------------------
# the override

def test_default_follows_the_environment():
    assert cnnops.get_cpu_conv() == (os.environ.get("CNNOPS_CPU_CONV") or "auto")


def test_set_get_use_round_trip():
    start = cnnops.get_cpu_conv()
    try:
        for mode in ("im2col", "onednn", "winograd", "auto"):
            cnnops.set_cpu_conv(mode)
            assert cnnops.get_cpu_conv() == mode
        with cnnops.use_cpu_conv("onednn"):
            assert cnnops.get_cpu_conv() == "onednn"
            with cnnops.use_cpu_conv("im2col"):
                assert cnnops.get_cpu_conv() == "im2col"
            assert cnnops.get_cpu_conv() == "onednn"
        assert cnnops.get_cpu_conv() == "auto"
        with pytest.raises(KeyError), cnnops.use_cpu_conv("im2col"):
            raise KeyError("inside the block")
        assert cnnops.get_cpu_conv() == "auto"  # restored after an exception too
    finally:
        cnnops.set_cpu_conv(start)


@pytest.mark.parametrize("bad", ["fast", "IM2COL", "mkldnn", "", None])
def test_unknown_mode_raises(bad):
    before = cnnops.get_cpu_conv()
    with pytest.raises(ValueError, match=r"unknown CPU convolution core %s; expected one of "
                                         r"auto, im2col, onednn, winograd$"
                                         % re.escape(repr(bad))):
        cnnops.set_cpu_conv(bad)
    with pytest.raises(ValueError, match="unknown CPU convolution core"):
        with cnnops.use_cpu_conv(bad):
            pass
    assert cnnops.get_cpu_conv() == before


@pytest.mark.parametrize("core", ["im2col", "onednn"])
def test_forced_core_runs_every_call(core):
    """The Python setting reaches the C++ core choice: every convolution, forward and
    backward, runs the forced core and says so."""
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    fused = cnnops.FusedConvBNReLU(3, 4, 3, padding=1)
    model = nn.Sequential(fused, cnnops.nn.Conv2d(4, 2, 1))
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(core):
        rows = cnnops.explain(model, x, train=True)
    ops = [r["call"].split()[0] for r in rows]
    assert ops == ["conv_bn_relu", "conv2d", "conv2d_backward", "conv_bn_relu_backward"]
    assert all(r["core"] == core and r["reason"] == FORCED for r in rows), rows


def _subprocess(code, tmp_path, **env_vars):
    """Runs `code` in a fresh interpreter that imports the cnnops this process imported."""
    env = dict(os.environ)
    for name in ("CNNOPS_BACKEND", "CNNOPS_CPU_CONV"):
        env.pop(name, None)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cnnops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.update(env_vars)
    # cwd: not the repository root, whose cnnops/ would shadow PYTHONPATH's
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


_REPORT_SETTING = """
    import torch, cnnops
    assert cnnops.__file__ == %r, cnnops.__file__
    print(cnnops.get_cpu_conv())
    row, = cnnops.explain(cnnops.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 6, 6))
    print(row["core"])
    print(row["reason"])
"""


@pytest.mark.parametrize("value, mode", [("onednn", "onednn"), ("im2col", "im2col"),
                                         ("", "auto")], ids=["onednn", "im2col", "empty"])
def test_environment_variable_sets_the_core_at_import(tmp_path, value, mode):
    r = _subprocess(_REPORT_SETTING % cnnops.__file__, tmp_path, CNNOPS_CPU_CONV=value)
    assert r.returncode == 0, r.stderr[-3000:]
    setting, core, reason = r.stdout.splitlines()
    assert setting == mode
    if mode == "auto":
        assert core in ("im2col", "onednn", "winograd") and MEASURED.match(reason), (core, reason)
    else:
        assert (core, reason) == (mode, FORCED)


def test_bad_environment_variable_fails_at_import(tmp_path):
    r = _subprocess("import cnnops\nprint('imported')", tmp_path, CNNOPS_CPU_CONV="fast")
    assert r.returncode != 0 and "imported" not in r.stdout
    assert ("ValueError: unknown CPU convolution core 'fast'; expected one of auto, im2col, "
            "onednn, winograd") in r.stderr, r.stderr[-3000:]


def _conv_calls(dtype):
    """Each convolution op called directly (torch.ops.cnnops), forward and backward, in dtype."""
    x, w = torch.randn(2, 3, 6, 6, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype)
    g = torch.randn(2, 4, 6, 6, dtype=dtype)
    bn = torch.ones(4, dtype=torch.float32 if dtype == BF16 else dtype)
    ops, conv = torch.ops.cnnops, ([1, 1], [1, 1], [1, 1], 1)
    return {
        "conv2d": lambda: ops.conv2d(x, w, None, *conv),
        "conv2d_relu": lambda: ops.conv2d_relu(x, w, None, g, *conv),
        "conv_bn_relu": lambda: ops.conv_bn_relu(x, w, None, bn, bn, None, None, None, *conv,
                                                 True, 1e-5, True),
        "conv2d_backward": lambda: ops.conv2d_backward(g, x, w, *conv, [True, True, False]),
    }


@pytest.mark.parametrize("op", sorted(_conv_calls(torch.float32)))
def test_forced_im2col_refuses_bfloat16(op):
    with cnnops.use_cpu_conv("im2col"), pytest.raises(
            TypeError, match=r"the im2col CPU convolution core supports float32 and float64, "
                             r"got bfloat16 \(cnnops\.set_cpu_conv\('im2col'\)"):
        _conv_calls(BF16)[op]()
    with cnnops.use_cpu_conv("auto"):  # the same call runs under auto (on oneDNN)
        out = _conv_calls(BF16)[op]()
    assert (out[0] if isinstance(out, tuple) else out).dtype == BF16


@pytest.mark.parametrize("op", sorted(_conv_calls(torch.float32)))
def test_forced_onednn_refuses_float64(op):
    with cnnops.use_cpu_conv("onednn"), pytest.raises(
            TypeError, match=r"the onednn CPU convolution core supports float32 and bfloat16 "
                             r".*got float64 \(cnnops\.set_cpu_conv\('onednn'\)"):
        _conv_calls(torch.float64)[op]()
    with cnnops.use_cpu_conv("auto"):
        out = _conv_calls(torch.float64)[op]()
    assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float64


def test_functional_forced_core_error_reaches_the_caller():
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("im2col"), \
            pytest.raises(TypeError, match="im2col CPU convolution core"):
        CF.conv_bn_relu(torch.randn(2, 3, 5, 5, dtype=BF16), torch.randn(4, 3, 3, 3, dtype=BF16),
                        None, None, None, None, None, padding=1, training=True)


# ---------------------------------------------------------------------------
# auto: measure once, record, reuse

def _new_choices(before):
    return [c for c in cnnops.cpu_conv_choices() if c["call"] not in before]


def _check_measured(record):
    """The record's reason lists each candidate's time (the three cores': the calls here are
    3x3 stride-1 float32) and its core is the fastest (times printed to 3 digits: a tie shows
    as equal)."""
    m = MEASURED.match(record["reason"])
    assert m, record
    times = {"im2col": float(m.group(1)), "onednn": float(m.group(2))}
    if m.group(3) is not None:
        times["winograd"] = float(m.group(3))
    assert "winograd" in times, record
    assert all(ms > 0 for ms in times.values()), record
    assert times[record["core"]] == min(times.values()), record


# Shapes no other test uses, so that the first call here is the configuration's first (a width
# per op: conv2d_relu's backward is a conv2d_backward).
N_, C_, H_, OC_ = 1, 5, 11, 7
AUTO_WIDTH = {"conv2d": 13, "conv2d_relu": 14, "conv_bn_relu": 15}


def _auto_case(op):
    """(fn(x, w, b, r) with its BN state, torch's fn, the forward's record `call`, the
    backward's)."""
    torch.manual_seed(10)
    rm, rv = torch.randn(OC_), torch.rand(OC_) + 0.5
    bw, bb = torch.rand(OC_) + 0.5, torch.randn(OC_)
    stats = {"cnnops": (rm.clone(), rv.clone()), "torch": (rm.clone(), rv.clone())}

    def call(name, flags):
        return "%s float32 [%d, %d, %d, %d] k3x3 s1x1 p1x1 -> %d %s (%d threads)" % (
            name, N_, C_, H_, AUTO_WIDTH[op], OC_, flags, torch.get_num_threads())

    conv_backward = call("conv2d_backward", "grad_input grad_weight grad_bias")
    if op == "conv2d":
        return (lambda x, w, b, r: CF.conv2d(x, w, b, 1, 1),
                lambda x, w, b, r: F.conv2d(x, w, b, 1, 1), None,
                call("conv2d", "bias"), conv_backward)
    if op == "conv2d_relu":
        return (lambda x, w, b, r: CF.conv2d_relu(x, w, b, 1, 1, residual=r),
                lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1) + r), None,
                call("conv2d_relu", "bias residual"), conv_backward)
    return (lambda x, w, b, r: CF.conv_bn_relu(x, w, b, bw, bb, *stats["cnnops"], 1, 1,
                                               training=True, residual=r),
            lambda x, w, b, r: F.relu(F.batch_norm(F.conv2d(x, w, b, 1, 1), *stats["torch"], bw,
                                                   bb, True) + r),
            stats, call("conv_bn_relu", "train relu residual conv_bias"),
            call("conv_bn_relu_backward", "train relu conv_bias grad_input grad_weight "
                                          "grad_conv_bias grad_residual"))


@pytest.mark.parametrize("op", ["conv2d", "conv2d_relu", "conv_bn_relu"])
def test_auto_measures_a_new_configuration_once(op):
    fn, torch_fn, stats, forward_call, backward_call = _auto_case(op)
    x = torch.randn(N_, C_, H_, AUTO_WIDTH[op], requires_grad=True)
    w = torch.randn(OC_, C_, 3, 3, requires_grad=True)
    b = torch.randn(OC_, requires_grad=True)
    r = torch.randn(N_, OC_, H_, AUTO_WIDTH[op], requires_grad=True)
    args = (x, w, b, r)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("auto"):
        before = {c["call"] for c in cnnops.cpu_conv_choices()}
        assert forward_call not in before and backward_call not in before
        out = fn(*args)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, args, g, allow_unused=True)
        records = _new_choices(before)

        # one record for the forward and one for the backward configuration
        assert sorted(c["call"] for c in records) == sorted([forward_call, backward_call])
        fwd = [c for c in records if c["call"] == forward_call]
        bwd = [c for c in records if c["call"] == backward_call]
        for record in records:
            _check_measured(record)

        # the measured call's results are the chosen core's: right, and with no side effect
        # of the repeated runs (BN statistics updated once)
        leaves = [_leaf(t) for t in args]
        expected = torch_fn(*leaves)
        assert_close(out, expected)
        want = torch.autograd.grad(expected, leaves, g, allow_unused=True)
        for a, e in zip(got, want):
            if e is not None or a is not None:
                assert_close(a, e)
        if stats is not None:
            for ours, theirs in zip(stats["cnnops"], stats["torch"]):
                assert_close(ours, theirs)

        # the same configuration again: the record is reused, nothing is measured
        rows = cnnops.explain(Call(fn), *[_leaf(t) for t in args], train=True)
        assert rows == fwd + bwd
        assert _new_choices(before) == records


def test_auto_keys_on_flags_and_threads():
    """A configuration is the op, shapes, dtype, flags and thread count: a call differing in
    the bias flag or the thread count is measured afresh."""
    x, w = torch.randn(1, 5, 11, 12), torch.randn(7, 5, 3, 3)
    threads = torch.get_num_threads()
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("auto"), torch.no_grad():
        before = {c["call"] for c in cnnops.cpu_conv_choices()}
        CF.conv2d(x, w, None, 1, 1)
        CF.conv2d(x, w, None, 1, 1)
        assert len(_new_choices(before)) == 1
        CF.conv2d(x, w, torch.randn(7), 1, 1)
        assert len(_new_choices(before)) == 2
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            CF.conv2d(x, w, None, 1, 1)
        finally:
            torch.set_num_threads(threads)
    calls = sorted(c["call"] for c in _new_choices(before))
    assert len(calls) == 3, calls
    prefix = "conv2d float32 [1, 5, 11, 12] k3x3 s1x1 p1x1 -> 7"
    assert sorted(calls) == sorted([
        "%s (%d threads)" % (prefix, threads),
        "%s bias (%d threads)" % (prefix, threads),
        "%s (%d threads)" % (prefix, 1 if threads > 1 else 2)])


@pytest.mark.parametrize("dtype, core, reason", [
    (torch.float64, "im2col", "the only core for float64"),
    (BF16, "onednn", "the only core for bfloat16 (oneDNN)")], ids=["float64", "bfloat16"])
def test_auto_takes_the_only_core_for_a_dtype(dtype, core, reason):
    torch.manual_seed(11)
    # (stride 3: the Winograd core would run float64 3x3 convolutions at stride 1 or 2 too)
    model = nn.Sequential(cnnops.FusedConvBNReLU(3, 4, 3, stride=3, padding=1),
                          cnnops.nn.Conv2d(4, 4, 3, stride=3, padding=1)).to(dtype)
    x = torch.randn(2, 3, 9, 10, dtype=dtype, requires_grad=True)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("auto"):
        before = {c["call"] for c in cnnops.cpu_conv_choices()}
        rows = cnnops.explain(model, x, train=True)
        assert _new_choices(before) == []  # nothing measured, nothing recorded
    assert [r["call"].split()[:2] for r in rows] == [
        ["conv_bn_relu", str(dtype)[len("torch."):]], ["conv2d", str(dtype)[len("torch."):]],
        ["conv2d_backward", str(dtype)[len("torch."):]],
        ["conv_bn_relu_backward", str(dtype)[len("torch."):]]]
    assert all((r["core"], r["reason"]) == (core, reason) for r in rows), rows


# ---------------------------------------------------------------------------
# explain

def _small_model():
    torch.manual_seed(12)
    return M.resnet18(num_classes=5, layers=(1, 1, 1, 1), width=4)


SMALL_INPUT = (2, 3, 32, 32)
N_CONV = 1 + 2 + 3 * 3  # stem; layer1: 2 convs; layer2-4: 2 convs and a downsample each


def test_explain_lists_every_convolution_call():
    model = _small_model()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_conv == N_CONV
    x = torch.randn(SMALL_INPUT)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("onednn"):
        eval_rows = cnnops.explain(model, x)
        train_rows = cnnops.explain(model, x.clone().requires_grad_(), train=True)
    for rows in (eval_rows, train_rows):
        assert all(set(r) == {"call", "core", "reason"} for r in rows)
        assert all(r["core"] == "onednn" and r["reason"] == FORCED for r in rows)
    assert [r["call"].split()[0] for r in eval_rows] == ["conv_bn_relu"] * n_conv
    assert all(" training" not in r["call"] for r in eval_rows)
    forward, backward = train_rows[:n_conv], train_rows[n_conv:]
    assert [r["call"].split()[0] for r in forward] == ["conv_bn_relu"] * n_conv
    assert [r["call"].split()[0] for r in backward] == ["conv_bn_relu_backward"] * n_conv
    # the first convolution's backward runs last (reverse order) and the input needs a gradient
    assert backward[-1]["call"].startswith("conv_bn_relu_backward float32 [2, 3, 32, 32] k7x7")
    assert forward[0]["call"].startswith("conv_bn_relu float32 [2, 3, 32, 32] k7x7 s2x2 p3x3")


def test_explain_restores_mode_and_gradients():
    model = _small_model()
    params = list(model.parameters())
    before_stats = model.bn1.running_mean.clone()
    x = torch.randn(SMALL_INPUT, requires_grad=True)
    with cnnops.use_backend("cpu"):
        model.eval()
        rows = cnnops.explain(model, x, train=True)
        assert not model.training and not any(m.training for m in model.modules())
        assert len(rows) == 2 * N_CONV
        assert all(p.grad is None for p in params)
        assert not torch.equal(model.bn1.running_mean, before_stats)  # a training step ran
        model.train()
        assert len(cnnops.explain(model, x)) == N_CONV
        assert model.training and all(m.training for m in model.modules())
        assert model.bn1.num_batches_tracked.item() == 1  # eval explain: statistics alone


def test_explain_keeps_existing_gradients():
    model = _small_model()
    params = list(model.parameters())
    grads = [torch.full_like(p, 7.0) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    with cnnops.use_backend("cpu"):
        cnnops.explain(model, torch.randn(SMALL_INPUT), train=True)
    assert all(p.grad is g for p, g in zip(params, grads))
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p.grad, torch.full_like(p, 7.0))]
    assert not changed, "gradients changed by explain: %s" % changed[:5]


def test_explain_after_a_failing_forward():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = cnnops.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise ZeroDivisionError("in forward")

    model = Fails()
    with cnnops.use_backend("cpu"):
        with pytest.raises(ZeroDivisionError):
            cnnops.explain(model, torch.randn(1, 3, 5, 5))
        assert model.training
        # the trace was switched off and emptied: a later explain lists its own calls only
        rows = cnnops.explain(Call(lambda x: CF.conv2d(x, torch.randn(2, 3, 1, 1))),
                              torch.randn(1, 3, 5, 5))
    assert [r["call"].split()[0] for r in rows] == ["conv2d"]
    assert "k1x1" in rows[0]["call"]


def test_explain_lists_no_calls_of_other_backends():
    with cnnops.use_backend("reference"):
        assert cnnops.explain(_small_model(), torch.randn(SMALL_INPUT)) == []


def test_explain_table():
    rows = [dict(call="conv2d float32 [1, 3, 5, 5] k3x3 s1x1 p0x0 -> 4 (2 threads)",
                 core="im2col", reason="measured: im2col 1 ms, onednn 2 ms"),
            dict(call="conv2d_backward float32 [1, 3, 5, 5] k3x3 s1x1 p0x0 -> 4 (2 threads)",
                 core="onednn", reason=FORCED)]
    with cnnops.use_cpu_conv("onednn"):
        lines = cnnops.explain_table(rows).splitlines()
    level = cnnops._C._cpu_vector_level()
    assert level in ("AVX-512 (x86-64-v4)", "AVX2 (x86-64-v3)", "baseline")
    assert lines[0] == "CPU convolution core setting: onednn; 2 calls; CPU kernels: " + level
    assert lines[1:] == ["%-7s %s  [%s]" % (r["core"], r["call"], r["reason"]) for r in rows]
    with cnnops.use_backend("cpu"):
        real = cnnops.explain(_small_model(), torch.randn(SMALL_INPUT))
    text = cnnops.explain_table(real).splitlines()
    assert len(text) == 1 + len(real) == 1 + N_CONV
    assert all(r["call"] in line and r["core"] in line for r, line in zip(real, text[1:]))


# ---------------------------------------------------------------------------
# the two cores agree

# (in_channels, out_channels, kernel, stride, padding, dilation, groups, H, W)
AGREE_CONFIGS = [(4, 6, 3, 2, 1, 1, 2, 9, 8),    # stride 2, groups
                 (3, 5, 3, 1, 2, 2, 1, 8, 7)]    # dilation


def _agree_case(op, config, layout):
    C, OC, k, stride, padding, dilation, groups, H, W = config
    torch.manual_seed(13)
    x = make_input((3, C, H, W), layout, requires_grad=True)
    w = (torch.randn(OC, C // groups, k, k) * 0.5).requires_grad_()
    b = torch.randn(OC, requires_grad=True)
    out_shape = F.conv2d(x.detach(), w.detach(), None, stride, padding, dilation, groups).shape
    r = make_input(tuple(out_shape), layout, requires_grad=True)
    bw, bb = (torch.rand(OC) + 0.5).requires_grad_(), torch.randn(OC, requires_grad=True)
    rm, rv = torch.randn(OC), torch.rand(OC) + 0.5
    conv = (stride, padding, dilation, groups)
    if op == "conv2d":
        return (lambda s: CF.conv2d(x, w, b, *conv)), (x, w, b)
    if op == "conv2d_relu":
        return (lambda s: CF.conv2d_relu(x, w, b, *conv, residual=r)), (x, w, b, r)
    training = op == "conv_bn_relu-train"
    return ((lambda s: CF.conv_bn_relu(x, w, b, bw, bb, *s, *conv, training=training,
                                       residual=r)),
            (x, w, b, bw, bb, r), (rm, rv))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("config", AGREE_CONFIGS, ids=["stride2-groups", "dilation"])
@pytest.mark.parametrize("op", ["conv2d", "conv2d_relu", "conv_bn_relu-train",
                                "conv_bn_relu-eval"])
def test_cores_agree(op, config, layout):
    """Outputs, every gradient and the running statistics of im2col and onednn (float32)."""
    case = _agree_case(op, config, layout)
    fn, leaves = case[0], case[1]
    stats0 = case[2] if len(case) > 2 else ()
    results = {}
    torch.manual_seed(14)
    for core in ("im2col", "onednn"):
        stats = tuple(s.clone() for s in stats0)
        with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(core):
            out = fn(stats)
            g = torch.linspace(-1, 1, out.numel()).view(out.shape)
            grads = torch.autograd.grad(out, leaves, g)
        results[core] = (out, grads, stats)
    (out_a, grads_a, stats_a), (out_b, grads_b, stats_b) = results["im2col"], results["onednn"]
    assert out_a.is_contiguous(memory_format=expected_memory_format(leaves[0]))
    assert out_b.is_contiguous(memory_format=expected_memory_format(leaves[0]))
    assert out_a.abs().max() > 0.1  # not a vacuous comparison
    assert_close(out_b, out_a)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert ga.abs().max() > 1e-3 or op == "conv_bn_relu-train" and i == 2  # conv bias
        # before training BN: its gradient is 0 up to rounding
        assert_close(gb, ga, rtol=1e-4, atol=1e-4 * max(1.0, ga.abs().max().item()))
    for sa, sb, s0 in zip(stats_a, stats_b, stats0):
        assert_close(sb, sa)
        assert (op == "conv_bn_relu-train") != torch.equal(sa, s0)  # moved only in training


# ---------------------------------------------------------------------------
# bfloat16 on the CPU

def _rel(actual, expected):
    """Relative error in norm (float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm()).item()


SLACK = 1e-3  # a quarter of a bfloat16 ulp at 1: room for a rounding torch happens to avoid


def _no_worse_than_torch(ours, theirs, reference, what):
    """cnnops' bfloat16 result is as close to the float32 reference as torch's bfloat16 one:
    relative error in norm at most 1.5x torch's plus SLACK."""
    err, torch_err = _rel(ours, reference), _rel(theirs, reference)
    assert err <= 1.5 * torch_err + SLACK, "%s: cnnops' error %.3g > 1.5 x torch's %.3g + %g" % (
        what, err, torch_err, SLACK)


def _bf16_inputs(tensors):
    """(cnnops' bfloat16 leaves, torch's bfloat16 leaves, float32 leaves with the same values).
    A float32 tensor that stays float32 (BN parameters) is the same in all three."""
    ours, theirs, exact = [], [], []
    for t, low in tensors:
        v = t.to(BF16) if low else t
        ours.append(v.detach().clone().requires_grad_(t.requires_grad))
        theirs.append(v.detach().clone().requires_grad_(t.requires_grad))
        exact.append(v.detach().float().requires_grad_(t.requires_grad))
    return ours, theirs, exact


def _check_bf16(cnnops_fn, torch_fn, tensors, backward=True):
    """cnnops_fn on bfloat16 inputs (cpu backend) against torch_fn on the same inputs in
    float32 (the reference) and in bfloat16 (torch's own error): output dtype as torch's,
    output and every gradient no worse than torch's. tensors: (float32 tensor, cast to
    bfloat16?) pairs; those with requires_grad get gradients."""
    ours, theirs, exact = _bf16_inputs(tensors)
    with cnnops.use_backend("cpu"):
        out = cnnops_fn(*ours)
    ref_torch, ref = torch_fn(*theirs), torch_fn(*exact)
    assert out.dtype == ref_torch.dtype == BF16
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=expected_memory_format(ours[0]))
    _no_worse_than_torch(out, ref_torch, ref, "output")
    if not backward:
        return
    torch.manual_seed(15)
    g = torch.randn(ref.shape).to(BF16)
    wrt = [i for i, t in enumerate(ours) if t.requires_grad]
    got = torch.autograd.grad(out, [ours[i] for i in wrt], g)
    want_torch = torch.autograd.grad(ref_torch, [theirs[i] for i in wrt], g)
    want = torch.autograd.grad(ref, [exact[i] for i in wrt], g.float())
    for i, a, t, e in zip(wrt, got, want_torch, want):
        assert a.dtype == ours[i].dtype
        _no_worse_than_torch(a, t, e, "gradient of input %d" % i)


def _conv_tensors(layout="contiguous", residual=False, bias=True, out_hw=(9, 8)):
    torch.manual_seed(16)
    x = make_input((2, 4, 9, 8), layout, requires_grad=True)
    w = (torch.randn(6, 4, 3, 3) * 0.3).requires_grad_()
    t = [(x, True), (w, True)]
    if bias:
        t.append((torch.randn(6, requires_grad=True), True))
    if residual:
        t.append((make_input((2, 6) + out_hw, layout, requires_grad=True), True))
    return t


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_conv2d(layout):
    _check_bf16(lambda x, w, b: CF.conv2d(x, w, b, 1, 1),
                lambda x, w, b: F.conv2d(x, w, b, 1, 1), _conv_tensors(layout))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_conv2d_stride_groups_dilation(layout):
    torch.manual_seed(17)
    x = make_input((2, 4, 11, 10), layout, requires_grad=True)
    w = (torch.randn(6, 2, 3, 3) * 0.3).requires_grad_()
    _check_bf16(lambda x, w: CF.conv2d(x, w, None, 2, 2, 2, 2),
                lambda x, w: F.conv2d(x, w, None, 2, 2, 2, 2), [(x, True), (w, True)])


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_bf16_conv2d_relu(residual):
    _check_bf16(lambda x, w, b, *r: CF.conv2d_relu(x, w, b, 1, 1, residual=r[0] if r else None),
                lambda x, w, b, *r: F.relu(F.conv2d(x, w, b, 1, 1) + (r[0] if r else 0)),
                _conv_tensors(residual=residual))


@pytest.mark.parametrize("bn_dtype", [torch.float32, BF16], ids=["bn-float32", "bn-bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_conv_bn_relu(training, layout, bn_dtype):
    """With residual and BN affine (float32 or bfloat16 parameters and statistics); in training
    the running statistics too, no further from the reference's than torch's, in their dtype.
    (No conv bias: before training BN its gradient is 0 up to rounding, no error to compare.)"""
    low = bn_dtype == BF16
    torch.manual_seed(18)
    bw, bb = (torch.rand(6) + 0.5).requires_grad_(), (torch.randn(6) * 0.3).requires_grad_()
    rm, rv = torch.randn(6) * 0.3, torch.rand(6) + 0.5
    stats = {k: (rm.to(bn_dtype), rv.to(bn_dtype)) for k in ("cnnops", "torch")}
    stats["exact"] = tuple(s.float() for s in stats["torch"])  # the same values, float32

    def run(which):
        def fn(x, w, r, bw, bb):
            if which == "cnnops":
                return CF.conv_bn_relu(x, w, None, bw, bb, *stats[which], 1, 1,
                                       training=training, residual=r)
            y = F.batch_norm(F.conv2d(x, w, None, 1, 1), *stats[which], bw, bb, training)
            return F.relu(y + r)
        return fn

    tensors = _conv_tensors(layout, residual=True, bias=False) + [(bw, low), (bb, low)]
    _check_bf16(run("cnnops"), lambda *a: run("torch" if a[0].dtype == BF16 else "exact")(*a),
                tensors)
    for which in ("cnnops", "torch"):
        assert all(s.dtype == bn_dtype for s in stats[which])
    for name, ours_s, torch_s, ref_s, start in zip(("running_mean", "running_var"),
                                                   stats["cnnops"], stats["torch"],
                                                   stats["exact"], (rm, rv)):
        if training:
            _no_worse_than_torch(ours_s, torch_s, ref_s, name)
        else:
            assert torch.equal(ours_s, start.to(bn_dtype)), name


def test_bf16_conv_bn_relu_raw_dtypes():
    """The op's outputs in the dtypes the fake kernels promise: activations bfloat16, saved
    statistics float32, BN weight / bias gradients float32 (float32 BN parameters)."""
    torch.manual_seed(19)
    x, w = torch.randn(2, 3, 6, 6, dtype=BF16), torch.randn(4, 3, 3, 3, dtype=BF16)
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    out, conv_out, mean, invstd = torch.ops.cnnops.conv_bn_relu(
        x, w, None, bw, bb, None, None, None, *conv, True, 1e-5, True)
    assert (out.dtype, conv_out.dtype, mean.dtype, invstd.dtype) == (BF16, BF16, torch.float32,
                                                                    torch.float32)
    ref = F.conv2d(x.float(), w.float(), None, 1, 1)
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(invstd, (ref.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(),
                               rtol=2e-2, atol=1e-2)
    g = torch.randn_like(out)
    gi, gw, gcb, gbw, gbb, gr = torch.ops.cnnops.conv_bn_relu_backward(
        g, out, x, w, None, conv_out, bw, mean, invstd, *conv, True, True, [True] * 5 + [False])
    assert (gi.dtype, gw.dtype, gcb.dtype, gbw.dtype, gbb.dtype) == (BF16, BF16, BF16,
                                                                    torch.float32, torch.float32)
    assert gi.shape == x.shape and gw.shape == w.shape and gbw.shape == gbb.shape == (4,)


BN_OPS = {
    "batch_norm-train": (lambda x, rm, rv, w, b: CF.batch_norm(x, rm, rv, w, b, True),
                         lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True)),
    "batch_norm-eval": (lambda x, rm, rv, w, b: CF.batch_norm(x, rm, rv, w, b, False),
                        lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, False)),
    "bn_relu-train": (lambda x, rm, rv, w, b, r: CF.bn_relu(x, rm, rv, w, b, True, residual=r),
                      lambda x, rm, rv, w, b, r: F.relu(F.batch_norm(x, rm, rv, w, b, True) + r)),
    "bn_relu-eval": (lambda x, rm, rv, w, b, r: CF.bn_relu(x, rm, rv, w, b, False, residual=r),
                     lambda x, rm, rv, w, b, r: F.relu(F.batch_norm(x, rm, rv, w, b, False) + r)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", sorted(BN_OPS))
def test_bf16_batch_norm(op, layout):
    """bfloat16 input, float32 BN parameters (mixed precision, as torch)."""
    torch.manual_seed(20)
    x = make_input((3, 5, 6, 7), layout, requires_grad=True, scale=2.0)
    stats = [torch.randn(5) * 0.3, torch.rand(5) + 0.5]
    tensors = [(x, True)] + [(s, False) for s in stats]
    tensors += [((torch.rand(5) + 0.5).requires_grad_(), False), (torch.randn(5).requires_grad_(),
                                                                  False)]
    if op.startswith("bn_relu"):
        tensors.append((make_input((3, 5, 6, 7), layout, requires_grad=True), True))
    ours_fn, torch_fn = BN_OPS[op]
    fresh = lambda fn: lambda x, rm, rv, *rest: fn(x, rm.clone(), rv.clone(), *rest)
    _check_bf16(fresh(ours_fn), fresh(torch_fn), tensors)


POOL_OPS = {
    "max_pool2d": (lambda x: CF.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                   lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
    "avg_pool2d": (lambda x: CF.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                   lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
    "adaptive_avg_pool2d": (lambda x: CF.adaptive_avg_pool2d(x, (3, 4)),
                            lambda x: F.adaptive_avg_pool2d(x, (3, 4))),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", sorted(POOL_OPS))
def test_bf16_pooling(op, layout):
    torch.manual_seed(21)
    _check_bf16(*POOL_OPS[op], [(make_input((2, 3, 9, 10), layout, requires_grad=True), True)])


def test_bf16_max_pool2d_indices_match_torch():
    torch.manual_seed(22)
    x = torch.randn(2, 3, 9, 10).to(BF16)
    with cnnops.use_backend("cpu"):
        out, idx = CF.max_pool2d(x, 3, 2, 1, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert out.dtype == BF16 and torch.equal(out, ref) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_add_relu(layout):
    torch.manual_seed(23)
    _check_bf16(CF.add_relu, lambda a, b: F.relu(a + b),
                [(make_input((2, 3, 5, 6), layout, requires_grad=True), True),
                 (make_input((2, 3, 5, 6), layout, requires_grad=True), True)])


# ---------------------------------------------------------------------------
# bfloat16 autocast: a training step of a small ResNet

def _randomize_bn(model):
    g = torch.Generator().manual_seed(24)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(3)


def _step(net, x, autocast):
    """One training step's forward and backward: (logits, loss, input grad, {name: grad})."""
    net.train()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = net(x)
        loss = F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])
    loss.backward()
    return out, loss, x.grad, {k: p.grad for k, p in net.named_parameters()}


def _rms(errors):
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def test_bf16_autocast_training_step_matches_torch():
    """resnet18 (one block a stage, width 16) against its torch.nn twin, one training step.

    Rule: the float32 step of the twin is the reference. torch's own step under
    torch.autocast("cpu", bfloat16) is off from it by some relative error (in norm) for the
    logits, the input gradient, each parameter's gradient (summarised as the root mean square
    over parameters, and the worst one) and the running statistics; cnnops' autocast step may
    be off by at most 1.5x as much plus 0.01. The loss, a scalar, may be off by 1.5x torch's
    error plus one bfloat16 epsilon (2**-8) of its value. bfloat16 gradients of a deep net in
    training-mode BN are far from float32 ones (20-40%% here, for torch as for cnnops): the rule
    holds cnnops to torch's accuracy, not to float32's. Also: logits bfloat16, gradients
    float32 (the parameters' dtype), each BN's num_batches_tracked up by one.
    """
    torch.manual_seed(25)
    twin = TvResNet(TvBasicBlock, [1, 1, 1, 1], num_classes=10, width=16)
    _randomize_bn(twin)
    model = M.resnet18(num_classes=10, layers=(1, 1, 1, 1), width=16)
    model.load_state_dict(twin.state_dict(), strict=True)
    twin16 = copy.deepcopy(twin)
    x = torch.randn(8, 3, 64, 64)
    ref = _step(twin, x, autocast=False)
    theirs = _step(twin16, x, autocast=True)
    with cnnops.use_backend("cpu"):  # explicit: raises rather than run another backend
        ours = _step(model, x, autocast=True)

    assert ours[0].dtype == theirs[0].dtype == BF16
    assert ours[1].dtype == torch.float32
    _no_worse_than_torch(ours[0], theirs[0], ref[0], "logits")
    loss_err, torch_loss_err = abs(ours[1].item() - ref[1].item()), abs(theirs[1].item() -
                                                                          ref[1].item())
    assert loss_err <= 1.5 * torch_loss_err + 2 ** -8 * abs(ref[1].item()), (loss_err,
                                                                             torch_loss_err)
    err, torch_err = _rel(ours[2], ref[2]), _rel(theirs[2], ref[2])
    assert err <= 1.5 * torch_err + 0.01, ("input grad", err, torch_err)
    names = list(ref[3])
    assert list(ours[3]) == names
    assert all(ours[3][k].dtype == torch.float32 for k in names)
    errs = [_rel(ours[3][k], ref[3][k]) for k in names]
    torch_errs = [_rel(theirs[3][k], ref[3][k]) for k in names]
    assert _rms(errs) <= 1.5 * _rms(torch_errs) + 0.01, (_rms(errs), _rms(torch_errs))
    assert max(errs) <= 1.5 * max(torch_errs) + 0.01, (max(errs), max(torch_errs))

    state, torch_state, ref_state = model.state_dict(), twin16.state_dict(), twin.state_dict()
    stat_errs, torch_stat_errs = [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == torch_state[key].item() == 4, key
        elif "running_" in key:
            assert value.dtype == torch.float32, key
            stat_errs.append(_rel(value, ref_state[key]))
            torch_stat_errs.append(_rel(torch_state[key], ref_state[key]))
    assert len(stat_errs) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert _rms(stat_errs) <= 1.5 * _rms(torch_stat_errs) + 1e-3


# ---------------------------------------------------------------------------
# the AutocastCPU kernels: direct torch.ops.cnnops calls under torch.autocast("cpu")

def test_direct_ops_under_cpu_autocast_run_bfloat16():
    torch.manual_seed(26)
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    w = (torch.randn(4, 3, 3, 3) * 0.5).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    r = torch.randn(2, 4, 7, 7, requires_grad=True)
    bw, bb = (torch.rand(4) + 0.5).requires_grad_(), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    ops = torch.ops.cnnops
    with torch.autocast("cpu", dtype=BF16):
        y = ops.conv2d(x, w, b, *conv)
        yr = ops.conv2d_relu(x, w, b, r, *conv)
        out, conv_out, mean, invstd = ops.conv_bn_relu(x, w, None, bw, bb, rm, rv, r, *conv,
                                                       True, 1e-5, True)
        ref_y = F.conv2d(x, w, b, 1, 1)  # torch's own autocast convolution
    assert y.dtype == yr.dtype == out.dtype == conv_out.dtype == ref_y.dtype == BF16
    assert mean.dtype == invstd.dtype == torch.float32
    exact = F.conv2d(x.to(BF16).float(), w.to(BF16).float(), b.to(BF16).float(), 1, 1)
    _no_worse_than_torch(y, ref_y, exact, "conv2d")
    _no_worse_than_torch(yr, F.relu(ref_y + r.to(BF16)), F.relu(exact + r.to(BF16).float()),
                         "conv2d_relu")
    exact_cbr = F.relu(F.batch_norm(exact - b.to(BF16).float().view(1, -1, 1, 1), None, None,
                                    bw, bb, True) + r.to(BF16).float())
    torch.testing.assert_close(out.float(), exact_cbr, rtol=2e-2, atol=2e-2)
    # the casts are recorded: gradients reach the float32 leaves, in float32
    for result, leaves in ((y, (x, w, b)), (out, (x, w, bw, bb, r))):
        grads = torch.autograd.grad(result.float().square().sum(), leaves)
        assert all(g.dtype == torch.float32 and g.shape == t.shape
                   for g, t in zip(grads, leaves))
        assert all(g.abs().sum() > 0 for g in grads)


def test_direct_ops_under_cpu_autocast_leave_float64_alone():
    torch.manual_seed(27)
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3,
                                                                    dtype=torch.float64)
    bn = torch.ones(4, dtype=torch.float64)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with torch.autocast("cpu", dtype=BF16):
        y = torch.ops.cnnops.conv2d(x, w, None, *conv)
        yr = torch.ops.cnnops.conv2d_relu(x, w, None, None, *conv)
        out = torch.ops.cnnops.conv_bn_relu(x, w, None, bn, bn, None, None, None, *conv, True,
                                            1e-5, True)
    assert y.dtype == yr.dtype == out[0].dtype == out[2].dtype == torch.float64
    expected = F.conv2d(x, w, None, 1, 1)
    assert_close(y, expected)
    assert_close(yr, F.relu(expected))
    assert_close(out[0], F.relu(F.batch_norm(expected, None, None, bn, bn, True)))


# ---------------------------------------------------------------------------
# tensors derived from parameters (BN folded into the weight, oneDNN's packed weight)

def _changes(conv, bn):
    """In-place changes of every tensor the inference ops derive from, and a swapped weight."""
    def swap_weight():
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
    return [lambda: None, lambda: conv.weight.mul_(-2), lambda: bn.running_var.mul_(3),
            lambda: bn.running_mean.add_(0.5), lambda: bn.weight.add_(1),
            lambda: bn.bias.sub_(1), swap_weight]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("core", ["im2col", "onednn"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_inference_follows_parameter_changes(residual, core, layout, context):
    """The oneDNN core keeps BN folded into the weight, and for channels_last inputs the
    weight packed in oneDNN's layout, while their sources are unchanged: after each in-place
    change of a conv or BN tensor, or a new weight, conv_bn_relu (FusedConvBNReLU) and
    conv2d_relu give what eager gives with the new values."""
    torch.manual_seed(15)
    conv, bn = torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    fused = cnnops.FusedConvBNReLU.from_modules(conv, bn).eval()
    bn.eval()
    x = make_input((2, 6, 9, 9), layout)
    r = make_input((2, 8, 9, 9), layout) if residual else None
    ctx = torch.inference_mode if context == "inference_mode" else torch.no_grad
    for change in _changes(conv, bn):
        with torch.no_grad():
            change()
        with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(core), ctx():
            for _ in range(2):  # the second call reads what the first one kept
                z = bn(F.conv2d(x, conv.weight, conv.bias, padding=1))
                expected = torch.relu(z + r if residual else z)
                out = CF.conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias,
                                      bn.running_mean, bn.running_var, padding=1,
                                      residual=r) if residual else fused(x)
                assert out.is_contiguous(memory_format=expected_memory_format(x))
                assert_close(out, expected)
                y = torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1) +
                               (r if residual else 0))
                assert_close(CF.conv2d_relu(x, conv.weight, conv.bias, 1, 1, residual=r), y)


def _weight_packs(step, steps):
    """How many times oneDNN packs a weight (mkldnn::_reorder_convolution_weight) over
    ``steps`` calls of step()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return sum(e.count for e in prof.key_averages()
               if e.key == "mkldnn::_reorder_convolution_weight")


def test_training_does_not_pack_weights_every_step():
    """A channels_last weight that training changes every step runs as it is (its pack would
    be remade every step); once training stops and the weight stays, inference packs it once
    and reuses the pack."""
    torch.manual_seed(16)
    model = nn.Sequential(cnnops.nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                          cnnops.nn.Conv2d(8, 8, 3, padding=1))
    model = model.to(memory_format=torch.channels_last)
    x = make_input((2, 4, 6, 6), "channels_last")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step():
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("onednn"):
        train_step()
        train_step()
        assert _weight_packs(train_step, 3) == 0
        with torch.no_grad():
            # the first call finds each weight changed since the last step's forward and
            # runs it as it is; the second finds it unchanged and packs it
            assert _weight_packs(lambda: model(x), 3) == 2
            assert _weight_packs(lambda: model(x), 3) == 0
            expected = F.conv2d(F.relu(F.conv2d(x, model[0].weight, model[0].bias, padding=1)),
                                model[2].weight, model[2].bias, padding=1)
            assert_close(model(x), expected)


def test_auto_keys_on_layout():
    """An NCHW and a channels_last call of one shape are two configurations (oneDNN runs
    channels_last natively, im2col converts it), recorded as such."""
    x, w = torch.randn(1, 5, 13, 12), torch.randn(7, 5, 3, 3)  # (a shape no other test runs)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv("auto"), torch.no_grad():
        before = {c["call"] for c in cnnops.cpu_conv_choices()}
        CF.conv2d(x, w, None, 1, 1)
        CF.conv2d(x.contiguous(memory_format=torch.channels_last), w, None, 1, 1)
    calls = sorted(c["call"] for c in _new_choices(before))
    prefix = "conv2d float32 [1, 5, 13, 12] k3x3 s1x1 p1x1 -> 7"
    threads = torch.get_num_threads()
    assert calls == sorted(["%s (%d threads)" % (prefix, threads),
                            "%s channels_last (%d threads)" % (prefix, threads)])

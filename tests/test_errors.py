"""Bad input raises a Python exception that names the argument; it never crashes the process.

Two layers are checked (DESIGN.md, "Errors"):

* the public functions of cnnops.functional, on every CPU backend: each bad-input case
  raises ValueError / TypeError whose message names the argument and what was expected or
  given;
* the compiled ops torch.ops.cnnops.* called directly, bypassing the Python checks: the C++
  TORCH_CHECKs must turn each bad call into a Python exception before memory is touched;
* the Triton ops torch.ops.cnnops_triton.* called directly, the same way: their checks
  (cnnops/triton_kernels/checks.py) raise the compiled ops' exceptions and messages.

Cases that once crashed the process (segfaults) run in a subprocess, so a regression fails
one test instead of the whole run.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import cnnops.functional as CF
from cnnops import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N, C, H, W, OC = 2, 4, 6, 6, 6

# The case tables below are built at import; keep that from shifting the global RNG that the
# other test modules draw from (restored at the end of this module).
_RNG_STATE = torch.get_rng_state()


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape or (N, C, H, W), dtype=dtype)


def _w(oc=OC, c=C, kh=3, kw=3, dtype=torch.float32):
    return torch.randn(oc, c, kh, kw, dtype=dtype)


def _meta(t):
    """The same tensor on another device (meta exists on every machine)."""
    return t.to("meta")


# ---------------------------------------------------------------------------
# cnnops.functional: one thunk per bad call, built from a valid call and overrides.

def conv2d(**kw):
    args = dict(input=_x(), weight=_w(), bias=None, stride=1, padding=1, dilation=1, groups=1)
    args.update(kw)
    return lambda: CF.conv2d(**args)


def conv2d_relu(**kw):
    args = dict(input=_x(), weight=_w(), bias=None, stride=1, padding=1, dilation=1, groups=1)
    args.update(kw)
    return lambda: CF.conv2d_relu(**args)


def conv_bn_relu(**kw):
    args = dict(input=_x(), weight=_w(), bias=None, bn_weight=torch.ones(OC),
                bn_bias=torch.zeros(OC), running_mean=torch.zeros(OC), running_var=torch.ones(OC),
                stride=1, padding=1, dilation=1, groups=1, training=False)
    args.update(kw)
    return lambda: CF.conv_bn_relu(**args)


def batch_norm(**kw):
    args = dict(input=_x(), running_mean=torch.zeros(C), running_var=torch.ones(C),
                weight=torch.ones(C), bias=torch.zeros(C), training=False)
    args.update(kw)
    return lambda: CF.batch_norm(**args)


def bn_relu(**kw):
    args = dict(input=_x(), running_mean=torch.zeros(C), running_var=torch.ones(C),
                weight=torch.ones(C), bias=torch.zeros(C), training=False)
    args.update(kw)
    return lambda: CF.bn_relu(**args)


def max_pool2d(**kw):
    args = dict(input=_x(), kernel_size=2)
    args.update(kw)
    return lambda: CF.max_pool2d(**args)


def avg_pool2d(**kw):
    args = dict(input=_x(), kernel_size=2)
    args.update(kw)
    return lambda: CF.avg_pool2d(**args)


def adaptive_avg_pool2d(**kw):
    args = dict(input=_x(), output_size=2)
    args.update(kw)
    return lambda: CF.adaptive_avg_pool2d(**args)


def add_relu(**kw):
    args = dict(input=_x(), other=_x())
    args.update(kw)
    return lambda: CF.add_relu(**args)


def _input_cases(unbatched):
    """Bad input tensors, shared by every function that takes a 4-D input. unbatched: the
    function also takes [C, H, W], as torch.nn.functional's convolution and pooling do."""
    dims = r"3-D \[C, H, W\] or 4-D" if unbatched else "4-D"
    return [
        ("input-list", dict(input=[[1.0]]), TypeError,
         r"expected input to be a torch\.Tensor, got list"),
        ("input-float", dict(input=1.5), TypeError,
         r"expected input to be a torch\.Tensor, got float"),
        ("input-2d", dict(input=_x(H, W)), ValueError,
         r"expected input to be %s \[N, C, H, W\], got 2-D with shape \(6, 6\)" % dims),
        ("input-5d", dict(input=_x(1, N, C, H, W)), ValueError,
         r"expected input to be %s \[N, C, H, W\], got 5-D with shape \(1, 2, 4, 6, 6\)"
         % dims),
        ("input-int64", dict(input=torch.ones(N, C, H, W, dtype=torch.int64)), TypeError,
         r"expected input to be a floating-point tensor, got torch\.int64"),
        ("input-uint8", dict(input=torch.ones(N, C, H, W, dtype=torch.uint8)), TypeError,
         r"expected input to be a floating-point tensor, got torch\.uint8"),
        ("input-bool", dict(input=torch.ones(N, C, H, W, dtype=torch.bool)), TypeError,
         r"expected input to be a floating-point tensor, got torch\.bool"),
    ] + ([] if unbatched else [
        ("input-3d", dict(input=_x(C, H, W)), ValueError,
         r"expected input to be 4-D \[N, C, H, W\], got 3-D with shape \(4, 6, 6\)"),
    ])


INPUT_CASES = _input_cases(unbatched=False)
UNBATCHED_INPUT_CASES = _input_cases(unbatched=True)

# Convolution arguments, shared by conv2d, conv2d_relu and conv_bn_relu.
CONV_CASES = [
    ("weight-int", dict(weight=3), TypeError, r"expected weight to be a torch\.Tensor, got int"),
    ("weight-dtype", dict(weight=_w(dtype=torch.float64)), TypeError,
     r"expected weight to have dtype torch\.float32 \(the dtype of input\), got torch\.float64"),
    ("weight-device", dict(weight=_meta(_w())), ValueError,
     r"expected weight on cpu \(the device of input\), got meta"),
    ("weight-3d", dict(weight=torch.randn(OC, C, 3)), ValueError,
     r"expected weight to be 4-D \[out_channels, in_channels/groups, kH, kW\], "
     r"got shape \(6, 4, 3\)"),
    ("weight-5d", dict(weight=torch.randn(OC, C, 3, 3, 1)), ValueError,
     r"expected weight to be 4-D .*got shape \(6, 4, 3, 3, 1\)"),
    ("weight-in-channels", dict(weight=_w(c=3)), ValueError,
     r"expected weight of shape \[6, 4, kH, kW\] for input with 4 channels and groups=1, "
     r"got weight of shape \(6, 3, 3, 3\)"),
    ("weight-in-channels-grouped", dict(weight=_w(c=4), groups=2), ValueError,
     r"expected weight of shape \[6, 2, kH, kW\] for input with 4 channels and groups=2, "
     r"got weight of shape \(6, 4, 3, 3\)"),
    ("weight-empty-kernel", dict(weight=_w(kh=0)), ValueError,
     r"expected a non-empty kernel, got weight of shape \(6, 4, 0, 3\)"),
    ("groups-not-dividing-in", dict(groups=3), ValueError,
     r"in_channels \(4\) must be divisible by groups \(3\)"),
    ("groups-not-dividing-out", dict(weight=_w(oc=3, c=2), groups=2), ValueError,
     r"out_channels \(3\) must be positive and divisible by groups \(2\)"),
    ("out-channels-0", dict(weight=_w(oc=0)), ValueError,
     r"out_channels \(0\) must be positive"),
    ("groups-0", dict(groups=0), ValueError, r"expected groups to be a positive int, got 0"),
    ("groups-negative", dict(groups=-2), ValueError,
     r"expected groups to be a positive int, got -2"),
    ("groups-float", dict(groups=2.0), ValueError,
     r"expected groups to be a positive int, got 2\.0"),
    ("stride-0", dict(stride=0), ValueError, r"expected stride >= 1, got 0"),
    ("stride-negative", dict(stride=(1, -1)), ValueError, r"expected stride >= 1, got \(1, -1\)"),
    ("stride-float", dict(stride=1.5), TypeError,
     r"expected stride to be an int or a pair of ints, got 1\.5"),
    ("stride-triple", dict(stride=(1, 1, 1)), TypeError,
     r"expected stride to be an int or a pair of ints, got \(1, 1, 1\)"),
    ("padding-negative", dict(padding=-1), ValueError, r"expected padding >= 0, got -1"),
    ("dilation-0", dict(dilation=0), ValueError, r"expected dilation >= 1, got 0"),
    ("dilation-negative", dict(dilation=(-1, 1)), ValueError,
     r"expected dilation >= 1, got \(-1, 1\)"),
    ("padding-bad-string", dict(padding="full"), ValueError,
     r"expected padding to be an int, a pair, 'same' or 'valid', got 'full'"),
    ("padding-same-strided", dict(padding="same", stride=2), ValueError,
     r"padding='same' is not supported for strided convolutions \(got stride=\(2, 2\)\)"),
    ("kernel-larger-than-padded-input", dict(weight=_w(kh=9, kw=9)), ValueError,
     r"input height 6 with padding 1 is smaller than the dilated kernel \(9\): "
     r"the output would be empty"),
    ("dilated-kernel-larger-than-input", dict(padding=0, dilation=(1, 4)), ValueError,
     r"input width 6 with padding 0 is smaller than the dilated kernel \(9\)"),
    ("kernel-larger-valid", dict(weight=_w(kh=7, kw=1), padding="valid"), ValueError,
     r"input height 6 with padding 0 is smaller than the dilated kernel \(7\)"),
    ("bias-shape", dict(bias=torch.zeros(5)), ValueError,
     r"expected bias of shape \(6,\), got \(5,\)"),
    ("bias-2d", dict(bias=torch.zeros(OC, 1)), ValueError,
     r"expected bias of shape \(6,\), got \(6, 1\)"),
    ("bias-dtype", dict(bias=torch.zeros(OC, dtype=torch.float64)), TypeError,
     r"expected bias to have dtype torch\.float32 \(the dtype of input\), got torch\.float64"),
    ("bias-device", dict(bias=_meta(torch.zeros(OC))), ValueError,
     r"expected bias on cpu \(the device of input\), got meta"),
    ("bias-not-tensor", dict(bias=[0.0] * OC), TypeError,
     r"expected bias to be a torch\.Tensor, got list"),
]

# BatchNorm arguments (channel count `ch`), shared by batch_norm, bn_relu and conv_bn_relu.
# conv_bn_relu calls its BN affine parameters bn_weight / bn_bias.


def _bn_cases(ch, spatial_input, weight_name, bias_name, out_shape):
    one = dict(input=_x(1, C, 1, 1)) if spatial_input else dict(input=_x(1, C, 3, 3), padding=0)
    return [
        ("running_mean-shape", dict(running_mean=torch.zeros(ch - 1)), ValueError,
         r"expected running_mean of shape \(%d,\), got \(%d,\)" % (ch, ch - 1)),
        ("running_var-shape", dict(running_var=torch.ones(ch + 1)), ValueError,
         r"expected running_var of shape \(%d,\), got \(%d,\)" % (ch, ch + 1)),
        ("running_mean-2d", dict(running_mean=torch.zeros(1, ch)), ValueError,
         r"expected running_mean of shape \(%d,\), got \(1, %d\)" % (ch, ch)),
        ("running_var-device", dict(running_var=_meta(torch.ones(ch))), ValueError,
         r"expected running_var on cpu \(the device of input\), got meta"),
        ("running_mean-not-tensor", dict(running_mean=[0.0] * ch), TypeError,
         r"expected running_mean to be a torch\.Tensor, got list"),
        ("bn-weight-shape", {weight_name: torch.ones(ch + 2)}, ValueError,
         # the message may call it weight or bn_weight
         r"weight of shape \(%d,\), got \(%d,\)" % (ch, ch + 2)),
        ("bn-bias-shape", {bias_name: torch.zeros(ch - 2)}, ValueError,
         r"bias of shape \(%d,\), got \(%d,\)" % (ch, ch - 2)),
        ("bn-weight-device", {weight_name: _meta(torch.ones(ch))}, ValueError,
         r"weight on cpu \(the device of input\), got meta"),
        ("training-one-value-per-channel", dict(one, training=True), ValueError,
         r"Expected more than 1 value per channel when training, got input size "
         r"torch\.Size\(\[1, %d, 1, 1\]\)" % ch),
        ("eval-without-running-stats", dict(running_mean=None, running_var=None), ValueError,
         r"batch_norm with training=False needs running_mean and running_var"),
        ("eval-without-running_var", dict(running_var=None), ValueError,
         r"training=False needs running_mean and running_var"),
        ("momentum-None", dict(momentum=None), TypeError,
         r"expected momentum to be a float .*got None"),
        ("eps-negative", dict(eps=-1.0), ValueError, r"expected eps to be a float >= 0, got -1\.0"),
    ] + ([] if out_shape is None else _residual_cases(out_shape))


def _residual_cases(out_shape):
    return [
        ("residual-shape", dict(residual=torch.zeros(out_shape[:-1] + (out_shape[-1] - 1,))),
         ValueError, r"expected residual of shape %s, got" % _re_tuple(out_shape)),
        ("residual-dtype", dict(residual=torch.zeros(out_shape, dtype=torch.float64)),
         TypeError,
         r"expected residual to have dtype torch\.float32 \(the dtype of input\), "
         r"got torch\.float64"),
        ("residual-device", dict(residual=_meta(torch.zeros(out_shape))), ValueError,
         r"expected residual on cpu \(the device of input\), got meta"),
        ("residual-not-tensor", dict(residual=1.0), TypeError,
         r"expected residual to be a torch\.Tensor, got float"),
    ]


def _re_tuple(t):
    return "\\(" + ", ".join(str(v) for v in t) + "\\)"


# Pooling window arguments, shared by max_pool2d and avg_pool2d.
POOL_CASES = UNBATCHED_INPUT_CASES + [
    ("kernel_size-0", dict(kernel_size=0), ValueError, r"expected kernel_size >= 1, got 0"),
    ("kernel_size-negative", dict(kernel_size=(2, -1)), ValueError,
     r"expected kernel_size >= 1, got \(2, -1\)"),
    ("kernel_size-triple", dict(kernel_size=(2, 2, 2)), TypeError,
     r"expected kernel_size to be an int or a pair of ints, got \(2, 2, 2\)"),
    ("kernel_size-float", dict(kernel_size=2.0), TypeError,
     r"expected kernel_size to be an int or a pair of ints, got 2\.0"),
    ("stride-0", dict(stride=0), ValueError, r"expected stride >= 1, got 0"),
    ("stride-negative", dict(stride=(-1, 1)), ValueError, r"expected stride >= 1, got \(-1, 1\)"),
    ("padding-negative", dict(kernel_size=3, padding=-1), ValueError,
     r"expected padding >= 0, got -1"),
    ("padding-over-half-kernel", dict(kernel_size=3, padding=2), ValueError,
     r"pad should be at most half of effective kernel size, got padding=\(2, 2\) "
     r"for kernel_size=\(3, 3\)"),
    ("padding-over-half-kernel-w", dict(kernel_size=(4, 2), padding=(2, 2)), ValueError,
     r"pad should be at most half of effective kernel size, got padding=\(2, 2\) "
     r"for kernel_size=\(4, 2\)"),
    ("output-empty", dict(kernel_size=7), ValueError,
     r"input of spatial size \(6, 6\) is too small for kernel_size=\(7, 7\), padding=\(0, 0\).*"
     r"the output would be empty"),
    ("output-empty-one-dim", dict(input=_x(N, C, 2, 8), kernel_size=3), ValueError,
     r"input of spatial size \(2, 8\) is too small for kernel_size=\(3, 3\)"),
    ("input-no-channels", dict(input=_x(N, 0, H, W)), ValueError,
     r"expected input with non-zero sizes in every dimension from 1 on \(only the batch may be "
     r"empty\), got shape \(2, 0, 6, 6\)"),
]

MAX_POOL_CASES = POOL_CASES + [
    ("dilation-0", dict(dilation=0), ValueError, r"expected dilation >= 1, got 0"),
    ("dilated-output-empty", dict(kernel_size=3, dilation=3), ValueError,
     r"input of spatial size \(6, 6\) is too small for kernel_size=\(3, 3\), padding=\(0, 0\), "
     r"dilation=\(3, 3\): the output would be empty"),
]

AVG_POOL_CASES = POOL_CASES + [
    ("divisor_override-0", dict(divisor_override=0), ValueError,
     r"expected divisor_override to be a non-zero int or None, got 0"),
    ("divisor_override-float", dict(divisor_override=2.5), ValueError,
     r"expected divisor_override to be a non-zero int or None, got 2\.5"),
]

ADAPTIVE_CASES = UNBATCHED_INPUT_CASES + [
    ("output_size-negative", dict(output_size=(2, -1)), ValueError,
     r"expected output_size >= 0, got \(2, -1\)"),
    ("output_size-string", dict(output_size="2"), TypeError,
     r"expected output_size to be an int or a pair.*got '2'"),
    ("input-empty-plane", dict(input=_x(N, C, 0, W)), ValueError,
     r"expected input with non-zero sizes in every dimension from 2 on \(only the batch may be "
     r"empty\), got shape \(2, 4, 0, 6\)"),
    ("output_size-triple", dict(output_size=(1, 2, 3)), ValueError,
     r"expected output_size to be an int or a pair, got \(1, 2, 3\)"),
    ("output_size-float", dict(output_size=(2.5, 2)), TypeError,
     r"expected output_size to be an int or a pair of ints, got \(2\.5, 2\)"),
]

ADD_RELU_CASES = [
    ("input-list", dict(input=[1.0]), TypeError, r"expected input to be a torch\.Tensor, got list"),
    ("other-float", dict(other=1.0), TypeError, r"expected other to be a torch\.Tensor, got float"),
    ("int-dtype", dict(input=torch.ones(N, C, H, W, dtype=torch.int64),
                       other=torch.ones(N, C, H, W, dtype=torch.int64)), TypeError,
     r"floating-point input or other, got input of dtype torch\.int64 and other of dtype "
     r"torch\.int64"),
    ("bool-dtype", dict(input=torch.ones(N, C, H, W, dtype=torch.bool),
                        other=torch.ones(N, C, H, W, dtype=torch.bool)), TypeError,
     r"floating-point input or other, got input of dtype torch\.bool and other of dtype "
     r"torch\.bool"),
    ("device", dict(other=_meta(_x())), ValueError,
     r"expected input and other on the same device, got cpu and meta"),
    ("no-broadcast", dict(other=_x(3, H, W)), ValueError,
     r"input of shape \(2, 4, 6, 6\) and other of shape \(3, 6, 6\) do not broadcast"),
    ("no-broadcast-spatial", dict(other=_x(N, C, H, W - 1)), ValueError,
     r"input of shape \(2, 4, 6, 6\) and other of shape \(2, 4, 6, 5\) do not broadcast"),
]

CBR_OUT = (N, OC, H, W)  # conv_bn_relu's output with padding=1


def _params(prefix, make, cases):
    return [pytest.param(make(**kw), exc, match, id="%s-%s" % (prefix, name))
            for name, kw, exc, match in cases]


FUNCTIONAL_CASES = (
    _params("conv2d", conv2d, UNBATCHED_INPUT_CASES + CONV_CASES)
    + _params("conv_bn_relu", conv_bn_relu,
              INPUT_CASES + CONV_CASES + _bn_cases(OC, False, "bn_weight", "bn_bias", CBR_OUT))
    + _params("batch_norm", batch_norm, INPUT_CASES + _bn_cases(C, True, "weight", "bias", None))
    + _params("bn_relu", bn_relu,
              INPUT_CASES + _bn_cases(C, True, "weight", "bias", (N, C, H, W)))
    + _params("max_pool2d", max_pool2d, MAX_POOL_CASES)
    + _params("avg_pool2d", avg_pool2d, AVG_POOL_CASES)
    + _params("adaptive_avg_pool2d", adaptive_avg_pool2d, ADAPTIVE_CASES)
    + _params("add_relu", add_relu, ADD_RELU_CASES)
    # conv2d_relu: conv2d's arguments plus a residual
    + _params("conv2d_relu", conv2d_relu,
              UNBATCHED_INPUT_CASES + CONV_CASES + _residual_cases(CBR_OUT))
)


@pytest.mark.parametrize("call, exc, match", FUNCTIONAL_CASES)
def test_functional_bad_input_raises(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_every_public_function_is_covered():
    covered = {p.id.split("-")[0] for p in FUNCTIONAL_CASES}
    assert covered >= {"conv2d", "batch_norm", "bn_relu", "conv_bn_relu", "max_pool2d",
                       "avg_pool2d", "adaptive_avg_pool2d", "add_relu"}
    assert covered == set(CF.__all__)


def test_valid_calls_used_as_the_base_run(backend):
    """The cases above differ from these calls only by the bad argument."""
    makers = [conv2d, conv_bn_relu, batch_norm, bn_relu, max_pool2d, avg_pool2d,
              adaptive_avg_pool2d, add_relu, conv2d_relu]
    for make in makers:
        out = make()()
        assert isinstance(out, torch.Tensor) and out.dim() == 4
    assert conv_bn_relu()().shape == CBR_OUT


# BN affine / running-statistic tensors of another dtype than input (float64 for a float32
# input). torch.nn.functional.batch_norm rejects this on the CPU ("mixed dtype (CPU): expect
# parameter to have scalar type of Float"), and so does the `cpu` backend; the `reference`
# backend runs it (cnnops.functional checks BN tensors with same_dtype=False).
BN_DTYPE_CASES = [
    pytest.param(batch_norm(weight=torch.ones(C, dtype=torch.float64)), "weight",
                 id="batch_norm-weight"),
    pytest.param(batch_norm(running_mean=torch.zeros(C, dtype=torch.float64),
                            running_var=torch.ones(C, dtype=torch.float64)), "running_mean",
                 id="batch_norm-running_stats"),
    pytest.param(bn_relu(bias=torch.zeros(C, dtype=torch.float64)), "bias", id="bn_relu-bias"),
    pytest.param(conv_bn_relu(bn_weight=torch.ones(OC, dtype=torch.float64)), "weight",
                 id="conv_bn_relu-bn_weight"),
]


@pytest.mark.parametrize("call, name", BN_DTYPE_CASES)
def test_bn_parameter_dtype_mismatch_raises(backend, call, name):
    with pytest.raises(TypeError, match=r"%s.*dtype.*(Float|float32).*(Double|float64)" % name):
        call()


def test_failed_training_call_leaves_running_stats_alone(backend):
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="residual"):
        CF.bn_relu(_x(), rm, rv, None, None, training=True, residual=_x(N, C, H, W - 1))
    rm6, rv6 = torch.randn(OC), torch.rand(OC) + 0.5
    rm6_0, rv6_0 = rm6.clone(), rv6.clone()
    with pytest.raises(ValueError, match="residual"):
        CF.conv_bn_relu(_x(), _w(), None, None, None, rm6, rv6, padding=1, training=True,
                        residual=_x(N, OC, H, W - 1))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(rm6, rm6_0) and torch.equal(rv6, rv6_0)


# ---------------------------------------------------------------------------
# torch.ops.cnnops.* called directly: the C++ checks. (The cases call the ops through the
# module global `ops`, which _child points at the Triton ops for their run.)

S, P, D = [1, 1], [1, 1], [1, 1]
MASK3, MASK4, MASK6 = [True] * 3, [True] * 4, [True] * 6


def _raw_inputs():
    """Valid inputs and forward results that the backward cases reuse (on the default device)."""
    x, w = _x(), _w()
    v = dict(x=x, w=w, go=torch.randn(N, OC, H, W), v4=torch.ones(C), z4=torch.zeros(C),
             v6=torch.ones(OC), z6=torch.zeros(OC))
    v["bn"] = ops.bn_relu(x, None, None, None, None, None, True, 1e-5, True)
    v["cbr"] = ops.conv_bn_relu(x, w, None, None, None, None, None, None, S, P, D, 1, True,
                                1e-5, True)
    v["mp"] = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    v["ap_go"] = torch.randn(N, C, 3, 3)
    return v


def _conv_raw(t, **kw):
    a = dict(input=t["x"], weight=t["w"], bias=None, stride=S, padding=P, dilation=D, groups=1)
    a.update(kw)
    return ops.conv2d(*a.values())


def _cbr_raw(t, **kw):
    a = dict(input=t["x"], weight=t["w"], conv_bias=None, bn_weight=None, bn_bias=None,
             running_mean=None, running_var=None, residual=None, stride=S, padding=P,
             dilation=D, groups=1, training=True, eps=1e-5, relu=True)
    a.update(kw)
    return ops.conv_bn_relu(*a.values())


def _cbr_back_raw(t, **kw):
    out, conv_out, mean, invstd = t["cbr"]
    a = dict(grad_output=t["go"], output=out, input=t["x"], weight=t["w"], conv_bias=None,
             conv_output=conv_out, bn_weight=None, save_mean=mean, save_invstd=invstd,
             stride=S, padding=P, dilation=D, groups=1, training=True, relu=True,
             output_mask=MASK6)
    a.update(kw)
    return ops.conv_bn_relu_backward(*a.values())


def _bn_back_raw(t, **kw):
    out, mean, invstd = t["bn"]
    a = dict(grad_output=t["x"], output=out, input=t["x"], weight=None, save_mean=mean,
             save_invstd=invstd, training=True, relu=True, output_mask=MASK4)
    a.update(kw)
    return ops.bn_relu_backward(*a.values())


def _elemt_raw(t, **kw):
    out, mean, invstd = t["bn"]
    a = dict(grad_output=t["x"], output=out, input=t["x"], weight=None, save_mean=mean,
             save_invstd=invstd, mean_dy=t["z4"], mean_dy_xhat=t["z4"], relu=True,
             output_mask=[True, True])
    a.update(kw)
    return ops.bn_relu_backward_elemt(*a.values())


def _mp_back_raw(t, **kw):
    out, idx = t["mp"]
    a = dict(grad_output=out, input=t["x"], indices=idx, kernel_size=[2, 2], stride=[2, 2],
             padding=[0, 0], dilation=[1, 1])
    a.update(kw)
    return ops.max_pool2d_backward(*a.values())


def _ap_raw(t, **kw):
    a = dict(input=t["x"], kernel_size=[2, 2], stride=[2, 2], padding=[0, 0], ceil_mode=False,
             count_include_pad=True, divisor_override=None)
    a.update(kw)
    return ops.avg_pool2d(*a.values())


def _ap_back_raw(t, **kw):
    a = dict(grad_output=t["ap_go"], input=t["x"], kernel_size=[2, 2], stride=[2, 2],
             padding=[0, 0], ceil_mode=False, count_include_pad=True, divisor_override=None)
    a.update(kw)
    return ops.avg_pool2d_backward(*a.values())


def _mp_raw(t, **kw):
    a = dict(input=t["x"], kernel_size=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1],
             ceil_mode=False)
    a.update(kw)
    return ops.max_pool2d(*a.values())


ops = torch.ops.cnnops
CPU_DTYPE = r"the cnnops CPU kernels support float32 and float64; %s has dtype %s"
# The convolutions also run bfloat16 (on their oneDNN core).
CPU_CONV_DTYPE = (r"the cnnops CPU convolutions support float32, float64 and bfloat16; "
                  r"%s has dtype %s")
H16 = torch.float16

RAW_CASES = [
    # conv2d
    ("conv2d-input-3d", lambda t: _conv_raw(t, input=t["x"][0]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 3-D with shape \[4, 6, 6\]"),
    ("conv2d-input-5d", lambda t: _conv_raw(t, input=t["x"][None]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 5-D"),
    ("conv2d-weight-3d", lambda t: _conv_raw(t, weight=t["w"][0]), ValueError,
     r"expected weight to be 4-D \[out_channels, in_channels/groups, kH, kW\], "
     r"got shape \[4, 3, 3\]"),
    ("conv2d-float16", lambda t: _conv_raw(t, input=t["x"].half(), weight=t["w"].half()),
     TypeError, CPU_CONV_DTYPE % ("input", "Half")),
    ("conv2d-bfloat16", lambda t: _conv_raw(t, input=t["x"].bfloat16(), weight=t["w"].bfloat16()),
     TypeError, CPU_CONV_DTYPE % ("input", "BFloat16")),
    ("conv2d-int", lambda t: _conv_raw(t, input=t["x"].int(), weight=t["w"].int()),
     TypeError, CPU_CONV_DTYPE % ("input", "Int")),
    ("conv2d-weight-dtype", lambda t: _conv_raw(t, weight=t["w"].double()), TypeError,
     r"expected weight to have the dtype of input \(Float\), got Double"),
    ("conv2d-channels", lambda t: _conv_raw(t, weight=_w(c=3)), ValueError,
     r"expected weight of shape \[6, 4, kH, kW\] for input with 4 channels and groups=1, "
     r"got weight of shape \[6, 3, 3, 3\]"),
    ("conv2d-groups-in", lambda t: _conv_raw(t, groups=3), ValueError,
     r"in_channels \(4\) must be divisible by groups \(3\)"),
    ("conv2d-groups-out", lambda t: _conv_raw(t, weight=_w(oc=3, c=2), groups=2), ValueError,
     r"out_channels \(3\) must be positive and divisible by groups \(2\)"),
    ("conv2d-groups-0", lambda t: _conv_raw(t, groups=0), ValueError,
     r"expected groups >= 1, got 0"),
    ("conv2d-groups-negative", lambda t: _conv_raw(t, groups=-4), ValueError,
     r"expected groups >= 1, got -4"),
    ("conv2d-stride-negative", lambda t: _conv_raw(t, stride=[-1, 1]), ValueError,
     r"expected stride >= 1, got \[-1, 1\]"),
    ("conv2d-stride-0", lambda t: _conv_raw(t, stride=[1, 0]), ValueError,
     r"expected stride >= 1, got \[1, 0\]"),
    ("conv2d-stride-3-entries", lambda t: _conv_raw(t, stride=[1, 1, 1]), ValueError,
     r"expected stride to have 2 entries, got 3"),
    ("conv2d-padding-negative", lambda t: _conv_raw(t, padding=[0, -1]), ValueError,
     r"expected padding >= 0, got \[0, -1\]"),
    ("conv2d-dilation-0", lambda t: _conv_raw(t, dilation=[0, 1]), ValueError,
     r"expected dilation >= 1, got \[0, 1\]"),
    ("conv2d-kernel-too-big", lambda t: _conv_raw(t, weight=_w(kh=9, kw=9)), ValueError,
     r"input of spatial size \(6, 6\) with padding \[1, 1\] is smaller than the dilated "
     r"kernel \(9, 9\): the output would be empty"),
    ("conv2d-empty-kernel", lambda t: _conv_raw(t, weight=_w(kw=0)), ValueError,
     r"expected a non-empty kernel, got weight of shape \[6, 4, 3, 0\]"),
    ("conv2d-bias-shape", lambda t: _conv_raw(t, bias=torch.zeros(5)), ValueError,
     r"expected bias of shape \[6\], got \[5\]"),
    ("conv2d-bias-2d", lambda t: _conv_raw(t, bias=torch.zeros(OC, 1)), ValueError,
     r"expected bias of shape \[6\], got \[6, 1\]"),
    ("conv2d-bias-dtype", lambda t: _conv_raw(t, bias=torch.zeros(OC).double()), TypeError,
     r"expected bias to have the dtype of input \(Float\), got Double"),
    # conv2d_backward
    ("conv2d_backward-grad-shape", lambda t: ops.conv2d_backward(
        torch.randn(N, OC, H - 1, W), t["x"], t["w"], S, P, D, 1, MASK3), ValueError,
     r"expected grad_output of shape \[2, 6, 6, 6\], got \[2, 6, 5, 6\]"),
    ("conv2d_backward-grad-channels", lambda t: ops.conv2d_backward(
        torch.randn(N, C, H, W), t["x"], t["w"], S, P, D, 1, MASK3), ValueError,
     r"expected grad_output of shape \[2, 6, 6, 6\], got \[2, 4, 6, 6\]"),
    ("conv2d_backward-grad-3d", lambda t: ops.conv2d_backward(
        t["go"][0], t["x"], t["w"], S, P, D, 1, MASK3), ValueError,
     r"expected grad_output of shape \[2, 6, 6, 6\], got \[6, 6, 6\]"),
    ("conv2d_backward-grad-dtype", lambda t: ops.conv2d_backward(
        t["go"].double(), t["x"], t["w"], S, P, D, 1, MASK3), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("conv2d_backward-float16", lambda t: ops.conv2d_backward(
        t["go"].half(), t["x"].half(), t["w"].half(), S, P, D, 1, MASK3), TypeError,
     CPU_CONV_DTYPE % ("input", "Half")),
    ("conv2d_backward-stride-negative", lambda t: ops.conv2d_backward(
        t["go"], t["x"], t["w"], [-1, -1], P, D, 1, MASK3), ValueError,
     r"expected stride >= 1, got \[-1, -1\]"),
    ("conv2d_backward-weight-channels", lambda t: ops.conv2d_backward(
        t["go"], t["x"], _w(c=2), S, P, D, 1, MASK3), ValueError,
     r"expected weight of shape \[6, 4, kH, kW\]"),
    # batch_norm / batch_norm_backward
    ("batch_norm-input-3d", lambda t: ops.batch_norm(t["x"][0], None, None, None, None, True,
                                                     1e-5), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 3-D"),
    ("batch_norm-input-5d", lambda t: ops.batch_norm(t["x"][None], None, None, None, None, True,
                                                     1e-5), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 5-D"),
    ("batch_norm-float16", lambda t: ops.batch_norm(t["x"].half(), None, None, None, None, True,
                                                    1e-5), TypeError,
     CPU_DTYPE % ("input", "Half")),
    ("batch_norm-int", lambda t: ops.batch_norm(t["x"].long(), None, None, None, None, True,
                                                1e-5), TypeError, CPU_DTYPE % ("input", "Long")),
    ("batch_norm-weight-shape", lambda t: ops.batch_norm(t["x"], None, None, torch.ones(3), None,
                                                         True, 1e-5), ValueError,
     r"expected weight of shape \[4\], got \[3\]"),
    ("batch_norm-bias-dtype", lambda t: ops.batch_norm(t["x"], None, None, None,
                                                       t["z4"].double(), True, 1e-5), TypeError,
     r"expected bias to have the dtype of input \(Float\), got Double"),
    ("batch_norm-running_mean-shape", lambda t: ops.batch_norm(
        t["x"], torch.zeros(5), t["v4"], None, None, False, 1e-5), ValueError,
     r"expected running_mean of shape \[4\], got \[5\]"),
    ("batch_norm-running_var-2d", lambda t: ops.batch_norm(
        t["x"], t["z4"], torch.ones(2, 2), None, None, False, 1e-5), ValueError,
     r"expected running_var of shape \[4\], got \[2, 2\]"),
    ("batch_norm-eval-without-stats", lambda t: ops.batch_norm(
        t["x"], None, None, None, None, False, 1e-5), ValueError,
     r"batch_norm in inference mode \(training=False\) needs running_mean and running_var"),
    ("batch_norm-eps-negative", lambda t: ops.batch_norm(
        t["x"], None, None, None, None, True, -1.0), ValueError, r"expected eps >= 0, got -1"),
    ("batch_norm_backward-grad-shape", lambda t: ops.batch_norm_backward(
        torch.randn(N, C, H, W - 1), t["x"], None, t["bn"][1], t["bn"][2], True, MASK3),
     ValueError, r"expected grad_output of shape \[2, 4, 6, 6\], got \[2, 4, 6, 5\]"),
    ("batch_norm_backward-grad-dtype", lambda t: ops.batch_norm_backward(
        t["x"].double(), t["x"], None, t["bn"][1], t["bn"][2], True, MASK3), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("batch_norm_backward-save_mean-shape", lambda t: ops.batch_norm_backward(
        t["x"], t["x"], None, torch.zeros(3), t["bn"][2], True, MASK3), ValueError,
     r"expected save_mean of shape \[4\], got \[3\]"),
    ("batch_norm_backward-save_invstd-dtype", lambda t: ops.batch_norm_backward(
        t["x"], t["x"], None, t["bn"][1], t["bn"][2].double(), True, MASK3), TypeError,
     r"expected save_invstd to have the dtype of input \(Float\), got Double"),
    ("batch_norm_backward-weight-shape", lambda t: ops.batch_norm_backward(
        t["x"], t["x"], torch.ones(5), t["bn"][1], t["bn"][2], True, MASK3), ValueError,
     r"expected weight of shape \[4\], got \[5\]"),
    ("batch_norm_backward-float16", lambda t: ops.batch_norm_backward(
        t["x"].half(), t["x"].half(), None, t["bn"][1].half(), t["bn"][2].half(), True, MASK3),
     TypeError, CPU_DTYPE % ("input", "Half")),
    # bn_relu / bn_relu_backward
    ("bn_relu-residual-shape", lambda t: ops.bn_relu(
        t["x"], None, None, None, None, torch.randn(N, C, H, W - 1), True, 1e-5, True),
     ValueError, r"expected residual of shape \[2, 4, 6, 6\] \(the shape of input\), "
                 r"got \[2, 4, 6, 5\]"),
    ("bn_relu-residual-dtype", lambda t: ops.bn_relu(
        t["x"], None, None, None, None, t["x"].double(), True, 1e-5, True), TypeError,
     r"expected residual to have the dtype of input \(Float\), got Double"),
    ("bn_relu-input-5d", lambda t: ops.bn_relu(
        t["x"][None], None, None, None, None, None, True, 1e-5, True), ValueError,
     r"expected input to be 4-D"),
    ("bn_relu-int", lambda t: ops.bn_relu(
        t["x"].int(), None, None, None, None, None, True, 1e-5, True), TypeError,
     CPU_DTYPE % ("input", "Int")),
    ("bn_relu_backward-grad-shape", lambda t: _bn_back_raw(t, grad_output=_x(N, C, H - 1, W)),
     ValueError, r"expected grad_output of shape \[2, 4, 6, 6\], got \[2, 4, 5, 6\]"),
    ("bn_relu_backward-output-shape", lambda t: _bn_back_raw(t, output=_x(N, C, H - 1, W)),
     ValueError, r"expected output of shape \[2, 4, 6, 6\], got \[2, 4, 5, 6\]"),
    ("bn_relu_backward-output-missing", lambda t: _bn_back_raw(t, output=None), ValueError,
     r"bn_relu_backward with relu=True needs the forward output"),
    ("bn_relu_backward-output-dtype", lambda t: _bn_back_raw(t, output=t["bn"][0].double()),
     TypeError, r"expected output to have the dtype of input \(Float\), got Double"),
    ("bn_relu_backward-save_mean-dtype", lambda t: _bn_back_raw(t, save_mean=t["bn"][1].double()),
     TypeError, r"expected save_mean to have the dtype of input \(Float\), got Double"),
    ("bn_relu_backward-save_invstd-shape", lambda t: _bn_back_raw(t, save_invstd=torch.ones(6)),
     ValueError, r"expected save_invstd of shape \[4\], got \[6\]"),
    ("bn_relu_backward-float16", lambda t: _bn_back_raw(
        t, grad_output=t["x"].half(), input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    # batch_norm_stats / bn_relu_backward_elemt (synchronised BN)
    ("batch_norm_stats-input-3d", lambda t: ops.batch_norm_stats(t["x"][0]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 3-D"),
    ("batch_norm_stats-empty", lambda t: ops.batch_norm_stats(t["x"][:0]), ValueError,
     r"batch_norm_stats needs at least one value per channel, got input of shape "
     r"\[0, 4, 6, 6\]"),
    ("batch_norm_stats-int", lambda t: ops.batch_norm_stats(t["x"].int()), TypeError,
     CPU_DTYPE % ("input", "Int")),
    ("bn_relu_backward_elemt-grad-shape", lambda t: _elemt_raw(t, grad_output=_x(N, C, H - 1, W)),
     ValueError, r"expected grad_output of shape \[2, 4, 6, 6\], got \[2, 4, 5, 6\]"),
    ("bn_relu_backward_elemt-output-missing", lambda t: _elemt_raw(t, output=None), ValueError,
     r"bn_relu_backward_elemt with relu=True needs the forward output"),
    ("bn_relu_backward_elemt-mean_dy-shape", lambda t: _elemt_raw(t, mean_dy=torch.zeros(6)),
     ValueError, r"expected mean_dy of shape \[4\], got \[6\]"),
    ("bn_relu_backward_elemt-mean_dy_xhat-dtype", lambda t: _elemt_raw(
        t, mean_dy_xhat=t["z4"].double()), TypeError,
     r"expected mean_dy_xhat to have the dtype of input \(Float\), got Double"),
    ("bn_relu_backward_elemt-float16", lambda t: _elemt_raw(
        t, grad_output=t["x"].half(), input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    # conv_bn_relu / conv_bn_relu_backward
    ("conv_bn_relu-input-3d", lambda t: _cbr_raw(t, input=t["x"][0]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 3-D"),
    ("conv_bn_relu-float16", lambda t: _cbr_raw(t, input=t["x"].half(), weight=t["w"].half()),
     TypeError, CPU_CONV_DTYPE % ("input", "Half")),
    ("conv_bn_relu-channels", lambda t: _cbr_raw(t, weight=_w(c=3)), ValueError,
     r"expected weight of shape \[6, 4, kH, kW\] for input with 4 channels"),
    ("conv_bn_relu-groups", lambda t: _cbr_raw(t, groups=3), ValueError,
     r"in_channels \(4\) must be divisible by groups \(3\)"),
    ("conv_bn_relu-stride-0", lambda t: _cbr_raw(t, stride=[0, 0]), ValueError,
     r"expected stride >= 1, got \[0, 0\]"),
    ("conv_bn_relu-padding-negative", lambda t: _cbr_raw(t, padding=[-1, -1]), ValueError,
     r"expected padding >= 0, got \[-1, -1\]"),
    ("conv_bn_relu-conv_bias-shape", lambda t: _cbr_raw(t, conv_bias=torch.zeros(C)), ValueError,
     r"expected conv_bias of shape \[6\], got \[4\]"),
    ("conv_bn_relu-bn_weight-shape", lambda t: _cbr_raw(t, bn_weight=torch.ones(C)), ValueError,
     r"expected bn_weight of shape \[6\], got \[4\]"),
    ("conv_bn_relu-bn_bias-dtype", lambda t: _cbr_raw(t, bn_bias=t["z6"].double()), TypeError,
     r"expected bn_bias to have the dtype of input \(Float\), got Double"),
    ("conv_bn_relu-running_var-shape", lambda t: _cbr_raw(
        t, running_mean=t["z6"], running_var=torch.ones(C), training=False), ValueError,
     r"expected running_var of shape \[6\], got \[4\]"),
    ("conv_bn_relu-eval-without-stats", lambda t: _cbr_raw(t, training=False), ValueError,
     r"conv_bn_relu in inference mode \(training=False\) needs running_mean and running_var"),
    ("conv_bn_relu-residual-shape", lambda t: _cbr_raw(t, residual=torch.randn(N, OC, 4, 4)),
     ValueError,
     r"expected residual of the conv output's shape \[2, 6, 6, 6\], got \[2, 6, 4, 4\]"),
    ("conv_bn_relu-eps-negative", lambda t: _cbr_raw(t, eps=-0.5), ValueError,
     r"expected eps >= 0, got -0\.5"),
    ("conv_bn_relu_backward-grad-shape", lambda t: _cbr_back_raw(
        t, grad_output=torch.randn(N, OC, H - 1, W)), ValueError,
     r"expected grad_output of shape \[2, 6, 6, 6\], got \[2, 6, 5, 6\]"),
    ("conv_bn_relu_backward-grad-dtype", lambda t: _cbr_back_raw(
        t, grad_output=t["go"].double()), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("conv_bn_relu_backward-output-shape", lambda t: _cbr_back_raw(
        t, output=torch.randn(N, OC, H, W - 1)), ValueError,
     r"expected output of shape \[2, 6, 6, 6\], got \[2, 6, 6, 5\]"),
    ("conv_bn_relu_backward-conv_output-shape", lambda t: _cbr_back_raw(
        t, conv_output=torch.randn(N, OC, H, W - 1)), ValueError,
     r"expected conv_output of shape \[2, 6, 6, 6\], got \[2, 6, 6, 5\]"),
    ("conv_bn_relu_backward-conv_output-empty-in-training", lambda t: _cbr_back_raw(
        t, conv_output=torch.empty(0)), ValueError,
     r"expected conv_output of shape \[2, 6, 6, 6\], got \[0\]"),
    ("conv_bn_relu_backward-save_mean-shape", lambda t: _cbr_back_raw(
        t, save_mean=torch.zeros(C)), ValueError, r"expected save_mean of shape \[6\], got \[4\]"),
    ("conv_bn_relu_backward-bn_weight-shape", lambda t: _cbr_back_raw(
        t, bn_weight=torch.ones(C)), ValueError, r"expected bn_weight of shape \[6\], got \[4\]"),
    ("conv_bn_relu_backward-stride-negative", lambda t: _cbr_back_raw(t, stride=[-1, -1]),
     ValueError, r"expected stride >= 1, got \[-1, -1\]"),
    ("conv_bn_relu_backward-groups-0", lambda t: _cbr_back_raw(t, groups=0), ValueError,
     r"expected groups >= 1, got 0"),
    ("conv_bn_relu_backward-float16", lambda t: _cbr_back_raw(
        t, grad_output=t["go"].half(), input=t["x"].half(), weight=t["w"].half()), TypeError,
     CPU_CONV_DTYPE % ("input", "Half")),
    # max_pool2d / max_pool2d_backward
    ("max_pool2d-input-3d", lambda t: _mp_raw(t, input=t["x"][0]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 3-D"),
    ("max_pool2d-float16", lambda t: _mp_raw(t, input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    ("max_pool2d-int", lambda t: _mp_raw(t, input=t["x"].int()), TypeError,
     CPU_DTYPE % ("input", "Int")),
    ("max_pool2d-stride-negative", lambda t: _mp_raw(t, stride=[-1, 2]), ValueError,
     r"expected stride >= 1, got \[-1, 2\]"),
    ("max_pool2d-stride-0", lambda t: _mp_raw(t, stride=[0, 0]), ValueError,
     r"expected stride >= 1, got \[0, 0\]"),
    ("max_pool2d-kernel-0", lambda t: _mp_raw(t, kernel_size=[0, 2]), ValueError,
     r"expected kernel_size >= 1, got \[0, 2\]"),
    ("max_pool2d-kernel-huge", lambda t: _mp_raw(t, kernel_size=[2 ** 40, 2]), ValueError,
     r"expected kernel_size <= 2147483647, got \[1099511627776, 2\]"),
    ("max_pool2d-padding-over-half", lambda t: _mp_raw(t, padding=[2, 0], stride=[1, 1]),
     ValueError, r"max_pool2d: expected padding to be at most half of kernel_size"),
    ("max_pool2d-padding-negative", lambda t: _mp_raw(t, padding=[-1, 0]), ValueError,
     r"expected padding >= 0, got \[-1, 0\]"),
    ("max_pool2d-dilation-0", lambda t: _mp_raw(t, dilation=[0, 1]), ValueError,
     r"expected dilation >= 1, got \[0, 1\]"),
    ("max_pool2d-output-empty", lambda t: _mp_raw(t, kernel_size=[7, 7], stride=[1, 1]),
     ValueError, r"max_pool2d: input of spatial size 6x6 gives an output of size 0x0"),
    ("max_pool2d-zero-channels", lambda t: _mp_raw(t, input=torch.randn(N, 0, H, W)), ValueError,
     r"max_pool2d: expected input with non-zero C, H and W"),
    ("max_pool2d_backward-index-too-large", lambda t: _mp_back_raw(t, indices=t["mp"][1] + 100),
     ValueError, r"max_pool2d_backward: index \d+ is outside the input plane of 6x6 elements"),
    ("max_pool2d_backward-index-negative", lambda t: _mp_back_raw(t, indices=t["mp"][1] - 100),
     ValueError, r"max_pool2d_backward: index -\d+ is outside the input plane"),
    ("max_pool2d_backward-index-plane-size", lambda t: _mp_back_raw(
        t, indices=torch.full_like(t["mp"][1], H * W)), ValueError,
     r"max_pool2d_backward: index 36 is outside the input plane of 6x6 elements "
     r"\(expected -1 or \[0, 36\)\)"),
    ("max_pool2d_backward-index-dtype", lambda t: _mp_back_raw(t, indices=t["mp"][1].int()),
     TypeError, r"max_pool2d_backward: expected indices of dtype int64, got Int"),
    ("max_pool2d_backward-index-shape", lambda t: _mp_back_raw(t, indices=t["mp"][1][..., :2]),
     ValueError, r"max_pool2d_backward: expected indices of the shape of grad_output "
                 r"\[2, 4, 3, 3\], got \[2, 4, 3, 2\]"),
    ("max_pool2d_backward-grad-channels", lambda t: _mp_back_raw(
        t, grad_output=torch.randn(N, C - 1, 3, 3)), ValueError,
     r"max_pool2d_backward: expected grad_output to have the batch and channel sizes of input "
     r"\[2, 4, \*, \*\], got shape \[2, 3, 3, 3\]"),
    ("max_pool2d_backward-grad-3d", lambda t: _mp_back_raw(
        t, grad_output=t["mp"][0][0], indices=t["mp"][1][0]), ValueError,
     r"expected grad_output to be 4-D \[N, C, H, W\], got 3-D"),
    ("max_pool2d_backward-grad-dtype", lambda t: _mp_back_raw(
        t, grad_output=t["mp"][0].double()), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("max_pool2d_backward-float16", lambda t: _mp_back_raw(
        t, grad_output=t["mp"][0].half(), input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    # avg_pool2d / avg_pool2d_backward
    ("avg_pool2d-input-5d", lambda t: _ap_raw(t, input=t["x"][None]), ValueError,
     r"expected input to be 4-D \[N, C, H, W\], got 5-D"),
    ("avg_pool2d-float16", lambda t: _ap_raw(t, input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    ("avg_pool2d-divisor-0", lambda t: _ap_raw(t, divisor_override=0), ValueError,
     r"avg_pool2d: expected divisor_override to be non-zero or None, got 0"),
    ("avg_pool2d-stride-negative", lambda t: _ap_raw(t, stride=[-2, 2]), ValueError,
     r"expected stride >= 1, got \[-2, 2\]"),
    ("avg_pool2d-padding-over-half", lambda t: _ap_raw(t, padding=[3, 3]), ValueError,
     r"avg_pool2d: expected padding to be at most half of kernel_size"),
    ("avg_pool2d-output-empty", lambda t: _ap_raw(t, kernel_size=[8, 8]), ValueError,
     r"avg_pool2d: input of spatial size 6x6 gives an output of size"),
    ("avg_pool2d_backward-grad-shape", lambda t: _ap_back_raw(t, grad_output=_x(N, C, 3, 2)),
     ValueError, r"avg_pool2d_backward: expected grad_output of shape \[2, 4, 3, 3\] \(the "
                 r"avg_pool2d output shape for input \[2, 4, 6, 6\]\), got \[2, 4, 3, 2\]"),
    ("avg_pool2d_backward-grad-larger", lambda t: _ap_back_raw(t, grad_output=_x(N, C, 6, 6)),
     ValueError, r"avg_pool2d_backward: expected grad_output of shape \[2, 4, 3, 3\]"),
    ("avg_pool2d_backward-grad-3d", lambda t: _ap_back_raw(t, grad_output=_x(C, 3, 3)),
     ValueError, r"expected grad_output to be 4-D \[N, C, H, W\], got 3-D"),
    ("avg_pool2d_backward-grad-dtype", lambda t: _ap_back_raw(
        t, grad_output=t["ap_go"].double()), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("avg_pool2d_backward-divisor-0", lambda t: _ap_back_raw(t, divisor_override=0), ValueError,
     r"avg_pool2d_backward: expected divisor_override to be non-zero or None, got 0"),
    ("avg_pool2d_backward-stride-0", lambda t: _ap_back_raw(t, stride=[0, 0]), ValueError,
     r"expected stride >= 1, got \[0, 0\]"),
    ("avg_pool2d_backward-float16", lambda t: _ap_back_raw(
        t, grad_output=t["ap_go"].half(), input=t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    # adaptive_avg_pool2d / adaptive_avg_pool2d_backward
    ("adaptive_avg_pool2d-input-3d", lambda t: ops.adaptive_avg_pool2d(t["x"][0], [2, 2]),
     ValueError, r"expected input to be 4-D \[N, C, H, W\], got 3-D"),
    ("adaptive_avg_pool2d-float16", lambda t: ops.adaptive_avg_pool2d(t["x"].half(), [2, 2]),
     TypeError, CPU_DTYPE % ("input", "Half")),
    ("adaptive_avg_pool2d-output-negative", lambda t: ops.adaptive_avg_pool2d(t["x"], [-1, 2]),
     ValueError, r"expected output_size >= 0, got \[-1, 2\]"),
    ("adaptive_avg_pool2d-output-1-entry", lambda t: ops.adaptive_avg_pool2d(t["x"], [2]),
     ValueError, r"expected output_size to have 2 entries, got 1"),
    ("adaptive_avg_pool2d-empty-plane", lambda t: ops.adaptive_avg_pool2d(
        torch.randn(N, C, 0, W), [2, 2]), ValueError,
     r"adaptive_avg_pool2d: expected input with non-zero H and W, got shape \[2, 4, 0, 6\]"),
    ("adaptive_avg_pool2d_backward-grad-channels", lambda t: ops.adaptive_avg_pool2d_backward(
        torch.randn(N, C - 1, 2, 2), t["x"]), ValueError,
     r"adaptive_avg_pool2d_backward: expected grad_output to have the batch and channel sizes "
     r"of input \[2, 4, \*, \*\], got shape \[2, 3, 2, 2\]"),
    ("adaptive_avg_pool2d_backward-grad-3d", lambda t: ops.adaptive_avg_pool2d_backward(
        torch.randn(C, 2, 2), t["x"]), ValueError,
     r"expected grad_output to be 4-D \[N, C, H, W\], got 3-D"),
    ("adaptive_avg_pool2d_backward-grad-dtype", lambda t: ops.adaptive_avg_pool2d_backward(
        torch.randn(N, C, 2, 2, dtype=torch.float64), t["x"]), TypeError,
     r"expected grad_output to have the dtype of input \(Float\), got Double"),
    ("adaptive_avg_pool2d_backward-float16", lambda t: ops.adaptive_avg_pool2d_backward(
        torch.randn(N, C, 2, 2).half(), t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    # add_relu / add_relu_backward
    ("add_relu-shape", lambda t: ops.add_relu(t["x"], _x(N, C, H, W - 1)), ValueError,
     r"add_relu: expected other to have the shape of input \[2, 4, 6, 6\], got \[2, 4, 6, 5\]"),
    ("add_relu-no-broadcast-in-op", lambda t: ops.add_relu(t["x"], _x(1, C, H, W)), ValueError,
     r"add_relu: expected other to have the shape of input \[2, 4, 6, 6\], got \[1, 4, 6, 6\]"),
    ("add_relu-dtype", lambda t: ops.add_relu(t["x"], t["x"].double()), TypeError,
     r"expected other to have the dtype of input \(Float\), got Double"),
    ("add_relu-float16", lambda t: ops.add_relu(t["x"].half(), t["x"].half()), TypeError,
     CPU_DTYPE % ("input", "Half")),
    ("add_relu-int", lambda t: ops.add_relu(t["x"].int(), t["x"].int()), TypeError,
     CPU_DTYPE % ("input", "Int")),
    ("add_relu_backward-shape", lambda t: ops.add_relu_backward(_x(N, C, H, W - 1), t["x"]),
     ValueError, r"add_relu_backward: expected grad_output to have the shape of output "
                 r"\[2, 4, 6, 6\], got \[2, 4, 6, 5\]"),
    ("add_relu_backward-dtype", lambda t: ops.add_relu_backward(t["x"].double(), t["x"]),
     TypeError, r"expected output to have the dtype of grad_output \(Double\), got Float"),
    ("add_relu_backward-float16", lambda t: ops.add_relu_backward(t["x"].half(), t["x"].half()),
     TypeError, CPU_DTYPE % ("grad_output", "Half")),
]

torch.set_rng_state(_RNG_STATE)

RAW_OPS = ["conv2d", "conv2d_backward", "batch_norm", "batch_norm_backward", "bn_relu",
           "bn_relu_backward", "batch_norm_stats", "bn_relu_backward_elemt", "conv_bn_relu", "conv_bn_relu_backward", "max_pool2d",
           "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "adaptive_avg_pool2d",
           "adaptive_avg_pool2d_backward", "add_relu", "add_relu_backward"]


# Every case runs in a child process (one per device, restarted after a crash), so a check that
# crashes instead of raising fails its own case and the run goes on. On a GPU machine the
# first GPU run lost the process on the first bad-argument error whose message had a number in
# it (a second libstdc++ in cnnops._C; setup.py now refuses to build such a library).

RAW_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
CUDA_DTYPE = r"the cnnops CUDA kernels support float32, float64, float16 and bfloat16; %s has dtype %s"


def _expected(case, device):
    """(exception class, message regex) of a case on a device, or None where the call is valid
    there (the CUDA kernels take float16 and bfloat16, the CPU convolutions bfloat16)."""
    name, _, exc, match = case
    for cpu_message, cpu_valid in ((CPU_DTYPE, ()), (CPU_CONV_DTYPE, ("BFloat16",))):
        if not match.startswith(cpu_message.split("%")[0]):
            continue
        argument, dtype = re.match(cpu_message.replace("%s", "(\\w+)"), match).groups()
        if device == "cuda":
            return None if dtype in ("Half", "BFloat16") else (exc, CUDA_DTYPE % (argument, dtype))
        return None if dtype in cpu_valid else (exc, match)
    return exc, match


def _child(device, ids):
    """Runs the named cases on `device`, one JSON line before and one after each, then checks
    that the library still gives torch's answers. A device "triton:<device>" runs them against
    the Triton ops (torch.ops.cnnops_triton) on <device>."""
    global ops
    if device.startswith("triton:"):
        from cnnops.triton_kernels import ops as _  # noqa: F401 (registers cnnops_triton)
        ops = torch.ops.cnnops_triton
        device = device.split(":", 1)[1]
    if device != "cpu":
        torch.set_default_device(device)
    torch.manual_seed(0)
    t = _raw_inputs()
    cases = {case[0]: case for case in RAW_CASES}
    for case_id in ids:
        print(json.dumps({"start": case_id}), flush=True)
        try:
            cases[case_id][1](t)
            if device == "cuda":
                torch.cuda.synchronize()  # an asynchronous error counts against the case
            result = {"returned": True}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which judges it
            result = {"classes": [c.__name__ for c in type(e).__mro__], "message": str(e)}
        print(json.dumps(dict(result, id=case_id)), flush=True)
    x, w = t["x"], t["w"]
    out, idx = _mp_raw(t)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    g = torch.randn_like(out)
    xr = x.detach().clone().requires_grad_()
    works = (torch.allclose(_conv_raw(t), F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)
             and torch.equal(out, ref) and torch.equal(idx, ref_idx)
             and torch.equal(ops.max_pool2d_backward(g, x, idx, [2, 2], [2, 2], [0, 0], [1, 1]),
                             torch.autograd.grad(F.max_pool2d(xr, 2), xr, g)[0]))
    print(json.dumps({"still_works": bool(works)}), flush=True)


_CHILD = ("import sys; sys.path.insert(0, %r); import test_errors; "
          "test_errors._child(sys.argv[1], sys.argv[2:])" % os.path.dirname(os.path.abspath(__file__)))
_RAW_RESULTS = {}


def _raw_results(device):
    """{case id: result} for every RAW_CASE on `device`, plus "still_works"."""
    if device in _RAW_RESULTS:
        return _RAW_RESULTS[device]
    if not _ext.LOADED:
        pytest.skip("cnnops._C is not loaded: %s" % _ext.ERROR)
    results, pending = {}, [case[0] for case in RAW_CASES]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])))
    while pending:
        r = subprocess.run([sys.executable, "-c", _CHILD, device] + pending, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        started = None
        for line in r.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            elif "id" in record:
                results[record.pop("id")], started = record, None
            else:
                results.update(record)
        if started is None:  # every case reported; the child ended by itself
            if r.returncode != 0:
                raise RuntimeError("the error-case child failed outside any case:\n"
                                   + r.stderr[-3000:])
            break
        # the child died inside `started`: record that and go on after it
        results[started] = {"crashed": r.returncode, "stderr": r.stderr[-2000:]}
        pending = pending[pending.index(started) + 1:]
        results.setdefault("still_works", None)
    _RAW_RESULTS[device] = results
    return results


@pytest.mark.parametrize("device", RAW_DEVICES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in RAW_CASES])
def test_raw_op_bad_arguments_raise(device, case):
    expected = _expected(case, device)
    if expected is None and device != "cpu":
        pytest.skip("a valid call on %s" % device)
    result = _raw_results(device)[case[0]]
    if expected is None:  # valid on the CPU (a bfloat16 convolution): it must return
        assert result.get("returned"), result
        return
    exc, match = expected
    assert "crashed" not in result, "the process died (exit status %s) instead of raising:\n%s" % (
        result["crashed"], result["stderr"])
    assert not result.get("returned"), "returned instead of raising %s" % exc.__name__
    assert exc.__name__ in result["classes"], (result["classes"], result["message"])
    assert re.search(match, result["message"]), (match, result["message"])


def test_every_raw_op_is_covered():
    assert {case[0].split("-")[0] for case in RAW_CASES} == set(RAW_OPS)


@pytest.mark.parametrize("device", RAW_DEVICES)
def test_raw_ops_still_work_after_the_errors(device):
    """The failed calls left the library usable: the valid calls give torch's answers."""
    assert _raw_results(device)["still_works"] is True


# ---------------------------------------------------------------------------
# torch.ops.cnnops_triton.* called directly: the same cases. The Triton ops check their
# arguments as the CUDA kernels of the compiled ops do (cnnops/triton_kernels/checks.py), so
# each case expects its CUDA answer (_expected(case, "cuda"): the CUDA dtype message for an
# integer input, a valid call for float16 / bfloat16), except the cases below.
#
# Triton runs CUDA tensors, and CPU tensors under its interpreter (conftest sets
# TRITON_INTERPRET=1 without a GPU), where the cases run on the CPU.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# Cases whose answer on the Triton ops is not their CUDA answer: None for a call that returns,
# else (exception class, message regex).
TRITON_OUTCOMES = {
    # The index values. The CPU kernel checks each index while it scatters the gradient; the
    # Triton kernel gathers (as the CUDA one): each input element looks for its own offset
    # among the indices of the windows that hold it, so an index outside the plane matches no
    # element and nothing is read or written out of bounds. Checking the values up front
    # would need them on the host (.item(): a device sync, and no trace under torch.compile).
    # The call returns.
    "max_pool2d_backward-index-too-large": None,
    "max_pool2d_backward-index-negative": None,
    "max_pool2d_backward-index-plane-size": None,
    # float16 input with a float32 forward output (the case changes only grad_output and
    # input): the CPU kernels stop at the input's dtype, the Triton ops (which take float16)
    # at the output's, as the CUDA kernels do.
    "bn_relu_backward-float16": (
        TypeError, r"^expected output to have the dtype of input \(Half\), got Float$"),
    "bn_relu_backward_elemt-float16": (
        TypeError, r"^expected output to have the dtype of input \(Half\), got Float$"),
    "conv_bn_relu_backward-float16": (
        TypeError, r"^expected output to have the dtype of input \(Half\), got Float$"),
}


def _expected_triton(case):
    if case[0] in TRITON_OUTCOMES:
        return TRITON_OUTCOMES[case[0]]
    return _expected(case, "cuda")


def _triton_raw_results():
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("the Triton ops need a CUDA device or TRITON_INTERPRET=1")
    return _raw_results("triton:" + TRITON_DEVICE)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in RAW_CASES])
def test_triton_raw_op_bad_arguments_raise(case):
    """The Triton ops raise the compiled ops' exception and message for each bad call."""
    expected = _expected_triton(case)
    result = _triton_raw_results()[case[0]]
    assert "crashed" not in result, "the process died (exit status %s) instead of raising:\n%s" % (
        result["crashed"], result["stderr"])
    if expected is None:  # a valid call for the Triton ops: it must return
        assert result.get("returned"), result
        return
    exc, match = expected
    assert not result.get("returned"), "returned instead of raising %s" % exc.__name__
    assert exc.__name__ in result["classes"], (result["classes"], result["message"])
    assert re.search(match, result["message"]), (match, result["message"])
    if expected == (case[2], case[3]) and _ext.LOADED:
        # the compiled op's answer on the CPU: the very same message
        assert result["message"] == _raw_results("cpu")[case[0]]["message"]


def test_triton_outcomes_name_existing_cases():
    assert set(TRITON_OUTCOMES) <= {case[0] for case in RAW_CASES}


def test_triton_raw_ops_still_work_after_the_errors():
    assert _triton_raw_results()["still_works"] is True


def test_triton_checks_name_dtypes_as_cpp():
    """checks.scalar_type_name gives c10's name of every dtype (the C++ messages print it)."""
    if not _ext.LOADED:
        pytest.skip("cnnops._C is not loaded: %s" % _ext.ERROR)
    pytest.importorskip("triton")
    from cnnops.triton_kernels import checks
    x, compared = torch.zeros(2), 0
    for dtype in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
        try:
            with warnings.catch_warnings():  # experimental / deprecated dtypes
                warnings.simplefilter("ignore")
                y = torch.zeros(2, dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            continue  # a dtype without plain tensors
        try:
            torch.ops.cnnops.add_relu(x, y)
            continue  # float32
        except (TypeError, ValueError) as e:
            name = re.search(r"(?:has dtype|got) (\w+)$", str(e)).group(1)
        except (RuntimeError, NotImplementedError):
            continue  # no CPU kernel reaches the op for this dtype
        assert checks.scalar_type_name(dtype) == name, dtype
        compared += 1
    assert compared >= 20
    assert checks.scalar_type_name(torch.float32) == "Float"


def test_triton_ops_refuse_other_devices():
    """A tensor the Triton kernels cannot read (meta here, CPU on a GPU without the
    interpreter) raises the CUDA kernels' device error instead of reaching a launch."""
    pytest.importorskip("triton")
    from cnnops.triton_kernels import ops as _  # noqa: F401 (registers cnnops_triton)
    t_ops = torch.ops.cnnops_triton
    x = _x().to("meta")
    with pytest.raises(ValueError, match=r"^expected input on a CUDA device, got a tensor on "
                                         r"meta$"):
        t_ops.add_relu(x, x)
    with pytest.raises(ValueError, match=r"^expected input on a CUDA device, got a tensor on "
                                         r"meta$"):
        t_ops.conv2d(x, _w().to("meta"), None, S, P, D, 1)
    with pytest.raises(ValueError, match=r"^expected save_mean on a CUDA device, got meta$"):
        t_ops.update_running_stats(None, None, torch.zeros(C, device="meta"),
                                   torch.ones(C, device="meta"), 4, 0.1, 1e-5)


def test_triton_ops_read_strided_channel_vectors():
    """The kernels read per-channel vectors at unit stride; the checks hand them a contiguous
    copy of a strided or expanded one (as the C++ ops' do), which they once read in place:
    wrong values, and past the end of an expanded one's storage."""
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("the Triton ops need a CUDA device or TRITON_INTERPRET=1")
    from cnnops.triton_kernels import ops as _  # noqa: F401 (registers cnnops_triton)
    t_ops = torch.ops.cnnops_triton
    torch.manual_seed(0)
    dev = TRITON_DEVICE
    x, w = _x().to(dev), _w().to(dev)
    strided = lambda n: torch.randn(2 * n, device=dev)[::2]
    expanded = lambda n: (torch.rand(1, device=dev) + 0.5).expand(n)
    dense = lambda args: [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    calls = [
        (t_ops.batch_norm, [x, strided(C), expanded(C), strided(C), expanded(C), False, 1e-5]),
        (t_ops.conv2d, [x, w, strided(OC), S, P, D, 1]),
        (t_ops.conv_bn_relu, [x, w, strided(OC), expanded(OC), strided(OC), strided(OC),
                              expanded(OC), None, S, P, D, 1, False, 1e-5, True]),
    ]
    for op, args in calls:
        got, want = op(*args), op(*dense(args))
        for g, e in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
            torch.testing.assert_close(g, e)


def test_triton_checks_trace():
    """The checks read only metadata: torch.compile traces a valid call through them without a
    graph break (dynamic shapes too), and the ops' fake kernels (the op functions, run on
    FakeTensors while torch.compile traces) raise as the ops do. (The Triton ops themselves do
    not compile on CPU tensors: under the interpreter their fake kernels would run the kernels
    on FakeTensors. test_opcheck.py::test_opcheck_triton_ops opchecks them on a GPU.)"""
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("the Triton ops need a CUDA device or TRITON_INTERPRET=1")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cnnops.triton_kernels import checks
    from cnnops.triton_kernels import ops as _  # noqa: F401 (registers cnnops_triton)
    t_ops = torch.ops.cnnops_triton
    dev = TRITON_DEVICE
    x, w, v = _x().to(dev), _w().to(dev), torch.ones(OC, device=dev)
    r, idx = torch.randn(N, OC, H, W, device=dev), torch.zeros(N, OC, 3, 3, dtype=torch.long,
                                                               device=dev)

    def checked(x, w, v, r, idx):  # the checks of conv_bn_relu, then of the pooling ops
        s = checks.conv_shape(x, w, None, S, P, D, 1)
        checks.check_cuda_float(x, "input")
        _, _, v, _ = checks.check_bn_params("conv_bn_relu", x, s.OC, None, None, v, None, True,
                                            1e-5, "bn_weight", "bn_bias")
        r = checks.conv_residual(r, x, s)
        p = checks.check_pool2d("max_pool2d", r, [2, 2], [2, 2], [0, 0], [1, 1], False)
        g = torch.zeros(p.N, p.C, p.OH, p.OW, dtype=r.dtype, device=r.device)
        checks.check_pool_grad_output("max_pool2d_backward", g, r)
        checks.check_max_pool2d_backward(g, r, idx, [2, 2], [2, 2], [0, 0], [1, 1])
        checks.check_same_shape("add_relu", r, r, "other", "input")
        checks.check_running_stats_update(v, v, v, v, 5)
        return r * v[:, None, None] + g.sum()

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(checked, backend="eager", fullgraph=True, dynamic=dynamic)
        torch.testing.assert_close(compiled(x, w, v, r, idx), checked(x, w, v, r, idx))
    torch._dynamo.reset()

    v5, x64 = torch.ones(OC - 1, device=dev), x.double()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor
        with pytest.raises(ValueError, match=r"^expected bn_weight of shape \[6\], got \[5\]$"):
            t_ops.conv_bn_relu(fake(x), fake(w), None, fake(v5), None, None, None, None, S, P, D,
                               1, True, 1e-5, True)
        with pytest.raises(TypeError, match=r"^expected other to have the dtype of input "
                                            r"\(Float\), got Double$"):
            t_ops.add_relu(fake(x), fake(x64))
        with pytest.raises(ValueError, match=r"^max_pool2d: input of spatial size 6x6 gives an "
                                             r"output of size 0x0 "):
            t_ops.max_pool2d(fake(x), [7, 7], [1, 1], [0, 0], [1, 1], False)


# ---------------------------------------------------------------------------
# Known crashes: run in a subprocess so that a segfault fails one test, not the run.

def _run(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _check_script_ran(r):
    """A script that failed by itself (not killed by a signal) is a real failure, not the bug."""
    if r.returncode > 0:
        raise RuntimeError("the check script failed:\n" + r.stderr[-3000:])


def test_conv_taps_entirely_in_padding_do_not_crash():
    """Valid calls whose kernel has taps that only ever read padding.

    csrc/cpu/conv_kernels.h valid_range() once left `lo` past the output row there, and im2col
    wrote beyond its column buffer (segfault): e.g. a 3x3 kernel with dilation 10 and padding 8
    on a 6x6 input, or a 5x5 kernel with padding 2 on a 1-wide input.
    """
    r = _run("""
        import torch, cnnops, cnnops.functional as CF, torch.nn.functional as F
        torch.manual_seed(0)
        configs = [((1, 2, 6, 6), (3, 2, 3, 3), 1, 8, 10),   # (input, weight, stride, pad, dil)
                   ((2, 2, 1, 1), (3, 2, 5, 5), 1, 2, 1),
                   ((2, 2, 3, 1), (3, 2, 5, 5), 2, 2, 1),
                   ((1, 2, 8, 8), (3, 2, 3, 3), 1, 12, 12)]
        for backend in cnnops.available_backends():
            with cnnops.use_backend(backend):
                for xs, ws, s, p, d in configs:
                    x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
                    w = torch.randn(ws, dtype=torch.float64, requires_grad=True)
                    rm = torch.zeros(ws[0], dtype=torch.float64)
                    rv = torch.ones(ws[0], dtype=torch.float64)
                    got = [CF.conv2d(x, w, None, s, p, d),
                           CF.conv_bn_relu(x, w, None, None, None, rm, rv, s, p, d, relu=False)]
                    ref = F.conv2d(x, w, None, s, p, d)
                    for out, scale in zip(got, (1.0, (1 + 1e-5) ** -0.5)):
                        torch.testing.assert_close(out, ref * scale)
                        g = torch.randn_like(out)
                        torch.testing.assert_close(torch.autograd.grad(out, (x, w), g),
                                                   torch.autograd.grad(ref * scale, (x, w), g,
                                                                       retain_graph=True))
        print("OK")
        """)
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stderr[-3000:])


@pytest.mark.parametrize("kernel_w, dilation_w", [(9, 2 ** 61), (5, 2 ** 62)],
                         ids=["segfault", "wrong-answer"])
def test_raw_conv2d_huge_dilation_raises(kernel_w, dilation_w):
    r = _run("""
        import torch, cnnops
        x, w = torch.randn(1, 1, 6, 6), torch.randn(1, 1, 1, %d)
        try:
            out = torch.ops.cnnops.conv2d(x, w, None, [1, 1], [0, 0], [1, %d], 1)
        except (ValueError, RuntimeError) as e:
            print("RAISED", type(e).__name__, e)
        else:
            print("RETURNED", tuple(out.shape))
        """ % (kernel_w, dilation_w))
    _check_script_ran(r)
    assert r.returncode == 0 and "RAISED" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


# ---------------------------------------------------------------------------
# GPU: the C++ CUDA ops' bad arguments (marked `cuda`, see
# tests/conftest.py). Every RAW_CASE above runs on CUDA too (RAW_DEVICES); these are the
# CUDA-only cases.

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
    cuda_ops.batch_norm(x, torch.zeros(4, device=DEVICE, dtype=torch.float64),
                        torch.ones(4, device=DEVICE), None, None, False, 1e-5)
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
out = cuda_ops.batch_norm(xh, None, None, torch.ones(4, device=DEVICE), None, True, 1e-5)
assert out[0].dtype == torch.float16 and out[1].dtype == torch.float32
with pytest.raises(TypeError, match="or float32"):
    cuda_ops.batch_norm(xh, None, None, torch.ones(4, device=DEVICE, dtype=torch.bfloat16),
                        None, True, 1e-5)
torch.cuda.synchronize()  # no asynchronous error either
print("OK")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ops_reject_bad_arguments_cleanly(cuda_ops):
    """Bad arguments raise Python exceptions naming the argument; nothing crashes. In a child
    process, so a crash fails this test rather than the run (every RAW_CASE above runs on CUDA
    the same way); these are the CUDA-only cases."""
    r = subprocess.run([sys.executable, "-c", _CUDA_BAD_ARGUMENTS], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (
        "exit status %d\n%s" % (r.returncode, r.stderr[-3000:]))

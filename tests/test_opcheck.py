"""torch.library.opcheck on every cnnops op (schema, fake kernel, autograd, AOT dispatch),
and float64 gradcheck of every forward op on tiny shapes. float64 runs the convolutions on
the im2col core; the convolution ops are opchecked on the oneDNN core too, in float32 and
bfloat16 (the fake kernels' dtype rules: float32 statistics and BN gradients). On a GPU, the
same opcheck of the C++ CUDA ops and of the Triton ops on CUDA tensors, in every dtype
(marked `cuda`; see conftest.py)."""
import pytest
import torch

import cnnops  # (registers the ops)
from cnnops import _ext
from conftest import GPU_DTYPES, HALF, axis, make, needs_cuda, on_gpu

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the compiled ops")


def _t(*shape, grad=False, dtype=torch.float64, layout=None, positive=False):
    t = torch.rand(shape, dtype=dtype) + 0.5 if positive else torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _samples(grad):
    """(op name, args) pairs covering every forward op, in both layouts and BN modes."""
    out = []
    for layout in (None, "channels_last"):
        x = _t(2, 4, 6, 5, grad=grad, layout=layout)
        w = _t(6, 2, 3, 3, grad=grad)
        b = _t(6, grad=grad)
        out.append(("conv2d", (x, w, b, [2, 1], [1, 1], [1, 2], 2)))
        out.append(("conv2d_relu", (x, w, b, _t(2, 6, 3, 3, grad=grad, layout=layout),
                                    [2, 1], [1, 1], [1, 2], 2)))
        c = _t(4, grad=grad, positive=True)
        rm, rv = _t(4), _t(4, positive=True)
        for training in (True, False):
            out.append(("batch_norm", (x, rm, rv, c, _t(4, grad=grad), training, 1e-5)))
            out.append(("bn_relu", (x, rm, rv, c, _t(4, grad=grad), _t(2, 4, 6, 5, grad=grad,
                                                                        layout=layout),
                                    training, 1e-5, True)))
            r = _t(2, 6, 3, 3, grad=grad, layout=layout)
            out.append(("conv_bn_relu", (x, w, b, _t(6, grad=grad, positive=True), _t(6, grad=grad),
                                         _t(6), _t(6, positive=True), r, [2, 1], [1, 1], [1, 2], 2,
                                         training, 1e-5, True)))
        out.append(("max_pool2d", (x, [3, 2], [2, 1], [1, 1], [1, 1], True)))
        out.append(("avg_pool2d", (x, [3, 2], [2, 2], [1, 0], True, False, None)))
        out.append(("avg_pool2d", (x, [2, 2], [1, 1], [0, 0], False, True, 3)))
        out.append(("adaptive_avg_pool2d", (x, [4, 3])))
        out.append(("add_relu", (x, _t(2, 4, 6, 5, grad=grad, layout=layout))))
    return out


def _backward_samples():
    x, w, g = _t(2, 4, 6, 5), _t(6, 2, 3, 3), _t(2, 6, 6, 3)
    mean, invstd = _t(4), _t(4, positive=True)
    out = _t(2, 4, 6, 5).relu()
    idx = torch.ops.cnnops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[1]
    cout, conv_out, cmean, cinvstd = torch.ops.cnnops.conv_bn_relu(
        x, w, None, _t(6), _t(6), None, None, None, [1, 1], [1, 1], [1, 2], 2, True, 1e-5, True)
    # a channels_last weight: its gradient comes back channels_last (weight_grad_memory_format)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    cl_out, cl_conv_out, cl_mean, cl_invstd = torch.ops.cnnops.conv_bn_relu(
        x, w_cl, None, _t(6), _t(6), None, None, None, [1, 1], [1, 1], [1, 2], 2, True, 1e-5, True)
    return [
        ("conv2d_backward", (g, x, w, [1, 1], [1, 1], [1, 2], 2, [True, True, True])),
        ("conv2d_backward", (g, x, w_cl, [1, 1], [1, 1], [1, 2], 2, [True, True, True])),
        ("conv_bn_relu_backward", (_t(2, 6, 6, 3), cl_out, x, w_cl, None, cl_conv_out, _t(6),
                                   cl_mean, cl_invstd, [1, 1], [1, 1], [1, 2], 2, True, True,
                                   [True] * 6)),
        ("conv2d_backward", (g, x, w, [1, 1], [1, 1], [1, 2], 2, [False, True, False])),
        ("batch_norm_backward", (_t(2, 4, 6, 5), x, _t(4), mean, invstd, True, [True, True, True])),
        ("bn_relu_backward", (_t(2, 4, 6, 5), out, x, None, mean, invstd, False, True,
                              [True, False, True, True])),
        ("conv_bn_relu_backward", (_t(2, 6, 6, 3), cout, x, w, None, conv_out, _t(6), cmean,
                                   cinvstd, [1, 1], [1, 1], [1, 2], 2, True, True, [True] * 6)),
        ("max_pool2d_backward", (_t(2, 4, 3, 2), x, idx, [2, 2], [2, 2], [0, 0], [1, 1])),
        ("avg_pool2d_backward", (_t(2, 4, 3, 2), x, [2, 2], [2, 2], [0, 0], False, True, None)),
        ("adaptive_avg_pool2d_backward", (_t(2, 4, 4, 3), x)),
        ("add_relu_backward", (_t(2, 4, 6, 5), out)),
        ("update_running_stats", (_t(4), _t(4, positive=True), mean, invstd, 7, 0.1, 1e-5)),
        ("update_running_stats", (None, _t(4, dtype=torch.float32), mean, invstd, 1, 0.5, 0.0)),
        ("batch_norm_stats", (x,)),
        ("batch_norm_stats", (x.contiguous(memory_format=torch.channels_last),)),
        ("bn_relu_backward_elemt", (_t(2, 4, 6, 5), out, x, _t(4), mean, invstd, _t(4), _t(4),
                                    True, [True, True])),
        ("bn_relu_backward_elemt", (_t(2, 4, 6, 5), None, x, None, mean, invstd, _t(4), _t(4),
                                    False, [True, False])),
    ]


def _inference_samples():
    """The inference-only ops (no tensor requires grad): the one that returns the output
    alone, with and without a residual, and the one that writes into its residual."""
    out = []
    for layout in (None, "channels_last"):
        x = _t(2, 4, 6, 5, layout=layout)
        for residual in (None, _t(2, 6, 3, 3, layout=layout)):
            out.append(("conv_bn_relu_inference",
                        (x, _t(6, 2, 3, 3), _t(6), _t(6), _t(6), _t(6), _t(6, positive=True),
                         residual, [2, 1], [1, 1], [1, 2], 2, 1e-5, residual is None)))
        out.append(("conv_bn_relu_into_residual",
                    (_t(2, 6, 3, 3, layout=layout), x, _t(6, 2, 3, 3), _t(6), _t(6), _t(6),
                     _t(6), _t(6, positive=True), [2, 1], [1, 1], [1, 2], 2, 1e-5, True)))
    return out


def _id(sample):
    return sample[0]


@pytest.mark.parametrize("sample", _samples(grad=True) + _backward_samples()
                         + _inference_samples(), ids=_id)
def test_opcheck(sample):
    name, args = sample
    torch.library.opcheck(getattr(torch.ops.cnnops, name).default, args)


CONV_OPS = ("conv2d", "conv2d_relu", "conv_bn_relu", "conv2d_backward", "conv_bn_relu_backward",
            "conv_bn_relu_inference", "conv_bn_relu_into_residual")


def _cast(args, dtype):
    """The sample's float64 tensors in `dtype` (same layout, same requires_grad)."""
    return tuple(a.detach().to(dtype).requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a for a in args)


def _onednn_params():
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for i, (name, args) in enumerate(s for s in _samples(grad=True) + _backward_samples()
                                         + _inference_samples() if s[0] in CONV_OPS):
            out.append(pytest.param(name, args, dtype, id="%s-%d-%s" % (name, i, str(dtype)[6:])))
    return out


@pytest.mark.parametrize("name, args, dtype", _onednn_params())
def test_opcheck_onednn_core(name, args, dtype):
    with cnnops.use_cpu_conv("onednn"):
        torch.library.opcheck(getattr(torch.ops.cnnops, name).default, _cast(args, dtype))


@pytest.mark.parametrize("sample", _samples(grad=True), ids=_id)
def test_gradcheck(sample):
    """Analytical gradients of each compiled op against finite differences (float64)."""
    name, args = sample
    op = getattr(torch.ops.cnnops, name)

    def first_output(*a):
        result = op(*a)
        return result[0] if isinstance(result, (tuple, list)) else result

    if name == "max_pool2d":
        # Finite differences need a unique max per window.
        args = (torch.randperm(args[0].numel(), dtype=torch.float64).view_as(args[0])
                .requires_grad_(),) + args[1:]
    assert torch.autograd.gradcheck(first_output, args, eps=1e-6, atol=1e-5, nondet_tol=0.0)


# ---------------------------------------------------------------------------
# GPU: the C++ CUDA ops and the Triton ops on CUDA tensors

def _gpu_opcheck_samples(dtype, lib=torch.ops.cnnops):
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
            samples.append(("batch_norm", (x, p(4), p(4, positive=True), bw, bb, training,
                                           1e-5)))
            samples.append(("bn_relu", (x, p(4), p(4, positive=True), bw, bb,
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


@on_gpu(axis("dtype", GPU_DTYPES, str), backend=False)
def test_opcheck_cuda_ops(cuda_ops, dtype):
    """torch.library.opcheck (schema, fake kernel incl. strides and dtypes, autograd
    registration, AOT dispatch) of every op on CUDA tensors; half types with float32 BN
    tensors, as autocast produces."""
    torch.manual_seed(17)
    for name, args in _gpu_opcheck_samples(dtype):
        torch.library.opcheck(getattr(cuda_ops, name).default, args)


@needs_cuda
@on_gpu(axis("dtype", GPU_DTYPES, str), backend=False)
def test_opcheck_triton_ops(dtype):
    """The same opcheck for the Triton ops (torch.ops.cnnops_triton), compiled on the GPU: their
    fake kernels are the triton_op functions themselves, traced with wrap_triton."""
    if "triton" not in cnnops.available_backends():
        pytest.skip("the triton backend is not available here")
    from cnnops.triton_kernels import ops as triton_ops  # registers torch.ops.cnnops_triton

    lib = getattr(torch.ops, triton_ops.NS)
    torch.manual_seed(17)
    for name, args in _gpu_opcheck_samples(dtype, lib):
        torch.library.opcheck(getattr(lib, name).default, args)

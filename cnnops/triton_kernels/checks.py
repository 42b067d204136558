"""Argument checks of the Triton ops (``torch.ops.cnnops_triton.*``): the C++ ops' checks.

The ops are public and must never crash on bad arguments (csrc/include/cnnops/common.h):
each checks what its kernels rely on before any launch. Every function here mirrors one C++
check, under its C++ name, with the same message text and exception type: ValueError where
the C++ check is TORCH_CHECK_VALUE, TypeError for TORCH_CHECK_TYPE. Values print as c10
prints them: sizes and int lists as ``[2, 4, 6, 6]``, dtypes by their ScalarType names
(``Float``, ``Half``), devices as ``cpu`` / ``cuda:0``, floats as C++ streams print doubles.

The Triton backend is a GPU backend, so the ops check as the CUDA kernels do
(csrc/cuda/*.cu, in their order): float32, float64, float16 and bfloat16 tensors, on a CUDA
device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1) or where no CUDA device
is visible (see _cpu_ok).

The checks read only metadata (shape, dtype, device, strides), so they run unchanged inside
the fake kernels that triton_op makes of the ops and under torch.compile's tracing; the
error messages are built only on the failing path.
"""
from collections import namedtuple

import torch

from .._shapes import conv_output_size, pool_output_size
from . import INTERPRET

# The largest geometry value (check_pair): products such as dilation * (kernel - 1) stay far
# from int64 overflow, and the kernels' int32 arguments hold it.
INT_MAX = (1 << 31) - 1

#: The dtypes the kernels run (csrc/cuda/common.cuh, check_cuda_float).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCED = (torch.float16, torch.bfloat16)
# The kernels run on CUDA tensors, and on CPU tensors under the interpreter. CPU tensors also
# pass where no CUDA device is visible: no kernel can launch there (Triton finds no driver and
# raises), and tools that record the launches instead (tests/test_triton_compile.py compiles
# each kernel for sm_90 so) call the ops on CPU tensors. On a machine with a GPU, without the
# interpreter, a CPU tensor gets the CUDA kernels' device error. (Tested as t.is_cuda /
# t.is_cpu: t.device.type costs a microsecond a call.) Whether a GPU is visible is asked at the
# first CPU tensor, not at import.
_cpu_ok = True if INTERPRET else None


def _cpu_tensors_ok():
    global _cpu_ok
    if _cpu_ok is None:
        _cpu_ok = not torch.cuda.is_available()
    return _cpu_ok


# ---------------------------------------------------------------------------
# Formatting, as c10 prints values into its messages.

# c10::ScalarType names that are not the dtype's name capitalised.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool", torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.qint8: "QInt8",
    torch.quint8: "QUInt8", torch.qint32: "QInt32", torch.quint4x2: "QUInt4x2",
    torch.quint2x4: "QUInt2x4",
}


def scalar_type_name(dtype):
    """The c10::ScalarType name of a dtype, as C++ messages print it (torch.float32: Float;
    torch.uint16: UInt16; torch.float8_e4m3fn: Float8_e4m3fn)."""
    name = _SCALAR_TYPE_NAMES.get(dtype)
    if name is None:
        name = str(dtype).rpartition(".")[2]
        name = "UInt" + name[4:] if name.startswith("uint") else name[:1].upper() + name[1:]
    return name


def _list(values):
    """A size or int list as c10 prints an IntArrayRef: [2, 4, 6, 6]."""
    return "[" + ", ".join(str(v) for v in values) + "]"


def _double(x):
    """A double as a C++ stream prints it by default (6 significant digits)."""
    return "%g" % x


# ---------------------------------------------------------------------------
# csrc/include/cnnops/common.h

def check_4d(t, name):
    """check_4d (csrc/include/cnnops/common.h): t is a 4-D tensor."""
    if t is None:
        raise ValueError("%s must be a tensor, got None" % name)
    if t.dim() != 4:
        raise ValueError("expected %s to be 4-D [N, C, H, W], got %s-D with shape %s"
                         % (name, t.dim(), _list(t.shape)))


def check_same(t, like, name, like_name):
    """check_same (csrc/include/cnnops/common.h): t (when given) has like's dtype and device."""
    if t is None:
        return
    if t.dtype != like.dtype:
        raise TypeError("expected %s to have the dtype of %s (%s), got %s"
                        % (name, like_name, scalar_type_name(like.dtype),
                           scalar_type_name(t.dtype)))
    if t.device != like.device:
        raise ValueError("expected %s on the device of %s (%s), got %s"
                         % (name, like_name, like.device, t.device))


def check_channel_vector(t, channels, name):
    """check_channel_vector (csrc/include/cnnops/common.h): t (when given) is [channels]."""
    if t is not None and t.shape != (channels,):
        raise ValueError("expected %s of shape [%s], got %s" % (name, channels, _list(t.shape)))


def dense_channel(t):
    """t (a per-channel vector, or None) contiguous: the kernels read per-channel vectors at
    unit stride, as the C++ ops read the contiguous copies their checks return."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def optional_channel(t, like, channels, name):
    """optional_channel (csrc/include/cnnops/common.h): an optional per-channel tensor of like's
    dtype and device, [channels]. Returns it contiguous (None when absent)."""
    if t is None:
        return None
    check_same(t, like, name, "input")
    check_channel_vector(t, channels, name)
    return dense_channel(t)


def bn_channel_param(t, input, channels, name):
    """bn_channel_param (csrc/include/cnnops/common.h): an optional per-channel BN tensor
    (weight, bias, running or saved statistics), [channels] on input's device, of input's dtype
    or, for a float16/bfloat16 input, float32. Returns it contiguous (None when absent); unlike
    the C++ helper it keeps its dtype, as the kernels widen per-channel values on load."""
    if t is None:
        return None
    in_type = input.dtype
    if t.dtype != in_type and not (in_type in _REDUCED and t.dtype == torch.float32):
        raise TypeError("expected %s to have the dtype of input (%s)%s, got %s"
                        % (name, scalar_type_name(in_type),
                           " or float32" if in_type in _REDUCED else "",
                           scalar_type_name(t.dtype)))
    if t.device != input.device:
        raise ValueError("expected %s on the device of input (%s), got %s"
                         % (name, input.device, t.device))
    check_channel_vector(t, channels, name)
    return dense_channel(t)


def check_pair(v, name, min_value):
    """check_pair (csrc/include/cnnops/common.h): an int[2] argument whose entries lie in
    [min_value, 2^31 - 1]."""
    if len(v) != 2:
        raise ValueError("expected %s to have 2 entries, got %s" % (name, len(v)))
    if v[0] < min_value or v[1] < min_value:
        raise ValueError("expected %s >= %s, got %s" % (name, min_value, _list(v)))
    if v[0] > INT_MAX or v[1] > INT_MAX:
        raise ValueError("expected %s <= %s, got %s" % (name, INT_MAX, _list(v)))


def check_running_stats_update(running_mean, running_var, save_mean, save_invstd, count):
    """check_running_stats_update (csrc/include/cnnops/common.h): the arguments of
    update_running_stats. Returns C."""
    if save_mean.dim() != 1:
        raise ValueError("expected save_mean to be 1-D [C], got shape %s" % _list(save_mean.shape))
    C = save_mean.shape[0]
    check_channel_vector(save_invstd, C, "save_invstd")
    check_same(save_invstd, save_mean, "save_invstd", "save_mean")
    if not save_mean.dtype.is_floating_point:
        raise TypeError("expected floating-point save_mean, got %s"
                        % scalar_type_name(save_mean.dtype))
    if count < 0:
        raise ValueError("expected count >= 0, got %s" % count)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is None:
            continue
        check_channel_vector(t, C, name)
        if not t.dtype.is_floating_point:
            raise TypeError("expected floating-point %s, got %s"
                            % (name, scalar_type_name(t.dtype)))
        if t.device != save_mean.device:
            raise ValueError("expected %s on the device of save_mean (%s), got %s"
                             % (name, save_mean.device, t.device))
    return C


def check_shape(t, shape, name, like, like_name):
    """check_shape (csrc/include/cnnops/common.h): t has the given shape, and like's dtype and
    device."""
    if t is None:
        raise ValueError("%s must be a tensor, got None" % name)
    check_same(t, like, name, like_name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError("expected %s of shape %s, got %s" % (name, _list(shape), _list(t.shape)))


def check_same_shape(op, t, like, name, like_name):
    """check_same_shape (csrc/include/cnnops/common.h): the elementwise ops' operands have one
    shape (any rank; no broadcasting in the op)."""
    if t.shape != like.shape:
        raise ValueError("%s: expected %s to have the shape of %s %s, got %s"
                         % (op, name, like_name, _list(like.shape), _list(t.shape)))


# ---------------------------------------------------------------------------
# csrc/cuda/common.cuh

def check_cuda_float(t, name):
    """gpu::check_cuda_float (csrc/cuda/common.cuh): t is a float32, float64, float16 or
    bfloat16 tensor on a CUDA device. CPU tensors pass too under the interpreter or without a
    visible GPU (_cpu_ok); a tensor on any other device, e.g. meta, gets the CUDA message."""
    if t is None:
        raise ValueError("%s must be a tensor, got None" % name)
    if not (t.is_cuda or (t.is_cpu and _cpu_tensors_ok())):
        raise ValueError("expected %s on a CUDA device, got a tensor on %s" % (name, t.device))
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError("the cnnops CUDA kernels support float32, float64, float16 and bfloat16; "
                        "%s has dtype %s" % (name, scalar_type_name(t.dtype)))


def check_cuda_device(t, name):
    """The device half of check_cuda_float, as update_running_stats_cuda checks save_mean
    (csrc/cuda/batch_norm.cu)."""
    if not (t.is_cuda or (t.is_cpu and _cpu_tensors_ok())):
        raise ValueError("expected %s on a CUDA device, got %s" % (name, t.device))


# ---------------------------------------------------------------------------
# csrc/include/cnnops/conv_shape.h

ConvShape = namedtuple("ConvShape", "N C H W OC KH KW OH OW")
ConvShape.__doc__ = """Sizes of one conv2d call (conv_shape.h's ConvShape): input [N, C, H, W],
weight [OC, C/groups, KH, KW], output [N, OC, OH, OW]."""


def conv_shape(input, weight, bias, stride, padding, dilation, groups):
    """conv_shape (csrc/include/cnnops/conv_shape.h): validates a conv2d call (input, weight,
    optional bias) and returns its ConvShape."""
    check_4d(input, "input")
    if weight is None or weight.dim() != 4:
        raise ValueError("expected weight to be 4-D [out_channels, in_channels/groups, kH, kW], "
                         "got shape %s" % ("[]" if weight is None else _list(weight.shape)))
    check_same(weight, input, "weight", "input")
    check_pair(stride, "stride", 1)
    check_pair(padding, "padding", 0)
    check_pair(dilation, "dilation", 1)
    if groups < 1:
        raise ValueError("expected groups >= 1, got %s" % groups)
    N, C, H, W = input.shape
    OC, CG, KH, KW = weight.shape
    if C % groups != 0:
        raise ValueError("in_channels (%s) must be divisible by groups (%s)" % (C, groups))
    if OC % groups != 0 or OC <= 0:
        raise ValueError("out_channels (%s) must be positive and divisible by groups (%s)"
                         % (OC, groups))
    if CG * groups != C:
        raise ValueError("expected weight of shape [%s, %s, kH, kW] for input with %s channels "
                         "and groups=%s, got weight of shape %s"
                         % (OC, C // groups, C, groups, _list(weight.shape)))
    if KH <= 0 or KW <= 0:
        raise ValueError("expected a non-empty kernel, got weight of shape %s"
                         % _list(weight.shape))
    OH = conv_output_size(H, KH, padding[0], stride[0], dilation[0])
    OW = conv_output_size(W, KW, padding[1], stride[1], dilation[1])
    if OH <= 0 or OW <= 0:
        raise ValueError("input of spatial size (%s, %s) with padding %s is smaller than the "
                         "dilated kernel (%s, %s): the output would be empty"
                         % (H, W, _list(padding), dilation[0] * (KH - 1) + 1,
                            dilation[1] * (KW - 1) + 1))
    if bias is not None:
        check_same(bias, input, "bias", "input")
        check_channel_vector(bias, OC, "bias")
    return ConvShape(N, C, H, W, OC, KH, KW, OH, OW)


def conv_residual(residual, input, s):
    """conv_residual (csrc/include/cnnops/conv_shape.h): an optional residual of the conv
    output's shape (ConvShape s), of input's dtype and device. The kernels read it through its
    strides, so it is returned as given."""
    if residual is None:
        return None
    check_same(residual, input, "residual", "input")
    shape = (s.N, s.OC, s.OH, s.OW)
    if tuple(residual.shape) != shape:
        raise ValueError("expected residual of the conv output's shape %s, got %s"
                         % (_list(shape), _list(residual.shape)))
    return residual


# ---------------------------------------------------------------------------
# csrc/include/cnnops/pool_shape.h (the device check is check_cuda_float's)

PoolShape = namedtuple("PoolShape", "N C H W OH OW")


def check_pool2d(op, input, kernel_size, stride, padding, dilation, ceil_mode):
    """check_pool2d (csrc/include/cnnops/pool_shape.h): the arguments of max_pool2d and
    avg_pool2d and their backward ops (dilation None for avg_pool2d). Returns the PoolShape."""
    check_4d(input, "input")
    check_cuda_float(input, "input")
    check_pair(kernel_size, "kernel_size", 1)
    check_pair(stride, "stride", 1)
    check_pair(padding, "padding", 0)
    dilated = dilation is not None
    if dilated:
        check_pair(dilation, "dilation", 1)
    half = (kernel_size[0] // 2, kernel_size[1] // 2)
    if padding[0] > half[0] or padding[1] > half[1]:
        raise ValueError("%s: expected padding to be at most half of kernel_size, i.e. <= %s "
                         "for kernel_size %s, got padding %s"
                         % (op, _list(half), _list(kernel_size), _list(padding)))
    N, C, H, W = input.shape
    if C <= 0 or H <= 0 or W <= 0:
        raise ValueError("%s: expected input with non-zero C, H and W (only the batch dimension "
                         "may be 0), got shape %s" % (op, _list(input.shape)))
    dh, dw = dilation if dilated else (1, 1)
    OH = pool_output_size(H, kernel_size[0], padding[0], stride[0], dh, ceil_mode)
    OW = pool_output_size(W, kernel_size[1], padding[1], stride[1], dw, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError("%s: input of spatial size %sx%s gives an output of size %sx%s with "
                         "kernel_size %s, stride %s, padding %s%s, ceil_mode=%s; the output "
                         "must be at least 1x1"
                         % (op, H, W, OH, OW, _list(kernel_size), _list(stride), _list(padding),
                            ", dilation " + _list(dilation) if dilated else "",
                            "True" if ceil_mode else "False"))
    return PoolShape(N, C, H, W, OH, OW)


def check_divisor_override(op, divisor_override):
    """check_divisor_override (csrc/include/cnnops/pool_shape.h)."""
    if divisor_override is not None and divisor_override == 0:
        raise ValueError("%s: expected divisor_override to be non-zero or None, got 0" % op)


def check_pool_grad_output(op, grad_output, input):
    """check_pool_grad_output (csrc/include/cnnops/pool_shape.h): grad_output of a pooling op
    is 4-D, of input's dtype and device, with input's N and C."""
    check_4d(grad_output, "grad_output")
    check_same(grad_output, input, "grad_output", "input")
    if grad_output.shape[0] != input.shape[0] or grad_output.shape[1] != input.shape[1]:
        raise ValueError("%s: expected grad_output to have the batch and channel sizes of input "
                         "[%s, %s, *, *], got shape %s"
                         % (op, input.shape[0], input.shape[1], _list(grad_output.shape)))


def check_adaptive_input(op, input):
    """check_adaptive_input (csrc/include/cnnops/pool_shape.h): adaptive_avg_pool2d's input
    (and its backward's) has non-zero H and W."""
    check_4d(input, "input")
    check_cuda_float(input, "input")
    if input.shape[2] <= 0 or input.shape[3] <= 0:
        raise ValueError("%s: expected input with non-zero H and W, got shape %s"
                         % (op, _list(input.shape)))


def check_max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding,
                              dilation):
    """check_max_pool2d_backward (csrc/include/cnnops/pool_shape.h): the geometry, the input,
    grad_output, and int64 indices of grad_output's shape on input's device. (Their values are
    not checked: the kernel gathers, and an index outside the plane matches no element.)"""
    check_pair(kernel_size, "kernel_size", 1)
    check_pair(stride, "stride", 1)
    check_pair(padding, "padding", 0)
    check_pair(dilation, "dilation", 1)
    check_4d(input, "input")
    check_cuda_float(input, "input")
    check_pool_grad_output("max_pool2d_backward", grad_output, input)
    if indices is None or indices.dtype != torch.int64:
        raise TypeError("max_pool2d_backward: expected indices of dtype int64, got %s"
                        % ("None" if indices is None else scalar_type_name(indices.dtype)))
    if indices.device != input.device:
        raise ValueError("max_pool2d_backward: expected indices on the device of input (%s), "
                         "got %s" % (input.device, indices.device))
    if indices.shape != grad_output.shape:
        raise ValueError("max_pool2d_backward: expected indices of the shape of grad_output %s, "
                         "got %s" % (_list(grad_output.shape), _list(indices.shape)))


# ---------------------------------------------------------------------------
# csrc/include/cnnops/bn_shape.h (the device check is check_cuda_float's)

BNParams = namedtuple("BNParams", "running_mean running_var weight bias")


def check_bn_params(op, input, channels, running_mean, running_var, weight, bias, training,
                    eps, weight_name="weight", bias_name="bias"):
    """check_bn_params (csrc/include/cnnops/bn_shape.h): a BN forward's per-channel tensors
    (checked in the order weight, bias, running_mean, running_var), that inference has running
    statistics, and eps. Returns the BNParams as bn_channel_param returns them."""
    weight = bn_channel_param(weight, input, channels, weight_name)
    bias = bn_channel_param(bias, input, channels, bias_name)
    running_mean = bn_channel_param(running_mean, input, channels, "running_mean")
    running_var = bn_channel_param(running_var, input, channels, "running_var")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("%s in inference mode (training=False) needs running_mean and "
                         "running_var" % op)
    if not eps >= 0:
        raise ValueError("expected eps >= 0, got %s" % _double(eps))
    return BNParams(running_mean, running_var, weight, bias)


def check_bn_residual(residual, input):
    """check_bn_residual (csrc/include/cnnops/bn_shape.h): an optional residual of input's
    shape, dtype and device (read through its strides, so returned as given)."""
    if residual is None:
        return None
    check_same(residual, input, "residual", "input")
    if residual.shape != input.shape:
        raise ValueError("expected residual of shape %s (the shape of input), got %s"
                         % (_list(input.shape), _list(residual.shape)))
    return residual


def check_bn_saved(input, channels, weight, save_mean, save_invstd, weight_name="weight"):
    """check_bn_saved (csrc/include/cnnops/bn_shape.h): a BN backward's weight (optional) and
    saved statistics (required). Returns (weight, save_mean, save_invstd) as bn_channel_param
    returns them. (The schemas take the statistics as Tensor, not Tensor?, so the dispatcher
    refuses None first.)"""
    weight = bn_channel_param(weight, input, channels, weight_name)
    save_mean = bn_channel_param(save_mean, input, channels, "save_mean")
    save_invstd = bn_channel_param(save_invstd, input, channels, "save_invstd")
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    return weight, save_mean, save_invstd


def check_bn_backward(op, grad_output, output, input, relu):
    """check_bn_backward (csrc/include/cnnops/bn_shape.h): a 4-D input, grad_output of its
    shape and, with relu, the forward output of its shape too (the ReLU mask)."""
    check_4d(input, "input")
    check_cuda_float(input, "input")
    check_shape(grad_output, input.shape, "grad_output", input, "input")
    if relu:
        if output is None:
            raise ValueError("%s with relu=True needs the forward output" % op)
        check_shape(output, input.shape, "output", input, "input")


def check_conv_bn_relu_backward(grad_output, output, input, conv_bias, conv_output, s,
                                training):
    """check_conv_bn_relu_backward (csrc/include/cnnops/bn_shape.h): grad_output, output and in
    training conv_output of the conv output's shape (ConvShape s) and input's dtype and device.
    Returns the conv bias as optional_channel does."""
    shape = (s.N, s.OC, s.OH, s.OW)
    check_shape(grad_output, shape, "grad_output", input, "input")
    check_shape(output, shape, "output", input, "input")
    if training:
        check_shape(conv_output, shape, "conv_output", input, "input")
    return optional_channel(conv_bias, input, s.OC, "conv_bias")


# ---------------------------------------------------------------------------
# The checks the CUDA files make inline, each under the name of the op it sits in.

def check_elemt_means(mean_dy, mean_dy_xhat, input):
    """bn_relu_backward_elemt_cuda (csrc/cuda/batch_norm.cu): the gradient means, [C] BN
    tensors (bn_channel_param). Returns them as bn_channel_param does."""
    C = input.shape[1]
    mean_dy = bn_channel_param(mean_dy, input, C, "mean_dy")
    mean_dy_xhat = bn_channel_param(mean_dy_xhat, input, C, "mean_dy_xhat")
    if mean_dy is None or mean_dy_xhat is None:
        raise ValueError("mean_dy and mean_dy_xhat are required")
    return mean_dy, mean_dy_xhat


def check_batch_norm_stats(input):
    """batch_norm_stats_cuda (csrc/cuda/batch_norm.cu): a 4-D input with at least one value
    per channel."""
    check_4d(input, "input")
    check_cuda_float(input, "input")
    N, _, H, W = input.shape
    if N * H * W <= 0:
        raise ValueError("batch_norm_stats needs at least one value per channel, got input of "
                         "shape %s" % _list(input.shape))


def check_avg_pool_grad_output(grad_output, input, s):
    """avg_pool2d_backward_cuda (csrc/cuda/pooling.cu): grad_output is 4-D, of input's dtype
    and device, of the avg_pool2d output shape (PoolShape s)."""
    check_4d(grad_output, "grad_output")
    check_same(grad_output, input, "grad_output", "input")
    expected = (s.N, s.C, s.OH, s.OW)
    if tuple(grad_output.shape) != expected:
        raise ValueError("avg_pool2d_backward: expected grad_output of shape %s (the avg_pool2d "
                         "output shape for input %s), got %s"
                         % (_list(expected), _list(input.shape), _list(grad_output.shape)))

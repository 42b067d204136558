"""The public functional API: torch.nn.functional's signatures and semantics.

Each function validates its arguments (raising ValueError / TypeError that name
the argument, what was expected and what was given), normalises them (pairs,
string padding), picks a backend (cnnops.backends) and calls it. Training-mode
BatchNorm updates ``running_mean`` / ``running_var`` here, from the batch
statistics the op returns, exactly as torch.nn.functional.batch_norm does.

Shapes: input [N, C, H, W]; weight [OC, C/groups, KH, KW]; per-channel tensors
(running_mean, running_var, BN weight and bias, conv bias) [C] or [OC].
"""
import numbers

import torch

from . import backends, distributed, lean, reference
from ._shapes import conv_output_shape, pool_output_size

__all__ = ["conv2d", "conv2d_relu", "batch_norm", "bn_relu", "conv_bn_relu", "max_pool2d", "avg_pool2d",
           "adaptive_avg_pool2d", "add_relu"]


# ---------------------------------------------------------------------------
# autocast

def _autocast(input, *tensors):
    """The convolution's tensors as torch.autocast hands them to aten's convolution.

    Inside an autocast region for input's device, floating-point tensors other than
    float64 are cast to the autocast dtype (float16 or bfloat16); outside one, or for
    other arguments (BatchNorm's parameters and statistics stay as they are, as for
    aten's batch_norm), nothing changes. Returns (input, *tensors).
    """
    device = backends.device_type(input) if isinstance(input, torch.Tensor) else None
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return (input,) + tensors
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      and t.dtype not in (torch.float64, dtype) else t)
    return (cast(input),) + tuple(cast(t) for t in tensors)


# ---------------------------------------------------------------------------
# argument checks

def _check_tensor(t, name, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError("expected %s to be a torch.Tensor, got %s" % (name, type(t).__name__))


def _check_input(input, name="input", unbatched=False):
    """A floating-point [N, C, H, W] tensor. unbatched: the function also takes [C, H, W] (and
    has already turned it into a batch of one), so the message names both."""
    _check_tensor(input, name)
    if input.dim() != 4:
        raise ValueError("expected %s to be %s4-D [N, C, H, W], got %d-D with shape %s"
                         % (name, "3-D [C, H, W] or " if unbatched else "", input.dim(),
                            tuple(input.shape)))
    if not input.is_floating_point():
        raise TypeError("expected %s to be a floating-point tensor, got %s" % (name, input.dtype))


def _check_like(t, input, name, shape=None, same_dtype=True):
    """``t`` (when not None) is a tensor on input's device, of ``shape``."""
    if t is None:
        return
    _check_tensor(t, name)
    if t.device != input.device:
        raise ValueError("expected %s on %s (the device of input), got %s"
                         % (name, input.device, t.device))
    if same_dtype and t.dtype != input.dtype:
        raise TypeError("expected %s to have dtype %s (the dtype of input), got %s"
                        % (name, input.dtype, t.dtype))
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError("expected %s of shape %s, got %s" % (name, tuple(shape), tuple(t.shape)))


def _pair(value, name, min_value):
    """An int or a sequence of two ints, each >= min_value, as a tuple of two ints."""
    # Fast path for the common plain ints (the checks below cost microseconds per call).
    if type(value) is int and value >= min_value:
        return (value, value)
    if (type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and value[0] >= min_value and value[1] >= min_value):
        return tuple(value)
    items = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError("expected %s to be an int or a pair of ints, got %r" % (name, value)) from None
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                  for v in items):
        raise TypeError("expected %s to be an int or a pair of ints, got %r" % (name, value))
    if any(v < min_value for v in items):
        raise ValueError("expected %s >= %d, got %r" % (name, min_value, value))
    return tuple(int(v) for v in items)


def _is_unbatched(input):
    """[C, H, W]: torch.nn.functional's convolution and pooling take it as a batch of one and
    return the result without the batch dimension; so do cnnops'."""
    return isinstance(input, torch.Tensor) and input.dim() == 3


def _check_positive_int(value, name):
    if type(value) is int and value >= 1:
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError("expected %s to be a positive int, got %r" % (name, value))
    return int(value)


# ---------------------------------------------------------------------------
# the fast path

def _fast_impl(input, *others):
    """The compiled ops for a call that needs none of this module's work, else None.

    Such a call has a plain 4-D torch.Tensor input, its other tensors (``others``, None for
    an absent one) on the input's device, and runs outside torch.autocast and outside
    torch.compile's tracing, on a backend of C++ ops (cpu, cuda), which check every argument
    themselves before touching memory. (The device check is the one they cannot make: a meta
    tensor among the arguments sends the call to the shape-only fake kernel.) Such a call
    then goes straight to the op: the checks and normalisation below cost 15 us a call on
    their own, and up to 40 us within a training step, where they run with cold caches.
    Should the op raise, the caller runs the full path, whose checks raise the error that
    names the argument (or normalise what the op refused).
    """
    if type(input) is not torch.Tensor or input.dim() != 4 or torch.compiler.is_compiling():
        return None
    device = input.device
    for t in others:
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != device):
            return None
    try:
        impl = backends.implementation(input)
    except RuntimeError:  # a backend set that cannot run input: the full path's checks first
        return None
    if getattr(impl, "namespace", None) != "cnnops" or torch.is_autocast_enabled(
            backends.device_type(input)):
        return None
    return impl


def _plain_pair(value):
    """value as a pair when it is an int or a pair of ints (a module's geometry), else None."""
    if type(value) is int:
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    return None


def _plain_conv_geometry(stride, padding, dilation, groups):
    """(stride, padding, dilation) as pairs for the fast path, or None (e.g. padding='same')."""
    if type(groups) is not int:
        return None
    pairs = (_plain_pair(stride), _plain_pair(padding), _plain_pair(dilation))
    return None if None in pairs else pairs


def _plain_pool_geometry(kernel_size, stride, padding):
    """(kernel, stride, padding) as pairs for the fast path (stride None: the kernel), or
    None."""
    kernel = _plain_pair(kernel_size)
    geometry = (kernel, kernel if stride is None else _plain_pair(stride), _plain_pair(padding))
    return None if None in geometry else geometry


def _fast_bn_impl(input, others, training, momentum, eps, relu, process_group, memory):
    """_fast_impl for a BN call (others: its other tensors) whose remaining arguments are
    plain, as a module passes them: bool flags, float momentum and eps, no process group,
    memory="fast". Else None."""
    if (process_group is not None or memory != "fast" or type(training) is not bool
            or type(relu) is not bool or type(eps) is not float or type(momentum) is not float):
        return None
    return _fast_impl(input, *others)


# The errors a C++ op raises for arguments it refuses (TORCH_CHECK, _VALUE, _TYPE, _INDEX).
_OP_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


# ---------------------------------------------------------------------------
# convolution

# The kernels' geometry arguments are int32 (csrc/include/cnnops/common.h, check_pair).
_MAX_GEOMETRY = 2 ** 31 - 1


def _conv_args(input, weight, bias, stride, padding, dilation, groups, unbatched=False):
    """Validates a conv2d call; returns (input, stride, padding, dilation, groups).

    padding='same' with an odd total padding pads the extra row/column on the
    bottom/right first, as PyTorch does, so the returned input may be padded.
    A stride past the last window start (output size 1) and the dilation of a one-tap kernel
    change nothing: they come back reduced to the smallest equivalent value, so that any call
    PyTorch answers stays within the kernels' int32 range.
    """
    _check_input(input, unbatched=unbatched)
    _check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError("expected weight to be 4-D [out_channels, in_channels/groups, kH, kW], "
                         "got shape %s" % (tuple(weight.shape),))
    _check_like(weight, input, "weight")
    groups = _check_positive_int(groups, "groups")
    C, OC = input.shape[1], weight.shape[0]
    if C % groups != 0:
        raise ValueError("in_channels (%d) must be divisible by groups (%d)" % (C, groups))
    if OC == 0 or OC % groups != 0:
        raise ValueError("out_channels (%d) must be positive and divisible by groups (%d)"
                         % (OC, groups))
    if weight.shape[1] * groups != C:
        raise ValueError("expected weight of shape [%d, %d, kH, kW] for input with %d channels "
                         "and groups=%d, got weight of shape %s"
                         % (OC, C // groups, C, groups, tuple(weight.shape)))
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError("expected a non-empty kernel, got weight of shape %s" % (tuple(weight.shape),))
    _check_like(bias, input, "bias", (OC,))
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    KH, KW = weight.shape[2], weight.shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions "
                                 "(got stride=%s)" % (stride,))
            total = (dilation[0] * (KH - 1), dilation[1] * (KW - 1))
            padding = (total[0] // 2, total[1] // 2)
            extra_h, extra_w = total[0] % 2, total[1] % 2
            if extra_h or extra_w:
                input = torch.nn.functional.pad(input, (0, extra_w, 0, extra_h))
        else:
            raise ValueError("expected padding to be an int, a pair, 'same' or 'valid', got %r"
                             % (padding,))
    else:
        padding = _pair(padding, "padding", 0)
    H, W = input.shape[2], input.shape[3]
    equivalent = []
    for size, k, p, s, d, dim in ((H, KH, padding[0], stride[0], dilation[0], "height"),
                                  (W, KW, padding[1], stride[1], dilation[1], "width")):
        span = size + 2 * p - d * (k - 1) - 1  # the last valid window start
        if span < 0:
            raise ValueError("input %s %d with padding %d is smaller than the dilated kernel "
                             "(%d): the output would be empty" % (dim, size, p, d * (k - 1) + 1))
        equivalent.append((min(s, span + 1), 1 if k == 1 else d))
    stride, dilation = tuple(e[0] for e in equivalent), tuple(e[1] for e in equivalent)
    if max(padding) > _MAX_GEOMETRY:
        raise ValueError("expected padding <= 2**31 - 1, got %s (the output would have more "
                         "than 2**31 rows or columns)" % (padding,))
    return input, stride, padding, dilation, groups


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    input [N, C, H, W], weight [OC, C/groups, KH, KW], bias [OC] or None
    -> [N, OC, OH, OW] with OH = floor((H + 2*padding - dilation*(KH-1) - 1) / stride) + 1.
    padding: int, pair, 'valid' or 'same' (stride 1 only).
    An unbatched input [C, H, W] gives [OC, OH, OW].
    Under torch.autocast, runs in the autocast dtype as aten's convolution does.
    """
    impl = _fast_impl(input, weight, bias)
    geometry = _plain_conv_geometry(stride, padding, dilation, groups)
    if impl is not None and geometry is not None:
        try:
            return impl.conv2d(input, weight, bias, *geometry, groups)
        except _OP_ERRORS:
            pass  # the full path below says what is wrong, or runs what the op refused
    if _is_unbatched(input):
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                      groups).squeeze(0)
    input, weight, bias = _autocast(input, weight, bias)
    input, stride, padding, dilation, groups = _conv_args(input, weight, bias, stride, padding,
                                                          dilation, groups, unbatched=True)
    impl = backends.implementation(input)
    return impl.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                residual=None):
    """relu(conv2d(input) + residual) in one op: conv -> ReLU in networks without BatchNorm.

    Arguments as conv2d; residual [N, OC, OH, OW] or None. -> [N, OC, OH, OW]
    (unbatched: input [C, H, W], residual [OC, OH, OW] -> [OC, OH, OW])
    """
    impl = _fast_impl(input, weight, bias, residual)
    geometry = _plain_conv_geometry(stride, padding, dilation, groups)
    if impl is not None and geometry is not None:
        try:
            return impl.conv2d_relu(input, weight, bias, residual, *geometry, groups)
        except _OP_ERRORS:
            pass  # as in conv2d
    if _is_unbatched(input):
        if isinstance(residual, torch.Tensor):
            residual = residual.unsqueeze(0)
        return conv2d_relu(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                           residual).squeeze(0)
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    input, stride, padding, dilation, groups = _conv_args(input, weight, bias, stride, padding,
                                                          dilation, groups, unbatched=True)
    _check_like(residual, input, "residual", conv_output_shape(input, weight, stride, padding,
                                                             dilation))
    impl = backends.implementation(input)
    return impl.conv2d_relu(input, weight, bias, residual, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------
# batch normalisation

def _bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps, channels,
             names=("weight", "bias")):
    # As torch: BN tensors share the input's dtype, except float32 ones with a reduced-precision
    # input (mixed precision).
    allowed = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16):
        allowed.add(torch.float32)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, names[0]), (bias, names[1])):
        _check_like(t, input, name, (channels,), same_dtype=False)
        if t is not None and t.dtype not in allowed:
            raise TypeError("expected %s to have dtype %s (the dtype of input), got %s"
                            % (name, input.dtype, t.dtype))
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm with training=False needs running_mean and running_var")
    if type(momentum) is not float and (momentum is None
                                        or not isinstance(momentum, numbers.Real)):
        raise TypeError("expected momentum to be a float (for a cumulative average pass "
                        "1/num_batches_tracked, as torch.nn.BatchNorm2d does), got %r" % (momentum,))
    if (type(eps) is not float and not isinstance(eps, numbers.Real)) or eps < 0:
        raise ValueError("expected eps to be a float >= 0, got %r" % (eps,))


def _values_per_channel(shape):
    """N * H * W: how many values each channel's batch statistics average."""
    return shape[0] * shape[2] * shape[3]


def _verify_batch_size(count, shape):
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size %s"
                         % (torch.Size(shape),))


def _update_running_stats(impl, running_mean, running_var, mean, invstd, count, momentum, eps):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance
    (the backend's update_running_stats: one kernel on the cpu and cuda backends). The op returns
    1/sqrt(var + eps); the variance is recovered in float64. An empty batch leaves the statistics
    unchanged, as in PyTorch."""
    if count == 0 or (running_mean is None and running_var is None):
        return
    if torch.compiler.is_compiling():
        # Traced, the formula's tensor ops fuse anyway, and a cumulative average's momentum
        # (1 / num_batches_tracked) is a symbol that the op's float argument cannot take.
        reference.update_running_stats(running_mean, running_var, mean, invstd, count, momentum,
                                       eps)
        return
    impl.update_running_stats(running_mean, running_var, mean, invstd, count, float(momentum),
                              float(eps))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over (N, H, W), as torch.nn.functional.batch_norm.

    input [N, C, H, W]; running_mean, running_var, weight, bias [C] or None.
    Training normalises with the biased batch variance and, when running
    statistics are given, updates them in place (unbiased variance);
    inference uses the running statistics. -> [N, C, H, W]
    """
    return bn_relu(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   relu=False, residual=None)


def _sync_group(training, process_group):
    """The process group a training BN synchronises over, or None (eval mode, no group, or a
    group of one process)."""
    if process_group is None or not training:
        return None
    return distributed.check_process_group(process_group)


def _sync_bn_relu(impl, input, weight, bias, residual, eps, relu, group, running_mean,
                  running_var, momentum):
    """A training BN over the batch of every process in group (cnnops.distributed)."""
    out, mean, invstd, count = distributed.sync_bn_relu(impl, input, weight, bias, residual,
                                                        eps, relu, group)
    _update_running_stats(impl, running_mean, running_var, mean, invstd, count, momentum, eps)
    return out


def bn_relu(input, running_mean, running_var, weight, bias, training=False, momentum=0.1,
            eps=1e-5, relu=True, residual=None, process_group=None, memory="fast"):
    """relu(batch_norm(input) + residual), the pre-activation / BN-add-ReLU block end.

    input [N, C, H, W]; residual [N, C, H, W] or None; relu=False skips the ReLU.
    Same statistics semantics as batch_norm. -> [N, C, H, W]
    process_group: a torch.distributed ProcessGroup to take the training statistics over the
    batches of all its processes, as nn.SyncBatchNorm does (see cnnops.distributed; every
    process of the group must make the call); None (the default): this process's batch.
    memory: "fast" or "lean" (cnnops.lean); the same here, where nothing is kept that the
    neighbouring ops do not keep.
    """
    impl = _fast_bn_impl(input, (running_mean, running_var, weight, bias, residual), training,
                         momentum, eps, relu, process_group, memory)
    if impl is not None and (not training or _values_per_channel(input.shape) > 1):
        try:
            if residual is None and not relu:
                out, mean, invstd = impl.batch_norm(input, running_mean, running_var, weight,
                                                    bias, training, eps)
            else:
                out, mean, invstd = impl.bn_relu(input, running_mean, running_var, weight, bias,
                                                 residual, training, eps, relu)
        except _OP_ERRORS:
            pass  # as in conv2d
        else:
            if training:
                _update_running_stats(impl, running_mean, running_var, mean, invstd,
                                      _values_per_channel(input.shape), momentum, eps)
            return out
    lean.check_memory(memory)
    _check_input(input)
    C = input.shape[1]
    _bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps, C)
    _check_like(residual, input, "residual", tuple(input.shape))
    group = _sync_group(training, process_group)
    impl = backends.implementation(input)
    if group is not None:
        return _sync_bn_relu(impl, input, weight, bias, residual, eps, relu, group,
                             running_mean, running_var, momentum)
    count = _values_per_channel(input.shape)
    if training:
        _verify_batch_size(count, input.shape)
    if residual is None and not relu:
        out, mean, invstd = impl.batch_norm(input, running_mean, running_var, weight, bias,
                                            training, eps)
    else:
        out, mean, invstd = impl.bn_relu(input, running_mean, running_var, weight, bias,
                                         residual, training, eps, relu)
    if training:
        _update_running_stats(impl, running_mean, running_var, mean, invstd, count, momentum,
                              eps)
    return out


def conv_bn_relu(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1,
                 padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5,
                 relu=True, residual=None, process_group=None, memory="fast"):
    """relu(batch_norm(conv2d(input)) + residual) in one op.

    input [N, C, H, W]; weight [OC, C/groups, KH, KW]; bias (the conv bias) [OC]
    or None; bn_weight, bn_bias, running_mean, running_var [OC] or None;
    residual [N, OC, OH, OW] or None. Convolution arguments as conv2d, BN
    arguments as batch_norm (running statistics are updated in training).
    In inference BN is folded into the convolution's epilogue. Under torch.autocast the
    convolution's tensors (input, weight, bias, residual) are cast as for conv2d; the BN
    tensors are not. -> [N, OC, OH, OW]
    process_group: as for bn_relu (synchronised statistics: the convolution, then the
    synchronised BN of cnnops.distributed).
    memory: "fast" (the default) or "lean": training keeps no conv output for the backward,
    which recomputes it (cnnops.lean); about half the activation memory of a conv-BN-ReLU
    network for one more convolution forward per layer and step.
    """
    impl = _fast_bn_impl(input, (weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                 residual), training, momentum, eps, relu, process_group, memory)
    geometry = None if impl is None else _plain_conv_geometry(stride, padding, dilation, groups)
    if geometry is not None:
        try:
            out, _, mean, invstd = impl.conv_bn_relu(input, weight, bias, bn_weight, bn_bias,
                                                     running_mean, running_var, residual,
                                                     *geometry, groups, training, eps, relu)
        except _OP_ERRORS:
            pass  # as in conv2d
        else:
            count = _values_per_channel(out.shape)
            if not training:
                return out
            if count > 1:  # else the full path raises, as torch does
                _update_running_stats(impl, running_mean, running_var, mean, invstd, count,
                                      momentum, eps)
                return out
    lean.check_memory(memory)
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    input, stride, padding, dilation, groups = _conv_args(input, weight, bias, stride, padding,
                                                          dilation, groups)
    OC = weight.shape[0]
    _bn_args(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, OC,
             names=("bn_weight", "bn_bias"))
    out_shape = conv_output_shape(input, weight, stride, padding, dilation)
    _check_like(residual, input, "residual", out_shape)
    group = _sync_group(training, process_group)
    impl = backends.implementation(input)
    if group is not None:
        if memory == "lean":
            raise NotImplementedError("conv_bn_relu: memory='lean' with a process_group is not "
                                      "implemented (the synchronised BN keeps the conv output)")
        conv_out = impl.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return _sync_bn_relu(impl, conv_out, bn_weight, bn_bias, residual, eps, relu, group,
                             running_mean, running_var, momentum)
    count = _values_per_channel(out_shape)
    if training:
        _verify_batch_size(count, out_shape)
    if memory == "lean" and training and torch.is_grad_enabled() and impl is not reference:
        out, mean, invstd = lean.conv_bn_relu(impl, input, weight, bias, bn_weight, bn_bias,
                                              residual, stride, padding, dilation, groups, eps,
                                              relu)
    else:
        out, _, mean, invstd = impl.conv_bn_relu(input, weight, bias, bn_weight, bn_bias,
                                                 running_mean, running_var, residual, stride,
                                                 padding, dilation, groups, training, eps, relu)
    if training:
        _update_running_stats(impl, running_mean, running_var, mean, invstd, count, momentum,
                              eps)
    return out


# ---------------------------------------------------------------------------
# pooling

def _check_nonempty_planes(input, first_dim):
    """PyTorch's pooling allows an empty batch but no other empty dimension from first_dim on."""
    if any(size == 0 for size in input.shape[first_dim:]):
        raise ValueError("expected input with non-zero sizes in every dimension from %d on "
                         "(only the batch may be empty), got shape %s"
                         % (first_dim, tuple(input.shape)))


def _pool_args(input, kernel_size, stride, padding, dilation, ceil_mode):
    _check_input(input, unbatched=True)
    _check_nonempty_planes(input, 1)
    kernel_size = _pair(kernel_size, "kernel_size", 1)
    stride = kernel_size if stride is None or (not isinstance(stride, numbers.Integral)
                                               and len(stride) == 0) else _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    for k, p in zip(kernel_size, padding):
        # PyTorch's rule (dilation does not count): padding at most half the kernel.
        if p > k // 2:
            raise ValueError("pad should be at most half of effective kernel size, got "
                             "padding=%s for kernel_size=%s, dilation=%s"
                             % (padding, kernel_size, dilation))
    H, W = input.shape[2], input.shape[3]
    out = [pool_output_size(s, k, p, st, d, bool(ceil_mode))
           for s, k, p, st, d in zip((H, W), kernel_size, padding, stride, dilation)]
    if min(out) < 1:
        raise ValueError("input of spatial size (%d, %d) is too small for kernel_size=%s, "
                         "padding=%s, dilation=%s: the output would be empty"
                         % (H, W, kernel_size, padding, dilation))
    return kernel_size, stride, padding, dilation


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max pooling, as torch.nn.functional.max_pool2d (padding counts as -inf).

    input [N, C, H, W] -> [N, C, OH, OW] (and int64 indices into each H*W plane
    when return_indices); [C, H, W] -> [C, OH, OW]. stride defaults to kernel_size.
    """
    impl = _fast_impl(input)
    if impl is not None and type(ceil_mode) is bool:
        geometry = _plain_pool_geometry(kernel_size, stride, padding)
        dilation_pair = _plain_pair(dilation)
        if geometry is not None and dilation_pair is not None:
            try:
                out, indices = impl.max_pool2d(input, *geometry, dilation_pair, ceil_mode)
                return (out, indices) if return_indices else out
            except _OP_ERRORS:
                pass  # as in conv2d
    if _is_unbatched(input):
        out = max_pool2d(input.unsqueeze(0), kernel_size, stride, padding, dilation, ceil_mode,
                         return_indices)
        return tuple(t.squeeze(0) for t in out) if return_indices else out.squeeze(0)
    kernel_size, stride, padding, dilation = _pool_args(input, kernel_size, stride, padding,
                                                        dilation, ceil_mode)
    impl = backends.implementation(input)
    out, indices = impl.max_pool2d(input, kernel_size, stride, padding, dilation, bool(ceil_mode))
    return (out, indices) if return_indices else out


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Average pooling, as torch.nn.functional.avg_pool2d.

    input [N, C, H, W] -> [N, C, OH, OW]; [C, H, W] -> [C, OH, OW]. count_include_pad
    counts zero padding in the divisor; divisor_override (a non-zero int) replaces the divisor.
    """
    impl = _fast_impl(input)
    if (impl is not None and type(ceil_mode) is bool and type(count_include_pad) is bool
            and (divisor_override is None or type(divisor_override) is int)):
        geometry = _plain_pool_geometry(kernel_size, stride, padding)
        if geometry is not None:
            try:
                return impl.avg_pool2d(input, *geometry, ceil_mode, count_include_pad,
                                       divisor_override)
            except _OP_ERRORS:
                pass  # as in conv2d
    if _is_unbatched(input):
        return avg_pool2d(input.unsqueeze(0), kernel_size, stride, padding, ceil_mode,
                          count_include_pad, divisor_override).squeeze(0)
    kernel_size, stride, padding, _ = _pool_args(input, kernel_size, stride, padding, 1,
                                                 ceil_mode)
    if divisor_override is not None:
        if (not isinstance(divisor_override, numbers.Integral) or isinstance(divisor_override, bool)
                or divisor_override == 0):
            raise ValueError("expected divisor_override to be a non-zero int or None, got %r"
                             % (divisor_override,))
        divisor_override = int(divisor_override)
    impl = backends.implementation(input)
    return impl.avg_pool2d(input, kernel_size, stride, padding, bool(ceil_mode),
                           bool(count_include_pad), divisor_override)


def adaptive_avg_pool2d(input, output_size):
    """Adaptive average pooling, as torch.nn.functional.adaptive_avg_pool2d.

    input [N, C, H, W] -> [N, C, OH, OW] ([C, H, W] -> [C, OH, OW]); output_size an int
    or a pair whose entries may be None (keep that input size). Bin i covers
    [floor(i*H/OH), ceil((i+1)*H/OH)).
    """
    impl = _fast_impl(input)
    size = _plain_pair(output_size)
    if impl is not None and size is not None:
        try:
            return impl.adaptive_avg_pool2d(input, size)
        except _OP_ERRORS:
            pass  # as in conv2d
    if _is_unbatched(input):
        return adaptive_avg_pool2d(input.unsqueeze(0), output_size).squeeze(0)
    _check_input(input, unbatched=True)
    _check_nonempty_planes(input, 2)  # adaptive pooling allows C == 0
    if isinstance(output_size, numbers.Integral):
        output_size = (output_size, output_size)
    if not isinstance(output_size, (tuple, list, torch.Size)):
        raise TypeError("expected output_size to be an int or a pair (entries may be None), "
                        "got %r" % (output_size,))
    output_size = tuple(output_size)
    if len(output_size) != 2:
        raise ValueError("expected output_size to be an int or a pair, got %r" % (output_size,))
    output_size = tuple(input.shape[2 + i] if s is None else s for i, s in enumerate(output_size))
    output_size = _pair(output_size, "output_size", 0)
    impl = backends.implementation(input)
    return impl.adaptive_avg_pool2d(input, output_size)


# ---------------------------------------------------------------------------
# elementwise

def _result_type(a, b):
    """torch.result_type for two tensors, in a form torch.compile traces without a break."""
    if a.dtype == b.dtype:
        return a.dtype
    if (a.dim() == 0) != (b.dim() == 0):
        # A zero-dim tensor decides the dtype only when it is of a higher category.
        full, zero = (a, b) if b.dim() == 0 else (b, a)
        if full.is_floating_point() or not zero.is_floating_point():
            return full.dtype
        return zero.dtype
    return torch.promote_types(a.dtype, b.dtype)


def add_relu(input, other):
    """relu(input + other). Broadcasting and type promotion as torch.add.

    input, other: tensors of broadcastable shapes (typically [N, C, H, W]).
    """
    _check_tensor(input, "input")
    _check_tensor(other, "other")
    if input.device != other.device:
        raise ValueError("expected input and other on the same device, got %s and %s"
                         % (input.device, other.device))
    dtype = _result_type(input, other)
    if not dtype.is_floating_point:
        raise TypeError("add_relu expects floating-point input or other, got input of dtype %s "
                        "and other of dtype %s" % (input.dtype, other.dtype))
    # Cast before broadcasting, as torch.add does (a broadcast operand's gradient is then
    # summed in the result dtype).
    input, other = input.to(dtype), other.to(dtype)
    if input.shape != other.shape:  # (torch.broadcast_shapes costs ~50 us a call)
        try:
            shape = torch.broadcast_shapes(input.shape, other.shape)
        except RuntimeError:
            raise ValueError("input of shape %s and other of shape %s do not broadcast"
                             % (tuple(input.shape), tuple(other.shape))) from None
        input, other = input.expand(shape), other.expand(shape)
    impl = backends.implementation(input)
    return impl.add_relu(input, other)

"""Autograd of the Triton ops (torch.ops.cnnops_triton.*): the formulas of csrc/autograd.cpp.

Each forward op saves what its backward op reads; statistics and indices are outputs without
gradients. The compiled ops keep these formulas in C++ because
torch.library.register_autograd's glue costs 60-250 us a call; the Triton ops' kernels are
Python anyway. Tests compare both backends' gradients with torch.

Which forward arguments a backward op differentiates is written by name, as in the op's
schema (csrc/cnnops.cpp); their positions come from the registered schema.
"""
import collections
import functools

import torch


class _Differentiable:
    """The arguments of forward op ``op`` that its backward op differentiates, by schema name,
    in the order of the backward op's gradients (its output_mask)."""

    def __init__(self, op, *names):
        args = [a.name for a in op.default._schema.arguments]
        self.positions = [args.index(name) for name in names]
        self.n_args = len(args)
        self._inputs = collections.namedtuple(op.default._schema.name.split("::")[-1] + "_inputs",
                                              args)

    def inputs(self, inputs):
        """A forward call's arguments (setup_context's ``inputs``), named as in the schema."""
        return self._inputs(*inputs)

    def mask(self, ctx, n=None):
        """The output_mask of a backward op whose gradients are those of the first n."""
        return [ctx.needs_input_grad[p] for p in self.positions[:n]]

    def place(self, ctx, grads):
        """One gradient per forward argument: grads[i] at the i-th name's position where it
        needs one, None elsewhere."""
        out = [None] * self.n_args
        for position, g in zip(self.positions, grads):
            if ctx.needs_input_grad[position]:
                out[position] = g
        return tuple(out)


class _SecondDerivativeError(torch.autograd.Function):
    """The identity on a backward's gradients, whose own backward (a second derivative) raises.

    forward(message, n, *tensors): the first n tensors are the gradients; the rest are what they
    depend on (saved tensors, incoming gradients), so a second backward towards any of those
    reaches this node."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _once_differentiable(name, backward):
    """``backward`` for autograd: the backward ops have no derivatives of their own, so under
    create_graph=True the gradients it returns raise, naming the op, when a second backward
    reaches them, instead of silently dropping out of second derivatives. As backward_result
    in csrc/autograd.cpp."""
    message = ("%s: double backward (differentiating its gradient, as create_graph=True "
               "allows) is not supported; compute second derivatives through "
               "torch.nn.functional instead" % name)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        sources = [t for t in ctx.saved_tensors + grads
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        results = [t for t in out if isinstance(t, torch.Tensor)]
        if not sources or not results:
            return out
        wrapped = iter(_SecondDerivativeError.apply(message, len(results), *results, *sources))
        return tuple(next(wrapped) if isinstance(t, torch.Tensor) else t for t in out)

    return wrapper


def register_autograd(ns):
    """Registers the autograd formulas of the ops in namespace ``ns``."""
    lib = getattr(torch.ops, ns)

    def register(name, backward, setup_context):
        # (the error names the op as the compiled ops' do: cnnops::<name>)
        torch.library.register_autograd(ns + "::" + name,
                                        _once_differentiable("cnnops::" + name, backward),
                                        setup_context=setup_context)

    conv2d_args = _Differentiable(lib.conv2d, "input", "weight", "bias")

    def _conv2d_setup(ctx, inputs, output):
        a = conv2d_args.inputs(inputs)
        ctx.save_for_backward(a.input, a.weight)
        ctx.conv = (a.stride, a.padding, a.dilation, a.groups)

    def _conv2d_backward(ctx, grad):
        input, weight = ctx.saved_tensors
        grads = lib.conv2d_backward(grad, input, weight, *ctx.conv, conv2d_args.mask(ctx))
        return conv2d_args.place(ctx, grads)

    register("conv2d", _conv2d_backward, _conv2d_setup)

    conv2d_relu_args = _Differentiable(lib.conv2d_relu, "input", "weight", "bias", "residual")

    def _conv2d_relu_setup(ctx, inputs, output):
        a = conv2d_relu_args.inputs(inputs)
        ctx.save_for_backward(a.input, a.weight, output)
        ctx.conv = (a.stride, a.padding, a.dilation, a.groups)

    def _conv2d_relu_backward(ctx, grad):
        input, weight, out = ctx.saved_tensors
        grad = lib.add_relu_backward(grad, out)  # through the ReLU: also the residual's gradient
        gi, gw, gb = lib.conv2d_backward(grad, input, weight, *ctx.conv,
                                         conv2d_relu_args.mask(ctx, 3))
        return conv2d_relu_args.place(ctx, (gi, gw, gb, grad))

    register("conv2d_relu", _conv2d_relu_backward, _conv2d_relu_setup)

    batch_norm_args = _Differentiable(lib.batch_norm, "input", "weight", "bias")

    def _bn_setup(ctx, inputs, output):
        a = batch_norm_args.inputs(inputs)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(a.input, a.weight, output[1], output[2])
        ctx.training = a.training

    def _batch_norm_backward(ctx, grad, _gm, _gi):
        input, weight, mean, invstd = ctx.saved_tensors
        grads = lib.batch_norm_backward(grad, input, weight, mean, invstd, ctx.training,
                                        batch_norm_args.mask(ctx))
        return batch_norm_args.place(ctx, grads)

    register("batch_norm", _batch_norm_backward, _bn_setup)

    bn_relu_args = _Differentiable(lib.bn_relu, "input", "weight", "bias", "residual")

    def _bn_relu_setup(ctx, inputs, output):
        a = bn_relu_args.inputs(inputs)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(a.input, a.weight, output[1], output[2],
                              output[0] if a.relu else None)
        ctx.training, ctx.relu = a.training, a.relu

    def _bn_relu_backward(ctx, grad, _gm, _gi):
        input, weight, mean, invstd, out = ctx.saved_tensors
        grads = lib.bn_relu_backward(grad, out, input, weight, mean, invstd, ctx.training,
                                     ctx.relu, bn_relu_args.mask(ctx))
        return bn_relu_args.place(ctx, grads)

    register("bn_relu", _bn_relu_backward, _bn_relu_setup)

    cbr_args = _Differentiable(lib.conv_bn_relu, "input", "weight", "conv_bias", "bn_weight",
                               "bn_bias", "residual")

    def _cbr_setup(ctx, inputs, output):
        a = cbr_args.inputs(inputs)
        out, conv_out, mean, invstd = output
        ctx.mark_non_differentiable(conv_out, mean, invstd)
        # The training backward reads the output only for the ReLU mask (csrc/autograd.cpp)
        kept_out = out if a.relu or not a.training else None
        ctx.save_for_backward(a.input, a.weight, a.conv_bias, a.bn_weight, kept_out, conv_out,
                              mean, invstd)
        ctx.conv = (a.stride, a.padding, a.dilation, a.groups)
        ctx.training, ctx.relu = a.training, a.relu

    def _cbr_backward(ctx, grad, _gc, _gm, _gi):
        input, weight, conv_bias, bn_weight, out, conv_out, mean, invstd = ctx.saved_tensors
        grads = lib.conv_bn_relu_backward(
            grad, out if out is not None else conv_out, input, weight, conv_bias, conv_out,
            bn_weight, mean, invstd, *ctx.conv, ctx.training, ctx.relu, cbr_args.mask(ctx))
        return cbr_args.place(ctx, grads)

    register("conv_bn_relu", _cbr_backward, _cbr_setup)

    max_pool_args = _Differentiable(lib.max_pool2d, "input")

    def _max_pool_setup(ctx, inputs, output):
        a = max_pool_args.inputs(inputs)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(a.input, output[1])
        ctx.geometry = (a.kernel_size, a.stride, a.padding, a.dilation)

    def _max_pool_backward(ctx, grad, _gidx):
        input, indices = ctx.saved_tensors
        gi = lib.max_pool2d_backward(grad, input, indices, *ctx.geometry)
        return max_pool_args.place(ctx, (gi,))

    register("max_pool2d", _max_pool_backward, _max_pool_setup)

    avg_pool_args = _Differentiable(lib.avg_pool2d, "input")

    def _avg_pool_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.args = inputs[1:]  # every argument after input, as avg_pool2d_backward takes them

    def _avg_pool_backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return avg_pool_args.place(ctx, (lib.avg_pool2d_backward(grad, input, *ctx.args),))

    register("avg_pool2d", _avg_pool_backward, _avg_pool_setup)

    adaptive_args = _Differentiable(lib.adaptive_avg_pool2d, "input")

    def _adaptive_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _adaptive_backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return adaptive_args.place(ctx, (lib.adaptive_avg_pool2d_backward(grad, input),))

    register("adaptive_avg_pool2d", _adaptive_backward, _adaptive_setup)

    add_relu_args = _Differentiable(lib.add_relu, "input", "other")

    def _add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = lib.add_relu_backward(grad, out)
        return add_relu_args.place(ctx, (g, g))

    register("add_relu", _add_relu_backward, _add_relu_setup)

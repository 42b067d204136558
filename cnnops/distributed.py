"""Synchronised BatchNorm: fused BN (+ residual) (+ ReLU) over the batch of every process.

What nn.SyncBatchNorm computes, on every backend (cpu with gloo; cuda and triton with nccl)
and fused as cnnops' BN ops are. cnnops.functional.bn_relu / conv_bn_relu take it with
``process_group=``, and cnnops.nn / cnnops.fuse pass a SyncBatchNorm's group, so a model
with nn.SyncBatchNorm (e.g. from nn.SyncBatchNorm.convert_sync_batchnorm) runs it after
cnnops.fuse, also on the CPU, where torch's own SyncBatchNorm refuses to run.

A training step of one synchronised BN layer, input [N_r, C, H, W] on rank r:

forward   each rank's count N_r*H*W, mean and M2 per channel (the backend's
          batch_norm_stats); one all_gather of these [2C + 1] values; Chan et al.'s merge
          (in float64) into the global mean and biased variance; the backend's bn_relu in
          inference mode with those as its statistics: normalise, affine, residual, ReLU
          in one pass. The running statistics take the global mean and unbiased variance.
backward  each rank's sum(gy) and sum(gy * xhat) per channel (the backend's
          bn_relu_backward, gy the gradient through the ReLU); one all_reduce of these [2C]
          values (only when the input needs a gradient, as torch's); the backend's
          bn_relu_backward_elemt for the input gradient with the global means. The BN weight
          and bias gradients stay this rank's sums: DistributedDataParallel averages them
          with the other parameters' gradients, as it does for nn.SyncBatchNorm.

Uneven batches and empty ones take part: an empty rank contributes count 0 and still joins
both collectives. Eval mode normalises with the running statistics and communicates nothing.

Every rank must make the same sequence of calls: a rank that raises before a collective
(a bad argument on one rank only, an exception in its own code) leaves the others waiting
in that collective. They fail when the process group notices: at once with gloo when the
failed process exits (its connections close), else after the group's timeout
(``init_process_group(timeout=...)``). Under torchrun a failed rank ends the whole job.

Under torch.compile the collectives are a graph break (the synchronised step runs
eagerly between two compiled graphs); everything else compiles as usual.
"""
import torch
import torch.distributed as dist

from . import reference

__all__ = ["check_process_group", "sync_bn_relu"]


def check_process_group(process_group):
    """The group to synchronise over, or None when there is nothing to synchronise (a group
    of one process). Raises if ``process_group`` is not a group this process belongs to."""
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError("expected process_group to be a torch.distributed ProcessGroup "
                        "(e.g. torch.distributed.group.WORLD) or None, got %r" % (process_group,))
    size = dist.get_world_size(process_group)
    if size < 0:
        raise ValueError("this process (rank %d) is not a member of process_group"
                         % dist.get_rank())
    return process_group if size > 1 else None


def _all_gather(local, group):
    """[world, n] from every rank's [n] (one collective), on local's device. gloo's go through
    host memory (a few hundred values per layer: the copy costs nothing next to the
    collective)."""
    world = dist.get_world_size(group)
    wire = local.cpu() if dist.get_backend(group) == "gloo" else local
    out = wire.new_empty(world * wire.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, wire, group=group)
    return out.view(world, wire.numel()).to(local.device)


def _all_reduce(tensor, group):
    """The sum over group's ranks of tensor (one collective), on tensor's device. With gloo,
    an all_gather and a local sum: on the loopback interface gloo's all_reduce of a few
    hundred values took 1.0 ms, its all_gather 0.56 ms (2 processes)."""
    if dist.get_backend(group) == "gloo":
        return _all_gather(tensor, group).sum(0)
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


def _global_stats(local, channels):
    """Merges every rank's (mean [C], M2 [C], count) rows, [world, 2C + 1] float64, into the
    global (mean [C], biased variance [C], count) (Chan et al.: exact for uneven counts;
    count-0 rows add nothing)."""
    mean_r, m2_r, n_r = local[:, :channels], local[:, channels:-1], local[:, -1:]
    count = n_r.sum()
    mean = (n_r * mean_r).sum(0) / count
    m2 = m2_r.sum(0) + (n_r * (mean_r - mean).square()).sum(0)
    return mean, m2 / count, count


class _SyncBNReLU(torch.autograd.Function):
    """relu?(batch_norm(input) + residual?) with statistics over the group's whole batch.

    forward(input [N, C, H, W], weight [C] or None, bias [C] or None, residual like input or
    None, ops, group, eps, relu) -> (output, save_mean [C], save_invstd [C], count: a
    0-dim tensor, the values per channel over every rank)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, ops, group, eps, relu):
        C = input.shape[1]
        count = input.numel() // C if C else 0
        if count > 0:
            mean, var = ops.batch_norm_stats(input)
            local = torch.cat([mean.double(), var.double() * count,
                               mean.new_full((1,), count, dtype=torch.float64)])
        else:  # an empty batch joins the gather with count 0
            local = input.new_zeros(2 * C + 1, dtype=torch.float64)
        mean, var, total = _global_stats(_all_gather(local, group), C)
        stat_dtype = reference._stat_dtype(input)
        # Inference-mode bn_relu with the global statistics standing in for the running ones:
        # normalise, affine, residual and ReLU in one pass; it returns mean and 1/sqrt(var+eps).
        out, save_mean, save_invstd = ops.bn_relu(input, mean.to(stat_dtype), var.to(stat_dtype),
                                                  weight, bias, residual, False, eps, relu)
        ctx.save_for_backward(input, weight, save_mean, save_invstd, out if relu else None)
        ctx.ops, ctx.group, ctx.relu, ctx.total = ops, group, relu, total
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(save_mean, save_invstd, total)
        return out, save_mean, save_invstd, total

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_invstd, _grad_total):
        input, weight, mean, invstd, out = ctx.saved_tensors
        need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
        ops = ctx.ops
        # This rank's sums: grad_weight = sum(gy * xhat), grad_bias = sum(gy) (a weight of ones
        # stands in for an absent one, whose gradient the op would skip).
        w = weight if weight is not None else torch.ones_like(mean)
        _, sum_dy_xhat, sum_dy, grad_residual = ops.bn_relu_backward(
            grad, out, input, w, mean, invstd, True, ctx.relu,
            [False, True, True, need_residual])
        grad_input = None
        if need_input:
            sums = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]).to(mean.dtype), ctx.group)
            means = sums / ctx.total.to(sums.dtype)
            C = mean.shape[0]
            grad_input, _ = ops.bn_relu_backward_elemt(grad, out, input, weight, mean, invstd,
                                                       means[:C], means[C:], ctx.relu,
                                                       [True, False])
        return (grad_input, sum_dy_xhat if need_weight and weight is not None else None,
                sum_dy if need_bias and ctx.has_bias else None,
                grad_residual if need_residual else None, None, None, None, None)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the group's ranks of a tensor, differentiable: each rank's loss depends on
    every rank's input, so the gradient is the sum of every rank's incoming gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _all_reduce(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def _reference_sync_bn_relu(input, weight, bias, residual, group, eps, relu):
    """The reference backend's synchronised BN: per-channel sums in float64, one differentiable
    all_reduce, the rest autograd. Independent of the phase ops, as an oracle should be."""
    C = input.shape[1]
    x = input.double()
    local = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                       x.new_full((1,), x.numel() // C if C else 0)])
    sums = _AllReduceSum.apply(local, group)
    total = sums[-1]
    mean = sums[:C] / total
    var = (sums[C:2 * C] / total - mean.square()).clamp_min(0)
    invstd = torch.rsqrt(var + eps)
    out = (x - mean[:, None, None]) * invstd[:, None, None]
    if weight is not None:
        out = out * weight.double()[:, None, None]
    if bias is not None:
        out = out + bias.double()[:, None, None]
    out = out.to(input.dtype)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    stat_dtype = reference._stat_dtype(input)
    return out, mean.detach().to(stat_dtype), invstd.detach().to(stat_dtype), total.detach()


@torch.compiler.disable
def sync_bn_relu(ops, input, weight, bias, residual, eps, relu, group):
    """relu?(batch_norm(input) + residual?) in training mode, with the batch statistics of
    every rank in ``group`` (a ProcessGroup of two or more processes).

    ops: the backend (cnnops.backends.implementation(input)); input [N, C, H, W] (N may differ
    between ranks, and be 0); weight, bias [C] or None; residual like input or None.
    -> (output like input, mean [C], invstd [C], count): the global statistics, as a training
    bn_relu returns its batch's, and the number of values per channel over every rank (an int),
    for the running statistics update.
    """
    if ops is reference:
        out, mean, invstd, total = _reference_sync_bn_relu(input, weight, bias, residual, group,
                                                           eps, relu)
    else:
        out, mean, invstd, total = _SyncBNReLU.apply(input, weight, bias, residual, ops, group,
                                                     eps, relu)
    return out, mean, invstd, int(total.item())

"""cnnops.warmup: run a model once ahead of time, so that kernel tuning happens before training.

The Triton backend autotunes each convolution shape on its first call (each config compiled
and timed): for a ResNet-50 that is minutes, which would otherwise land in the first training
step. ``cnnops.warmup(model, x)`` runs one forward and backward pass and puts the model back
as it was; Triton keeps the tuning results on disk, so later processes skip the tuning too.

    model = cnnops.fuse(model).cuda()
    cnnops.warmup(model, torch.randn(32, 3, 224, 224, device="cuda"))
"""
import time

import torch

__all__ = ["warmup"]


def warmup(model, *inputs, backward=True, verbose=True):
    """Runs ``model(*inputs)`` and, with ``backward``, a backward pass from the sum of its
    outputs, then restores everything the pass changed: buffers (BatchNorm's running
    statistics and num_batches_tracked), parameters' gradients and the random number
    generators. Call it in the mode (train or eval) and under the autocast, backend and
    memory format the real run uses: those decide which kernels are tuned.

    -> seconds the pass took. verbose prints them.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone())
             for p in model.parameters()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    start = time.perf_counter()
    try:
        out = model(*inputs)
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        if backward and outputs:
            sum(t.float().sum() for t in outputs).backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, saved in grads:
            p.grad = saved
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    seconds = time.perf_counter() - start
    if verbose:
        print("cnnops.warmup: %s pass of %s in %.1f s" % (
            "forward + backward" if backward else "forward", type(model).__name__, seconds))
    return seconds

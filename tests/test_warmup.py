"""cnnops.warmup leaves the model as it was; the Triton ops launch no small ATen kernels.

On a GPU the Triton backend's first call of each shape autotunes (minutes for a big model);
cnnops.warmup moves that before training. The per-call work of the Triton BN paths is a few
Triton launches with every per-channel constant computed in a kernel: the only ATen ops they
call allocate (torch.empty) or zero a tile-count buffer.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cnnops


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_warmup_leaves_the_model_as_it_was(backend, train, capsys):
    torch.manual_seed(0)
    # Small, for the interpreted Triton kernels: fused blocks, a residual join, pooling.
    model = torch.nn.Sequential(cnnops.FusedConvBNReLU(3, 4, 3, padding=1),
                                cnnops.nn.MaxPool2d(2), cnnops.FusedConvBNReLU(4, 4, 3, padding=1),
                                cnnops.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    model.train(train)
    x = torch.randn(2, 3, 8, 8)
    before, grads = _state(model)
    rng = torch.random.get_rng_state()
    seconds = cnnops.warmup(model, x)
    assert seconds > 0 and "cnnops.warmup: forward + backward pass" in capsys.readouterr().out
    after, grads_after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # running stats, num_batches_tracked too
    assert all(g is None for g in grads_after) and all(g is None for g in grads)
    assert torch.equal(torch.random.get_rng_state(), rng)


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Allocation only: empty tensors, and zeroing the per-tile counts of the statistics epilogue.
_ALLOWED = {"empty", "empty_strided", "new_empty", "zeros", "zero_", "fill_", "_to_copy"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_bn_paths_launch_no_small_aten_kernels(training):
    if "triton" not in cnnops.available_backends():
        pytest.skip("the triton backend is not available here")
    from cnnops.triton_kernels import ops as _  # noqa: F401  (registers torch.ops.cnnops_triton)

    ops = torch.ops.cnnops_triton
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 5, requires_grad=False)
    w = torch.randn(6, 4, 3, 3)
    bn6 = [torch.rand(6) + 0.5 for _ in range(4)]
    bn4 = [torch.rand(4) + 0.5 for _ in range(4)]
    g = torch.randn(2, 6, 6, 5)
    calls = {
        "conv_bn_relu": lambda: ops.conv_bn_relu(x, w, None, *bn6, None, [1, 1], [1, 1], [1, 1],
                                                 1, training, 1e-5, True),
        "bn_relu": lambda: ops.bn_relu(x, *bn4, None, training, 1e-5, True),
    }
    with _AtenOps() as rec:
        ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert rec.ops <= _ALLOWED, ("conv2d", sorted(rec.ops - _ALLOWED))
    for name, call in calls.items():
        with _AtenOps() as rec:
            out = call()
        assert rec.ops <= _ALLOWED, (name, sorted(rec.ops - _ALLOWED))
        mean, invstd = out[-2], out[-1]
        rm, rv = torch.zeros(mean.shape[0]), torch.ones(mean.shape[0])
        with _AtenOps() as rec:
            ops.update_running_stats(rm, rv, mean, invstd, 60, 0.1, 1e-5)
        assert rec.ops <= _ALLOWED, ("update_running_stats", sorted(rec.ops - _ALLOWED))
    out, conv_out, mean, invstd = calls["conv_bn_relu"]()
    with _AtenOps() as rec:
        ops.conv_bn_relu_backward(g, out, x, w, None, conv_out, bn6[0], mean, invstd, [1, 1],
                                  [1, 1], [1, 1], 1, training, True, [False, False, False, True,
                                                                      True, False])
    assert rec.ops <= _ALLOWED, ("conv_bn_relu_backward", sorted(rec.ops - _ALLOWED))

"""Models built from cnnops modules run under torch.compile(fullgraph=True): no graph breaks,
same outputs, gradients and running statistics as eager."""
import copy

import pytest
import torch

import cnnops
import cnnops.functional as CF
from cnnops import triton_kernels
from conftest import assert_close, check, conv_cores, needs_cuda, on_gpu, twin_resnet


class Net(torch.nn.Module):
    """A small network touching every op: fused conv-BN-ReLU with residual, BN-ReLU, pooling."""

    def __init__(self):
        super().__init__()
        self.stem = cnnops.FusedConvBNReLU(3, 8, 3, padding=1)
        self.block = cnnops.FusedConvBNReLU(8, 8, 3, padding=1, relu=True)
        self.pool = cnnops.nn.MaxPool2d(2, ceil_mode=True)
        self.conv = cnnops.nn.Conv2d(8, 8, 1)
        self.bn = cnnops.nn.BNReLU(8)
        self.avg = cnnops.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gap = cnnops.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(x, residual=x)
        x = self.pool(x)
        x = CF.add_relu(self.conv(x), x)
        x = self.avg(self.bn(x))
        return self.fc(torch.flatten(self.gap(x), 1))


@conv_cores
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_matches_eager(backend, train):
    if backend == "triton" and triton_kernels.INTERPRET:
        pytest.skip("torch.compile cannot trace interpreted Triton kernels (torch runs them "
                    "directly, on fake tensors); test_compiled_fused_model_matches_eager "
                    "compiles them on a GPU")
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = Net().train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 9, 9)
    out_e, out_c = eager(x), compiled(x)
    assert_close(out_c, out_e)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for p_e, p_c in zip(eager.parameters(), compiled_model.parameters()):
        assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-3)
    for b_e, b_c in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e)


def test_inductor_eval():
    """The default backend (Inductor) compiles around the custom ops."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Net().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(compiled(x), model(x))


@needs_cuda
@on_gpu()
def test_compiled_fused_model_matches_eager(backend):
    """torch.compile(fullgraph=True) of a fused model on CUDA: same outputs and gradients."""
    plain, fused = twin_resnet(torch.float32, "contiguous", backend.device)
    x = backend.make((4, 3, 32, 32), torch.float32, grad=True)
    fused.train()
    compiled = torch.compile(fused, fullgraph=True)
    eager_out = fused(x)
    (eager_gx,) = torch.autograd.grad(eager_out.sum(), x)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    check(out, eager_out, torch.float32)
    check(gx, eager_gx, torch.float32, "grad of input")

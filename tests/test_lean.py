"""memory="lean" (cnnops.lean): the same results as the default mode, with no conv output kept
for the backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from conftest import assert_close, conv_cores, make_input


def _saved(fn):
    """fn()'s result and the storages its autograd graph saved: {data_ptr: (shape, nbytes)}."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _block_tensors(dtype, layout, conv_bias, affine, residual):
    torch.manual_seed(0)
    N, C, OC, H, W = 2, 3, 4, 7, 6
    x = make_input((N, C, H, W), layout, dtype, requires_grad=True)
    w = (torch.randn(OC, C, 3, 3, dtype=dtype) * 0.3).requires_grad_()
    cb = torch.randn(OC, dtype=dtype, requires_grad=True) if conv_bias else None
    bw = (torch.rand(OC, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bb = torch.randn(OC, dtype=dtype, requires_grad=True) if affine else None
    r = make_input((N, OC, 4, 6), layout, dtype, requires_grad=True) if residual else None
    return [x, w, cb, bw, bb, r]


@conv_cores
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "noresidual"])
@pytest.mark.parametrize("conv_bias,affine", [(False, True), (True, False)],
                         ids=["affine", "convbias-noaffine"])
def test_lean_conv_bn_relu_matches_fast(backend, dtype, layout, relu, residual, conv_bias,
                                        affine):
    """Outputs, every gradient and the running statistics of a training step, lean against
    fast; the lean step keeps no tensor of the output's shape but the output itself."""
    tensors = _block_tensors(dtype, layout, conv_bias, affine, residual)
    results = {}
    for memory in ("fast", "lean"):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in tensors]
        x, w, cb, bw, bb, r = leaves
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        out, saved = _saved(lambda: CF.conv_bn_relu(
            x, w, cb, bw, bb, rm, rv, stride=(2, 1), padding=1, training=True, momentum=0.3,
            relu=relu, residual=r, memory=memory))
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape))
        results[memory] = (out, [t.grad for t in leaves if t is not None], rm, rv)
        if backend != "reference":
            kept = {p for p, (shape, _) in saved.items() if shape == tuple(out.shape)}
            out_ptr = out.untyped_storage().data_ptr()
            if memory == "lean":  # the output, for the ReLU mask, and nothing else
                assert kept == ({out_ptr} if relu else set()), saved
            else:  # the conv output besides
                assert len(kept - {out_ptr}) == 1, saved
        assert out.is_contiguous(memory_format=torch.channels_last
                                 if layout == "channels_last" else torch.contiguous_format) \
            or backend == "reference"
    (out_f, grads_f, rm_f, rv_f), (out_l, grads_l, rm_l, rv_l) = results["fast"], results["lean"]
    assert_close(out_l, out_f)
    for a, b in zip(grads_l, grads_f):
        assert_close(a, b)
    assert_close(rm_l, rm_f)
    assert_close(rv_l, rv_f)


def test_memory_must_be_fast_or_lean():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="memory"):
        CF.conv_bn_relu(x, w, None, None, None, None, None, training=True, memory="small")
    with pytest.raises(ValueError, match="memory"):
        CF.bn_relu(x, None, None, None, None, training=True, memory=None)
    with pytest.raises(ValueError, match="memory"):
        cnnops.FusedConvBNReLU(3, 4, 3, memory="tiny")
    with pytest.raises(ValueError, match="memory"):
        cnnops.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), memory="")


class _Net(nn.Module):
    """conv-BN-ReLU, a residual conv-BN-add-ReLU, a pre-activation BN-ReLU and a pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        x = self.conv3(F.relu(self.bn3(x)))
        return self.fc(F.max_pool2d(x, 2).mean((2, 3)))


@conv_cores
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fuse_lean_matches_fuse(backend, layout):
    """cnnops.fuse(model, memory="lean") against cnnops.fuse(model): outputs, gradients and
    buffers over two training steps, the same state_dict keys, the sites reported lean."""
    torch.manual_seed(1)
    model = _Net()
    x = make_input((4, 3, 8, 8), layout)
    runs = {}
    for memory in ("fast", "lean"):
        fused = cnnops.fuse(model, memory=memory)
        opt = torch.optim.SGD(fused.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            out = fused(x)
            out.square().sum().backward()
            opt.step()
        runs[memory] = (out, {n: p.grad for n, p in fused.named_parameters()},
                        fused.state_dict(), cnnops.fusion_report(fused))
    (out_f, grads_f, state_f, report_f), (out_l, grads_l, state_l, report_l) = (
        runs["fast"], runs["lean"])
    assert_close(out_l, out_f)
    for name in grads_f:
        assert_close(grads_l[name], grads_f[name])
    assert list(state_l) == list(state_f) == list(model.state_dict())
    for name in state_f:  # (float states at their dtype's tolerance: see cnnops.lean)
        dtype = state_f[name].dtype if state_f[name].is_floating_point() else torch.float64
        assert_close(state_l[name].double(), state_f[name].double(), dtype=dtype)
    lean_sites = {r.name for r in report_l if "memory='lean'" in r.reason}
    assert lean_sites == {"bn1", "bn2"}  # the conv-BN sites; bn3 is a BN-ReLU
    assert {(r.name, r.status) for r in report_l} == {(r.name, r.status) for r in report_f}


def test_fuse_lean_keeps_costly_conv_outputs(monkeypatch):
    """fuse(memory="lean") recomputes a conv output only where that costs at most
    RECOMPUTE_MAX_MACS multiply-adds per element; the other sites run the default mode, and
    the report says which."""
    assert cnnops.lean.recomputes(nn.Conv2d(256, 256, 3))
    assert cnnops.lean.recomputes(nn.Conv2d(2048, 512, 1))
    assert not cnnops.lean.recomputes(nn.Conv2d(512, 512, 3))
    assert cnnops.lean.recompute_cost(nn.Conv2d(64, 128, (3, 5), groups=4)) == 16 * 15
    monkeypatch.setattr(cnnops.lean, "RECOMPUTE_MAX_MACS", 50)  # conv1: 27, conv2: 72
    torch.manual_seed(1)
    model = _Net()
    fused = cnnops.fuse(model, memory="lean")
    reasons = {r.name: r.reason for r in cnnops.fusion_report(fused)}
    assert "memory='lean'" in reasons["bn1"]
    assert "memory='lean'" not in reasons["bn2"]
    assert "keeps its conv output" in reasons["bn2"] and "72" in reasons["bn2"]
    # bn2's site keeps a conv output ([4, 8, 8, 8], like its own output): bn1's does not
    x = torch.randn(4, 3, 8, 8)
    _, lean_saved = _saved(lambda: fused(x).sum())
    _, fast_saved = _saved(lambda: cnnops.fuse(model)(x).sum())
    assert len(fast_saved) - len(lean_saved) == 1


def test_fused_module_lean():
    """FusedConvBNReLU(memory="lean") and from_modules(..., memory="lean") against the default,
    through one training step; eval mode is the same op in both."""
    torch.manual_seed(2)
    fast = cnnops.FusedConvBNReLU(3, 6, 3, padding=1)
    lean = cnnops.FusedConvBNReLU(3, 6, 3, padding=1, memory="lean")
    lean.load_state_dict(fast.state_dict())
    shared = cnnops.FusedConvBNReLU.from_modules(lean.conv, lean.bn, memory="lean")
    assert shared.memory == "lean" and "memory='lean'" in repr(shared)
    x = torch.randn(2, 3, 6, 6)
    outs = []
    for block in (fast, lean):
        out = block(x)
        out.sum().backward()
        outs.append((out, block.conv.weight.grad, block.bn.running_var.clone()))
    for a, b in zip(*outs):
        assert_close(a, b)
    lean.eval()
    fast.eval()
    assert_close(lean(x), fast(x))


def test_lean_under_torch_compile():
    """A lean fused model compiles (aot_eager) and gives the eager lean model's results."""
    torch.manual_seed(3)
    fused = cnnops.fuse(_Net(), memory="lean")
    x = torch.randn(2, 3, 8, 8)
    eager = fused(x)
    compiled = torch.compile(fused, backend="aot_eager")
    assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)

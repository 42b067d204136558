"""cnnops.models against their plain torch.nn twins (cnnops.models.plain: the same
definitions on torch.nn's layers, with d2l's / torchvision's forwards and module names).

For each model: parameter count and state_dict keys equal to the twin's (the
full-size constructors are compared on the meta device, without running them),
the twin's state_dict loads with strict=True, and with the same weights the eval
forward and one training step (outputs, loss, every parameter's gradient, the
input gradient, running statistics and num_batches_tracked) agree, on every CPU
backend, in float64. A dispatch-mode recorder checks that on the cpu backend the
forward and backward run the cnnops ops (conv_bn_relu, bn_relu, add_relu, pools)
and no aten convolution / batch-norm / pooling kernel.
"""
import collections
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
from cnnops import triton_kernels
import cnnops.models as M
# the unfused torch.nn definitions shared with the benchmarks and the main job
import cnnops.models.plain as P
from cnnops.models.plain import TvBasicBlock, TvBottleneck, TvDenseNet, TvResNet, twin_googlenet
from conftest import OpRecorder


# ---------------------------------------------------------------------------
# The cases

Case = collections.namedtuple("Case", "make twin shape ops")

# ops: how many times each cnnops op runs in one forward on the cpu backend; the
# same number of its backward runs in the backward pass; nothing else from cnnops.
CASES = {
    "lenet": Case(lambda: M.lenet(), lambda: P.lenet(), (4, 1, 28, 28),
                  {"conv2d": 2, "avg_pool2d": 2}),
    # the full conv stack needs 224x224 input; the hidden Linear layers are narrowed
    "alexnet": Case(lambda: M.alexnet(hidden_features=32), lambda: P.alexnet(hidden_features=32),
                    (1, 1, 224, 224), {"conv2d_relu": 5, "max_pool2d": 3}),
    "vgg11": Case(lambda: M.vgg11(width_divisor=16, hidden_features=32, input_size=32),
                  lambda: P.vgg11(width_divisor=16, hidden_features=32, input_size=32),
                  (2, 1, 32, 32), {"conv2d_relu": 8, "max_pool2d": 5}),
    "nin": Case(lambda: M.nin(), lambda: P.nin(), (2, 1, 67, 67),
                {"conv2d_relu": 12, "max_pool2d": 3, "adaptive_avg_pool2d": 1}),
    # 48x48 leaves b5 a 2x2 map (32x32 would leave 1x1: see test_googlenet_tiny_input)
    "googlenet": Case(lambda: M.googlenet(), lambda: twin_googlenet(), (2, 1, 48, 48),
                      # stem convs + 6 per Inception, each conv -> ReLU fused
                      {"conv2d_relu": 3 + 9 * 6, "max_pool2d": 4 + 9,
                       "adaptive_avg_pool2d": 1}),
    "resnet18": Case(lambda: M.resnet18(num_classes=10),
                     lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=10),
                     (2, 3, 32, 32),
                     {"conv_bn_relu": 1 + 8 * 2 + 3, "max_pool2d": 1, "adaptive_avg_pool2d": 1}),
    "resnet34": Case(lambda: M.resnet34(num_classes=10, width=16),
                     lambda: TvResNet(TvBasicBlock, [3, 4, 6, 3], num_classes=10, width=16),
                     (2, 3, 32, 32),
                     {"conv_bn_relu": 1 + 16 * 2 + 3, "max_pool2d": 1, "adaptive_avg_pool2d": 1}),
    "resnet50": Case(lambda: M.resnet50(num_classes=10, layers=(1, 2, 1, 1), width=16),
                     lambda: TvResNet(TvBottleneck, [1, 2, 1, 1], num_classes=10, width=16),
                     (2, 3, 32, 32),
                     {"conv_bn_relu": 1 + 5 * 3 + 4, "max_pool2d": 1, "adaptive_avg_pool2d": 1}),
    "densenet121": Case(lambda: M.densenet121(num_classes=10, growth_rate=8,
                                              block_config=(2, 3, 2, 2), num_init_features=16,
                                              bn_size=2),
                        lambda: TvDenseNet(8, (2, 3, 2, 2), 16, 2, num_classes=10),
                        (2, 3, 32, 32),
                        # stem + per layer (bn_relu, conv_bn_relu, conv2d) + per transition
                        # (bn_relu, conv2d, avg_pool2d) + norm5
                        {"conv_bn_relu": 1 + 9, "bn_relu": 9 + 3 + 1, "conv2d": 9 + 3,
                         "avg_pool2d": 3, "max_pool2d": 1, "adaptive_avg_pool2d": 1}),
    "resnet_classifier": Case(lambda: M.resnet_classifier(width=16),
                              lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=11,
                                               width=16, bias=True),
                              (2, 3, 32, 32),
                              {"conv_bn_relu": 20, "max_pool2d": 1, "adaptive_avg_pool2d": 1}),
    "inception_net": Case(lambda: M.inception_net(), lambda: P.inception_net(), (4, 1, 28, 28),
                          {"conv2d": 2 + 2 * 7, "max_pool2d": 2, "avg_pool2d": 2}),
    "residual_net": Case(lambda: M.residual_net(), lambda: P.residual_net(), (4, 1, 28, 28),
                         {"conv2d": 2, "conv2d_relu": 4, "max_pool2d": 2}),
}

# Full-size constructors and their twins (compared on the meta device, not run).
FULL = {
    "lenet": (M.lenet, P.lenet),
    "alexnet": (M.alexnet, P.alexnet),
    "vgg11": (M.vgg11, P.vgg11),
    "nin": (M.nin, P.nin),
    "googlenet": (M.googlenet, twin_googlenet),
    "resnet18": (M.resnet18, lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2])),
    "resnet34": (M.resnet34, lambda: TvResNet(TvBasicBlock, [3, 4, 6, 3])),
    "resnet50": (M.resnet50, lambda: TvResNet(TvBottleneck, [3, 4, 6, 3])),
    "densenet121": (M.densenet121, lambda: TvDenseNet()),
    "resnet_classifier": (M.resnet_classifier,
                          lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=11, bias=True)),
    "inception_net": (M.inception_net, P.inception_net),
    "residual_net": (M.residual_net, P.residual_net),
}

# Independent counts: d2l's figures for LeNet/AlexNet, torchvision's for ResNet/DenseNet.
KNOWN_PARAMETERS = {
    "lenet": 61_706,
    "alexnet": 46_764_746,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
}

# MODELS' example input -> output shape (checked by running the model; densenet121 and
# the deeper ResNets at 224x224 are slow on the reference CPU kernels, so those run
# at the example's batch and channels but a smaller side).
RUN_SIDE = {"densenet121": 64, "resnet34": 64, "resnet50": 64}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model):
    """Non-trivial BN affine parameters and running statistics, so eval mode tests something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(3)


def make_pair(case, dtype=torch.float64):
    torch.manual_seed(0)
    twin = case.twin()
    randomize_bn(twin)
    model = case.make()
    result = model.load_state_dict(twin.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype), twin.to(dtype)


def close(actual, expected, name, rtol=1e-7):
    """max |actual - expected| <= rtol * max(1, max |expected|): float64, relative to the
    tensor's scale (deep nets, large logits). Cheaper than torch.testing.assert_close on
    the 10M-element gradients."""
    assert actual.shape == expected.shape, "%s: shape %s != %s" % (name, tuple(actual.shape),
                                                                   tuple(expected.shape))
    assert actual.dtype == expected.dtype, "%s: dtype %s != %s" % (name, actual.dtype,
                                                                   expected.dtype)
    if expected.numel() == 0:
        return
    actual, expected = actual.detach(), expected.detach()
    bound = rtol * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs_().max().item()
    assert err <= bound, "%s: max |diff| = %.3g > %.3g" % (name, err, bound)  # NaN fails too


# ---------------------------------------------------------------------------
# Structure: parameter counts and state_dict keys

def test_models_registry():
    assert set(M.MODELS) == set(FULL)
    for name, (fn, shape) in M.MODELS.items():
        assert callable(fn) and len(shape) == 4, name
        assert getattr(M, name) is fn


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_structure_matches_twin(name):
    make, make_twin = FULL[name]
    with torch.device("meta"):
        model, twin = make(), make_twin()
    assert n_params(model) == n_params(twin)
    if name in KNOWN_PARAMETERS:
        assert n_params(model) == KNOWN_PARAMETERS[name]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert list(got) == list(want)  # same keys, same order
    assert got == want


def test_torchvision_key_names():
    with torch.device("meta"):
        r50, dn = M.resnet50(), M.densenet121()
        rc = M.resnet_classifier()
    keys = set(r50.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.num_batches_tracked",
              "layer4.2.conv3.weight", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert k in keys, k
    assert "conv1.bias" not in keys
    keys = set(dn.state_dict())
    for k in ("features.conv0.weight", "features.norm0.running_mean",
              "features.denseblock1.denselayer1.norm1.weight",
              "features.denseblock1.denselayer1.conv1.weight",
              "features.denseblock1.denselayer1.norm2.weight",
              "features.denseblock1.denselayer1.conv2.weight",
              "features.denseblock4.denselayer16.conv2.weight",
              "features.transition1.norm.weight", "features.transition1.conv.weight",
              "features.transition3.conv.weight", "features.norm5.running_var",
              "classifier.weight", "classifier.bias"):
        assert k in keys, k
    assert "features.transition4.conv.weight" not in keys
    keys = set(rc.state_dict())
    for k in ("conv1.bias", "layer1.0.conv2.bias", "layer2.0.downsample.0.bias", "fc.bias"):
        assert k in keys, k
    assert rc.fc.out_features == 11


@pytest.mark.parametrize("name", ["lenet", "alexnet", "vgg11", "nin", "googlenet",
                                  "inception_net", "residual_net"])
def test_in_channels_and_num_classes(name):
    with torch.device("meta"):
        model = M.MODELS[name][0](num_classes=7, in_channels=3)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    assert (last.out_features if isinstance(last, nn.Linear) else last.out_channels) == 7


def test_small_configs_change_structure():
    with torch.device("meta"):
        assert n_params(M.resnet18(layers=(1, 1, 1, 1))) < n_params(M.resnet18())
        assert len(M.densenet121(block_config=(2, 2)).features.denseblock2) == 2
        assert n_params(M.vgg11(conv_arch=((1, 8), (1, 16)), input_size=8, hidden_features=4)) \
            == (8 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 2 * 2 * 4 + 4) + (4 * 4 + 4) + (4 * 10 + 10)


# ---------------------------------------------------------------------------
# Numerics: the twin's weights, eval forward and one training step

# Interpreted Triton needs minutes for one step of a full-size network; the seed networks
# cover every fused op on the triton backend here, and test_fuse.py's GPU cases run a ResNet
# on it on a GPU.
TRITON_INTERPRETED_MODELS = {"lenet", "residual_net", "inception_net"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_step_matches_twin(name, backend):
    if backend == "triton" and triton_kernels.INTERPRET and name not in TRITON_INTERPRETED_MODELS:
        pytest.skip("full-size network: too slow for Triton's interpreter")
    case = CASES[name]
    model, twin = make_pair(case)
    assert n_params(model) == n_params(twin)
    torch.manual_seed(2)
    x = torch.randn(case.shape, dtype=torch.float64)
    target = None

    results = []
    for net in (twin, model):
        net.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same dropout masks
        out = net(xi)
        if target is None:
            target = torch.randint(0, out.shape[1], (out.shape[0],),
                                   generator=torch.Generator().manual_seed(7))
        loss = F.cross_entropy(out, target)
        loss.backward()
        results.append((out, loss, xi.grad, net))
    (out_t, loss_t, gx_t, _), (out_m, loss_m, gx_m, _) = results
    close(out_m, out_t, "train output")
    close(loss_m, loss_t, "loss")
    close(gx_m, gx_t, "input grad")
    twin_params = dict(twin.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        close(p.grad, twin_params[pname].grad, "grad of " + pname)
    twin_state = twin.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == twin_state[key].item() == 4, key
        else:
            close(value, twin_state[key], key)

    model.eval()
    twin.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x2 = torch.randn(case.shape, dtype=torch.float64)
    with torch.no_grad():
        close(model(x2), twin(x2), "eval output")
    for key, value in model.state_dict().items():  # eval leaves the statistics alone
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("core", ["im2col", "onednn"])
@pytest.mark.parametrize("name,shape", [("resnet18", (4, 3, 64, 64)),
                                        ("densenet121", (4, 3, 64, 64)),
                                        ("residual_net", (4, 1, 28, 28))])
def test_float32_matches_twin(name, shape, core):
    """float32 on the cpu backend, each convolution core, tolerance relative to the output
    scale. (64x64 input: train-mode BN over only 2 values per channel, as at 32x32, amplifies
    float32 rounding.)"""
    model, twin = make_pair(CASES[name], torch.float32)
    torch.manual_seed(4)
    x = torch.randn(shape)
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(core):
        for mode in ("train", "eval"):
            model.train(mode == "train")
            twin.train(mode == "train")
            with torch.no_grad():
                expected, actual = twin(x), model(x)
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def _cheap_init_(model):
    """Deterministic U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights for a model built on meta."""
    g = torch.Generator().manual_seed(5)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g)
    return model


@pytest.mark.parametrize("name", ["alexnet", "vgg11"])
def test_full_size_eval_forward_matches_twin(name):
    """The real 1x224x224 input through the full-size model, eval mode, float32."""
    make, make_twin = FULL[name]
    with torch.device("meta"):
        model, twin = make(), make_twin()
    _cheap_init_(model).eval()
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)  # shares the weights
    twin.eval()
    x = torch.randn(M.MODELS[name][1], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = twin(x)
        with cnnops.use_backend("cpu"):
            actual = model(x)
    assert actual.shape == (1, 10)
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# alexnet and vgg11 run their example input in test_full_size_eval_forward_matches_twin
@pytest.mark.parametrize("name", sorted(set(FULL) - {"alexnet", "vgg11"}))
def test_example_input_output_shape(name):
    fn, shape = M.MODELS[name]
    shape = shape[:2] + (RUN_SIDE[name],) * 2 if name in RUN_SIDE else shape
    torch.manual_seed(0)
    model = fn().eval()
    with torch.no_grad(), cnnops.use_backend("cpu"):
        out = model(torch.randn(shape))
    classes = {"resnet_classifier": 11}.get(name, 1000 if name.startswith(("resnet", "dense"))
                                            else 10)
    assert tuple(out.shape) == (1, classes)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# The fused ops are the ones that run

CNNOPS_OPS = ("conv2d", "conv2d_relu", "batch_norm", "bn_relu", "conv_bn_relu", "max_pool2d",
              "avg_pool2d", "adaptive_avg_pool2d", "add_relu")
# The backward ops each forward op's autograd formula calls (default: "<op>_backward").
BACKWARD_OPS = {"conv2d_relu": ("add_relu_backward", "conv2d_backward")}
# aten kernels that would mean a layer bypassed cnnops
ATEN_FORBIDDEN = ("convolution", "_convolution", "conv2d", "mkldnn_convolution",
                  "convolution_backward", "batch_norm", "native_batch_norm",
                  "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                  "native_batch_norm_backward", "max_pool2d", "max_pool2d_with_indices",
                  "max_pool2d_with_indices_backward", "avg_pool2d", "avg_pool2d_backward",
                  "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "adaptive_avg_pool2d")


def _cnnops_calls(calls):
    return {k[len("cnnops::"):]: v for k, v in calls.items() if k.startswith("cnnops::")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_use_fused_ops(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make()
    x = torch.randn(case.shape, requires_grad=True)
    expected_backward = collections.Counter()
    for op, n in case.ops.items():
        for backward_op in BACKWARD_OPS.get(op, (op + "_backward",)):
            expected_backward[backward_op] += n
    recorder = OpRecorder()
    with cnnops.use_backend("cpu"), recorder:
        out = model(x)
        forward = recorder.take()
        out.sum().backward()
        backward = recorder.take()
        model.eval()
        with torch.no_grad():
            model(x)
        inference = recorder.take()
    # Each training-mode BN call updates its running statistics with one op call.
    bn_calls = sum(case.ops.get(op, 0) for op in ("batch_norm", "bn_relu", "conv_bn_relu"))
    forward_ops = dict(case.ops, **({"update_running_stats": bn_calls} if bn_calls else {}))
    # inference outside autograd: each conv-BN site runs the op without statistics
    inference_ops = {("conv_bn_relu_inference" if op == "conv_bn_relu" else op): n
                     for op, n in case.ops.items()}
    for calls, want in ((forward, forward_ops), (backward, expected_backward),
                        (inference, inference_ops)):
        assert _cnnops_calls(calls) == dict(want)
        bypassed = [k for k in calls if k.startswith("aten::")
                    and k[len("aten::"):] in ATEN_FORBIDDEN]
        assert not bypassed, bypassed
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        # every BN sits in a fused op: no plain batch_norm, at most one BN per fused call
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert case.ops.get("conv_bn_relu", 0) + case.ops.get("bn_relu", 0) == n_bn
        assert "batch_norm" not in case.ops
    # every convolution runs in a cnnops op: fused with its BN or ReLU, or as a plain conv2d
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(case.ops.get(op, 0) for op in ("conv2d", "conv2d_relu", "conv_bn_relu")) == n_conv


_TINY_GOOGLENET = """
import torch, cnnops, cnnops.models
torch.manual_seed(0)
model = cnnops.models.googlenet().eval()
with torch.no_grad(), cnnops.use_backend("cpu"):
    out = model(torch.randn(2, 1, 32, 32))
assert out.shape == (2, 10) and torch.isfinite(out).all()
"""


def test_googlenet_tiny_input():
    """googlenet on 32x32 input: b5's 5x5 pad-2 convolutions see a 1x1 map (padding wider
    than the output row). Run in a child process so a crash fails the test, not the run."""
    proc = subprocess.run([sys.executable, "-c", _TINY_GOOGLENET], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

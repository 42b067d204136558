"""cnnops.fuse on models written the way users write them.

The usual structures: torchvision's ResNet (BasicBlock and Bottleneck, also with
FrozenBatchNorm2d and with biased convolutions as the resnet_classifier seed) and
DenseNet (pre-activation dense layers) as cnnops.models.plain writes them out;
independent copies of others (Inception's BasicConv2d (eps=1e-3) with ``if
self.training`` aux branches, VGG-BN, MobileNetV2 inverted residuals with ReLU6,
depthwise nets, a pre-activation ResNet, BN-add-ReLU, timm's BatchNormAct2d /
ConvNormAct in RegNet- and DenseNet-style nets); a model full of corner cases, one
that cannot be traced as a whole, one whose forwards write into their buffers, and
the seed networks (plain torch.nn and cnnops.models). For each: the report
(BNs fused, sites skipped and why, every BN present); fusing changes nothing;
state_dict keys and values unchanged and strict loading both ways; outputs,
every parameter's gradient, the input gradient, running statistics and
num_batches_tracked equal to the original after a step in train and in eval
mode (float64, every CPU backend); the fused cnnops ops actually run;
deepcopy, torch.save/torch.load, .to(); torch.compile(backend="aot_eager").
"""
import collections
import copy
import io
import pickle
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.models as M
from cnnops.fuse import FusionRecord, restore_layout, to_channels_last
from conftest import OpRecorder, assert_close, make_input
from cnnops.models import plain


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is faster, and far faster on a busy
    2-core machine than threads that spin waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# torchvision-style ResNet (BasicBlock / Bottleneck, norm_layer, conv bias)

class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: BN with fixed statistics, all buffers."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def resnet(block, layers, num_classes=5, width=8, **kwargs):
    """cnnops.models.plain's torchvision ResNet (its norm_layer and bias options), small."""
    return plain.TvResNet(block, layers, num_classes=num_classes, width=width, **kwargs)


# ---------------------------------------------------------------------------
# torchvision-style DenseNet (pre-activation dense layers, F.relu at the end)

def densenet(drop_rate=0.0):
    """cnnops.models.plain's torchvision DenseNet, small."""
    return plain.TvDenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                            num_classes=5, drop_rate=drop_rate)


# ---------------------------------------------------------------------------
# Inception-style (torchvision's BasicConv2d, eps=1e-3, aux head only in training)

InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 4, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 3, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(3, 4, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 4, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(4, 6, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(6, 6, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def _forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return [branch1x1, branch5x5, branch3x3dbl, branch_pool]

    def forward(self, x):
        return torch.cat(self._forward(x), 1)


class InceptionAux(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv0 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(torch.flatten(x, 1))


class Inception(nn.Module):
    def __init__(self, num_classes=5, aux_logits=True, transform_input=True):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 8, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(8, 8, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.Mixed_5b = InceptionA(8, pool_features=4)
        self.AuxLogits = InceptionAux(18, num_classes) if aux_logits else None
        self.Mixed_5c = InceptionA(18, pool_features=4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.2)
        self.fc = nn.Linear(18, num_classes)

    def _transform_input(self, x):
        if self.transform_input:
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def _forward(self, x):
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.maxpool1(x)
        x = self.Mixed_5b(x)
        aux = None
        if self.AuxLogits is not None:
            if self.training:
                aux = self.AuxLogits(x)
        x = self.Mixed_5c(x)
        x = F.max_pool2d(x, kernel_size=2, stride=1)
        x = self.avgpool(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        return self.fc(x), aux

    def eager_outputs(self, x, aux):
        if self.training and self.aux_logits:
            return InceptionOutputs(x, aux)
        return x

    def forward(self, x):
        x = self._transform_input(x)
        x, aux = self._forward(x)
        if torch.jit.is_scripting():
            return InceptionOutputs(x, aux)
        return self.eager_outputs(x, aux)


# ---------------------------------------------------------------------------
# VGG-BN (torchvision's make_layers with batch_norm=True)

def vgg_bn(cfg=(8, "M", 16, 16, "M"), num_classes=5):
    layers, in_channels = [], 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            in_channels = v
    return _VGG(nn.Sequential(*layers), in_channels, num_classes)


class _VGG(nn.Module):
    def __init__(self, features, channels, num_classes):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4, 16), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MobileNetV2 (inverted residuals, ReLU6, depthwise convolutions)

class ConvBNActivation(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1,
                 activation_layer=nn.ReLU6):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_planes),
            activation_layer(inplace=True))
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, activation_layer=nn.ReLU6):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(inp, hidden_dim, kernel_size=1,
                                           activation_layer=activation_layer))
        layers.extend([
            ConvBNActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                             activation_layer=activation_layer),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup)])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=5, activation_layer=nn.ReLU6):
        super().__init__()
        settings = [(1, 8, 1, 1), (4, 8, 2, 1), (4, 12, 1, 2)]
        features = [ConvBNActivation(3, 8, stride=2, activation_layer=activation_layer)]
        channels = 8
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t,
                                                 activation_layer))
                channels = c
        features.append(ConvBNActivation(channels, 16, kernel_size=1,
                                         activation_layer=activation_layer))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# Depthwise-separable net written with functional calls (F.relu, torch.add, .relu())

class DepthwiseSeparable(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn_dw(self.dw(x)))
        y = self.bn_pw(self.pw(y))
        return torch.add(y, x).relu()


class DepthwiseNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8, momentum=None)  # cumulative moving average
        self.blocks = nn.Sequential(DepthwiseSeparable(8), DepthwiseSeparable(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = F.avg_pool2d(x, 2)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---------------------------------------------------------------------------
# Pre-activation ResNet (BN -> ReLU -> conv) and BN -> (+ identity) -> ReLU

class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layer1(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class BNAddReLUNet(nn.Module):
    """relu(bn(cat(a, b)) + x): a BN whose input is not a conv output, with a residual."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_x = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        identity = self.conv_x(x)
        y = torch.cat([self.conv_a(x), self.conv_b(x)], 1)
        out = self.bn(y)
        out = out + identity
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


# ---------------------------------------------------------------------------
# Corner cases, each named by what it tests

class Quirks(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_twice = nn.Conv2d(3, 8, 3, padding=1, bias=False)        # output used twice
        self.bn_twice = nn.BatchNorm2d(8)
        self.conv_sync = nn.Conv2d(8, 8, 1)
        self.bn_sync = nn.SyncBatchNorm(8)                                 # local: 1 process
        self.conv_reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.bn_reflect = nn.BatchNorm2d(8, track_running_stats=False)     # batch stats always
        self.conv_leaky = nn.Conv2d(8, 8, 1)
        self.bn_leaky = nn.BatchNorm2d(8, affine=False)
        self.leaky = nn.LeakyReLU(0.1)                                     # no kernel
        self.conv_silu = nn.Conv2d(8, 8, 1)
        self.conv_relu = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.frozen = FrozenBatchNorm2d(8)
        self.conv_u = nn.Conv2d(8, 8, 1)
        self.conv_v = nn.Conv2d(8, 8, 1)
        self.conv_m = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_m = nn.BatchNorm2d(8)                                      # output mutated later
        self.bn_used = nn.BatchNorm2d(8)                                   # output used twice
        self.gmp = nn.AdaptiveMaxPool2d(1)                                 # no kernel
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        c = self.conv_twice(x)
        y = F.relu(self.bn_twice(c), inplace=True) + c
        y = torch.relu(self.bn_sync(self.conv_sync(y)))
        y = F.relu(self.bn_reflect(self.conv_reflect(y)))
        y = self.leaky(self.bn_leaky(self.conv_leaky(y)))
        y = F.silu(self.conv_silu(y))
        y = torch.relu(self.conv_relu(y))
        y = F.relu(self.frozen(y))
        y = torch.relu(y + F.adaptive_avg_pool2d(y, 1))                    # broadcasting add
        u = self.conv_u(y)
        keep = u
        u += self.conv_v(y)                                                # writes into keep
        y = torch.relu(u) * keep
        m = self.bn_m(self.conv_m(y))
        m.mul_(0.5)
        b = self.bn_used(m)
        y = F.relu(b) + b.sigmoid()
        y = torch.add(y, m).relu_()
        return self.fc(torch.cat([self.gmp(y).flatten(1), y.mean((2, 3))], 1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CheckedBlock(nn.Module):
    """Its own forward cannot be traced (an assert on a shape); its children can."""

    def __init__(self, c):
        super().__init__()
        self.body = ConvBNReLU(c, c)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        assert x.shape[1] == self.body[0].in_channels, "channels"
        return self.pool(self.body(x))


class Middle(nn.Module):
    """Traceable, except for the CheckedBlock inside (kept as a call, fused on its own)."""

    def __init__(self, c):
        super().__init__()
        self.pre = ConvBNReLU(c, c)
        self.checked = CheckedBlock(c)

    def forward(self, x):
        if torch.jit.is_scripting():
            return x
        return self.checked(self.pre(x))


class Untraceable(nn.Module):
    """Data-dependent control flow in the root's own forward."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 8)
        self.middle = Middle(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 1.0
        x = self.middle(x)
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# timm-style: BatchNormAct2d (a BatchNorm2d carrying its own drop and activation, the norm
# layer of most timm CNNs) and ConvNormAct. Written after timm.layers' norm_act.py and
# conv_bn_act.py (timm itself needs torchvision, which cannot be a test dependency here).

class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: BatchNorm2d (same state_dict), then ``self.drop``, then
    ``self.act``. Its forward redoes BatchNorm2d's in Python, counting the batch with
    ``self.num_batches_tracked.add_(1)`` on the real buffer."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = None
        if apply_act and act_layer is not None:
            kwargs = {"inplace": inplace, **(act_kwargs or {})}
            try:
                act = act_layer(**kwargs)
            except TypeError:              # an activation without an inplace argument
                kwargs.pop("inplace")
                act = act_layer(**kwargs)
        self.act = nn.Identity() if act is None else act

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias,
                         batch_stats, factor, self.eps)
        x = self.drop(x)
        return self.act(x)


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct: ``.conv`` then ``.bn`` (a BatchNormAct2d), ``.aa`` None."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, dilation=1, groups=1,
                 bias=False, apply_act=True, act_layer=nn.ReLU, drop_layer=None,
                 norm_kwargs=None, act_kwargs=None):
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2   # timm's get_padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.bn = BatchNormAct2d(out_channels, apply_act=apply_act, act_layer=act_layer,
                                 act_kwargs=act_kwargs, drop_layer=drop_layer,
                                 **(norm_kwargs or {}))
        self.aa = None

    @property
    def out_channels(self):
        return self.conv.out_channels

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


class RegNetBottleneck(nn.Module):
    """timm.models.regnet.Bottleneck without SE: the last ConvNormAct has no activation and is
    added to the shortcut (a ConvNormAct without activation where the shape changes)."""

    def __init__(self, in_chs, out_chs, stride=1, group_size=4, norm_kwargs=None):
        super().__init__()
        cargs = dict(norm_kwargs=norm_kwargs)
        self.conv1 = ConvNormAct(in_chs, out_chs, 1, **cargs)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, stride=stride, groups=out_chs // group_size,
                                 **cargs)
        self.se = nn.Identity()
        self.conv3 = ConvNormAct(out_chs, out_chs, 1, apply_act=False, **cargs)
        self.act3 = nn.ReLU()
        self.downsample = (ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False, **cargs)
                           if stride != 1 or in_chs != out_chs else nn.Identity())
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        return self.act3(x)


class RegNetLike(nn.Module):
    def __init__(self, norm_kwargs=None, num_classes=5):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2, norm_kwargs=norm_kwargs)
        self.s1 = nn.Sequential(RegNetBottleneck(8, 16, 2, norm_kwargs=norm_kwargs),
                                RegNetBottleneck(16, 16, norm_kwargs=norm_kwargs))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.s1(self.stem(x)).mean((2, 3)))


class TimmDenseLayer(nn.Module):
    """timm.models.densenet.DenseLayer: pre-activation BatchNormAct2d (ReLU) before each conv."""

    def __init__(self, num_input_features, growth_rate, bn_size):
        super().__init__()
        self.norm1 = BatchNormAct2d(num_input_features)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = BatchNormAct2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        prev_features = [x] if isinstance(x, torch.Tensor) else x
        bottleneck_output = self.conv1(self.norm1(torch.cat(prev_features, 1)))
        return self.conv2(self.norm2(bottleneck_output))


class TimmDenseNet(nn.Module):
    def __init__(self, growth_rate=4, num_layers=2, num_init_features=8, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, 3, stride=2, padding=1, bias=False)),
            ("norm0", BatchNormAct2d(num_init_features)),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        self.layers = nn.ModuleList(TimmDenseLayer(num_init_features + i * growth_rate,
                                                   growth_rate, 2) for i in range(num_layers))
        num_features = num_init_features + num_layers * growth_rate
        self.transition = nn.Sequential(OrderedDict([
            ("norm", BatchNormAct2d(num_features)),
            ("conv", nn.Conv2d(num_features, num_features, 1, bias=False)),
            ("pool", nn.AvgPool2d(2))]))
        self.norm5 = BatchNormAct2d(num_features)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x):
        features = [self.features(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.norm5(self.transition(torch.cat(features, 1)))
        return self.head(x.mean((2, 3)))


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own around BatchNorm2d's."""

    def forward(self, x):
        return super().forward(x) * 0.5


class TimmMixed(nn.Module):
    """BatchNormAct2d in every configuration: fused (ReLU in place or not, Identity; after a
    conv or alone; momentum=None, track_running_stats=False, affine=False) or skipped (SiLU,
    LeakyReLU, a dropout, a conv output used twice), a BatchNorm2d subclass of its own."""

    def __init__(self):
        super().__init__()
        self.relu_inplace = ConvNormAct(3, 8, 3)
        self.relu = ConvNormAct(8, 8, 3, act_kwargs={"inplace": False},
                                norm_kwargs={"momentum": None})
        self.linear = ConvNormAct(8, 8, 1, apply_act=False, norm_kwargs={"affine": False})
        self.no_stats = ConvNormAct(8, 8, 3, norm_kwargs={"track_running_stats": False})
        self.silu = ConvNormAct(8, 8, 1, act_layer=nn.SiLU)
        self.leaky = ConvNormAct(8, 8, 3, act_layer=nn.LeakyReLU)
        self.dropped = ConvNormAct(8, 8, 1, drop_layer=lambda: nn.Dropout(0.3))
        self.conv_twice = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_twice = BatchNormAct2d(8, eps=1e-3)
        self.alone_relu = BatchNormAct2d(8, inplace=False)
        self.alone_linear = BatchNormAct2d(8, apply_act=False, momentum=None)
        self.scaled = ScaledBN(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu_inplace(x)
        x = self.relu(x)
        x = self.linear(x) + x
        x = self.leaky(self.silu(self.no_stats(x)))
        x = self.dropped(x)
        c = self.conv_twice(x)
        x = self.bn_twice(c) + c
        x = self.alone_linear(self.alone_relu(x))
        x = self.scaled(x)
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Forwards that write into a module's own tensors while tracing

class CountsBatches(nn.Module):
    """Counts its training batches in a buffer. Traced, ``self.seen`` is the real buffer: the
    count would run once at fuse time and never again. Kept as it is, fused inside."""

    def __init__(self):
        super().__init__()
        self.body = ConvBNReLU(3, 4)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.seen += 1
        return self.body(x)


class DriftingOffset(nn.Module):
    """A buffer updated in place in every mode (an exponential average of its own value)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        self.offset.mul_(0.9).add_(0.2)
        return x + self.offset


class UntracedCaller(nn.Module):
    """Data-dependent control flow around its BNs: they run as they are, and are reported."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_act = BatchNormAct2d(4)
        self.bn_silu = BatchNormAct2d(4, act_layer=nn.SiLU)
        self.block = ConvNormAct(4, 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if x.sum() > 0:
            x = self.bn_act(x)
        return self.block(self.bn_silu(x)).mean((2, 3))


class WritesBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = CountsBatches()
        self.smooth = DriftingOffset()
        self.head = ConvBNReLU(4, 4)

    def forward(self, x):
        return self.head(self.smooth(self.counter(x)))


# ---------------------------------------------------------------------------
# Cases: constructor, input shape, expected report

Case = collections.namedtuple("Case", "make shape bn_fused skipped fullgraph")
# skipped: {site name: substring of the reason}


def _mobilenet_skipped():
    names = ["features.0.2", "features.1.conv.0.2", "features.2.conv.0.2", "features.2.conv.1.2",
             "features.3.conv.0.2", "features.3.conv.1.2", "features.4.conv.0.2",
             "features.4.conv.1.2", "features.5.2"]
    return {n: "ReLU6 has no cnnops kernel" for n in names}


CASES = {
    "resnet_basic": Case(lambda: resnet(plain.TvBasicBlock, [1, 1, 1, 1]), (2, 3, 32, 32), 12,
                         {}, True),
    "resnet_bottleneck": Case(lambda: resnet(plain.TvBottleneck, [2, 1, 1, 1], width=4),
                              (2, 3, 32, 32), 20, {}, True),
    "resnet_frozen_bn": Case(lambda: resnet(plain.TvBasicBlock, [1, 1, 1, 1],
                                            norm_layer=FrozenBatchNorm2d), (2, 3, 32, 32), 12, {},
                             True),
    # the resnet_classifier seed as users write it: biased convs, out += identity, ReLU(inplace)
    "seed_resnet_plain": Case(lambda: resnet(plain.TvBasicBlock, [1, 1, 1, 1], num_classes=11,
                                             bias=True), (2, 3, 32, 32), 12, {}, True),
    "densenet": Case(lambda: densenet(), (2, 3, 32, 32), 11, {}, True),
    "densenet_dropout": Case(lambda: densenet(drop_rate=0.2), (2, 3, 32, 32), 11, {}, True),
    "inception": Case(lambda: Inception(), (2, 3, 21, 21), 17, {}, True),
    "vgg_bn": Case(lambda: vgg_bn(), (2, 3, 16, 16), 3, {}, True),
    "mobilenet_v2": Case(lambda: MobileNetV2(), (2, 3, 16, 16), 13, _mobilenet_skipped(), True),
    "mobilenet_relu": Case(lambda: MobileNetV2(activation_layer=nn.ReLU), (2, 3, 16, 16), 13, {},
                           True),
    "depthwise": Case(lambda: DepthwiseNet(), (2, 3, 16, 16), 5, {}, True),
    "preact_resnet": Case(lambda: PreActResNet(), (2, 3, 8, 8), 5,
                          {"conv1": "conv output used 2 times"}, True),
    "bn_add_relu": Case(lambda: BNAddReLUNet(), (2, 3, 8, 8), 1, {}, True),
    "quirks": Case(lambda: Quirks(), (2, 3, 8, 8), 5, {
        "conv_twice": "conv output used 2 times",
        "leaky": "LeakyReLU has no cnnops kernel",
        "silu": "silu has no cnnops kernel",
        "iadd": "in-place add writes into conv_u",
        "bn_m": "modified in place later",
        "bn_used": "BN output used 2 times",
        "sigmoid": "sigmoid has no cnnops kernel",
        "gmp": "no cnnops kernel for AdaptiveMaxPool2d",
    }, True),
    "untraceable": Case(lambda: Untraceable(), (2, 3, 8, 8), 3, {
        "(root)": "forward cannot be traced", "middle.checked": "forward cannot be traced"},
                        False),
    "seed_residual_plain": Case(lambda: plain.residual_net(), (2, 1, 28, 28), 0, {}, True),
    "seed_inception_plain": Case(lambda: plain.inception_net(), (2, 1, 28, 28), 0, {}, True),
    "seed_resnet_classifier": Case(lambda: M.resnet_classifier(layers=(1, 1, 1, 1), width=8),
                                   (2, 3, 32, 32), 12, {}, True),
    "seed_residual_net": Case(lambda: M.residual_net(), (2, 1, 28, 28), 0, {}, True),
    "seed_inception_net": Case(lambda: M.inception_net(), (2, 1, 28, 28), 0, {}, True),
    "timm_regnet": Case(lambda: RegNetLike(), (2, 3, 16, 16), 8, {}, True),
    "timm_regnet_cma": Case(lambda: RegNetLike(norm_kwargs={"momentum": None, "eps": 1e-3}),
                            (2, 3, 16, 16), 8, {}, True),
    "timm_densenet": Case(lambda: TimmDenseNet(), (2, 3, 16, 16), 7, {}, True),
    "timm_mixed": Case(lambda: TimmMixed(), (2, 3, 8, 8), 7, {
        "silu.bn": "SiLU has no cnnops kernel",
        "leaky.bn": "LeakyReLU has no cnnops kernel",
        "dropped.bn": "BatchNormAct2d applies Dropout after the BN",
        "conv_twice": "conv output used 2 times",
        "scaled": "ScaledBN overrides BatchNorm2d.forward",
    }, True),
    "timm_untraced": Case(lambda: UntracedCaller(), (2, 3, 8, 8), 1, {
        "(root)": "forward cannot be traced", "bn": "forward is not traced",
        "bn_act": "forward is not traced", "bn_silu": "SiLU has no cnnops kernel"}, False),
    "writes_buffers": Case(lambda: WritesBuffers(), (2, 3, 8, 8), 2, {
        "counter": "forward writes into a tensor in place",
        "smooth": "forward writes into a tensor in place"}, True),
}


def make_pair(name, dtype=torch.float64):
    torch.manual_seed(0)
    model = CASES[name].make().to(dtype)
    _randomize_stats(model)
    return model, cnnops.fuse(model)


def _randomize_stats(model):
    """Non-trivial BN statistics and affine parameters, so eval mode tests something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, FrozenBatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


def _outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


def _step(model, x, seed=0):
    """Forward (RNG seeded for dropout) and backward of a fixed function of every output."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    outs = _outputs(model(x))
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
               for o in outs)
    loss.backward()
    return outs, x.grad


def _assert_same_state(model, fused, rtol=1e-9, atol=1e-9):
    for (k, a), (k2, b) in zip(model.state_dict().items(), fused.state_dict().items()):
        assert k == k2
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(a, b), k


def _fused_bn(records):
    return sorted({r.name for r in records if r.status == "fused" and "bn" in r.pattern})


# ---------------------------------------------------------------------------
# The report

@pytest.mark.parametrize("name", sorted(CASES))
def test_report(name):
    case = CASES[name]
    model, fused = make_pair(name)
    records = cnnops.fusion_report(fused)
    assert all(isinstance(r, FusionRecord) and r.status in ("fused", "skipped") for r in records)
    assert len(_fused_bn(records)) == case.bn_fused, records
    skipped = {r.name: r.reason for r in records if r.status == "skipped"}
    assert set(skipped) == set(case.skipped), skipped
    for site, reason in case.skipped.items():
        assert reason in skipped[site], (site, skipped[site])
    # the dry run on the original says the same and changes nothing
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    assert cnnops.fusion_report(model) == records
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [m.training for m in model.modules()] == flags
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_report_contents_resnet():
    _, fused = make_pair("resnet_basic")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["bn1"].pattern == "conv-bn-relu"
    assert by_name["layer1.0.bn1"].pattern == "conv-bn-relu"
    assert by_name["layer1.0.bn2"].pattern == "conv-bn-add-relu"
    assert by_name["layer2.0.downsample.1"].pattern == "conv-bn"
    assert by_name["maxpool"].pattern == "max_pool2d"
    assert by_name["avgpool"].pattern == "adaptive_avg_pool2d"


def test_report_contents_others():
    _, fused = make_pair("densenet")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["features.denseblock1.denselayer1.norm1"].pattern == "bn-relu"
    assert by_name["features.denseblock1.denselayer1.norm2"].pattern == "conv-bn-relu"
    assert by_name["features.transition1.norm"].pattern == "bn-relu"
    assert by_name["features.norm5"].pattern == "bn-relu"        # across the Sequential's end
    assert by_name["features.transition1.pool"].pattern == "avg_pool2d"
    _, fused = make_pair("quirks")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["bn_twice"].pattern == "bn-relu"                  # conv blocked, BN-ReLU not
    assert by_name["bn_reflect"].status == "fused"                   # reflect padding is fine
    assert by_name["bn_leaky"].pattern == "conv-bn"                  # fused without LeakyReLU
    assert by_name["conv_relu"].pattern == "conv-relu"               # circular padding too
    assert by_name["frozen"].pattern == "bn-relu" and "frozen" in by_name["frozen"].reason
    assert by_name["add_1"].pattern == "add-relu"                    # broadcasting add
    assert by_name["add_3"].pattern == "add-relu"                    # torch.add(...).relu_()
    _, fused = make_pair("seed_residual_plain")
    patterns = collections.Counter(r.pattern for r in cnnops.fusion_report(fused))
    assert patterns == {"conv-relu": 2, "conv-add-relu": 2, "max_pool2d": 2}
    _, fused = make_pair("depthwise")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["blocks.0.bn_pw"].pattern == "conv-bn-add-relu"   # torch.add(y, x).relu()
    _, fused = make_pair("preact_resnet")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["layer1.0.bn1"].pattern == "bn-relu"
    assert by_name["layer1.0.bn2"].pattern == "conv-bn-relu"
    _, fused = make_pair("inception")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["AuxLogits.conv0.bn"].pattern == "conv-bn-relu"  # traced in train mode only
    assert by_name["Mixed_5b:avg_pool2d"].pattern == "avg_pool2d"
    assert by_name["max_pool2d"].pattern == "max_pool2d"


def test_report_contents_timm():
    _, fused = make_pair("timm_regnet")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["stem.bn"].pattern == "conv-bn-relu"          # ConvNormAct, ReLU in place
    assert by_name["s1.0.conv2.bn"].pattern == "conv-bn-relu"     # grouped
    assert by_name["s1.0.conv3.bn"].pattern == "conv-bn"          # act Identity
    assert by_name["s1.0.downsample.bn"].pattern == "conv-bn-add-relu"
    assert by_name["s1.1:add"].pattern == "add-relu"
    _, fused = make_pair("timm_densenet")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["features.norm0"].pattern == "conv-bn-relu"    # across the Sequential
    assert by_name["layers.0.norm1"].pattern == "bn-relu"         # pre-activation, after a cat
    assert by_name["layers.1.norm2"].pattern == "conv-bn-relu"
    assert by_name["norm5"].pattern == "bn-relu"
    _, fused = make_pair("timm_mixed")
    by_name = {r.name: (r.pattern, r.status) for r in cnnops.fusion_report(fused)}
    assert by_name["relu_inplace.bn"] == ("conv-bn-relu", "fused")
    assert by_name["relu.bn"] == ("conv-bn-relu", "fused")          # momentum=None
    assert by_name["linear.bn"] == ("conv-bn-add", "fused")         # affine=False, + x
    assert by_name["no_stats.bn"] == ("conv-bn-relu", "fused")      # track_running_stats=False
    assert by_name["bn_twice"] == ("bn-relu", "fused")              # its conv output used twice
    assert by_name["alone_relu"] == ("bn-relu", "fused")
    assert by_name["alone_linear"] == ("bn", "fused")
    assert by_name["silu.bn"] == ("conv-bn-silu", "skipped")
    assert by_name["leaky.bn"] == ("conv-bn-leakyrelu", "skipped")
    assert by_name["dropped.bn"] == ("conv-bn-relu", "skipped")
    assert by_name["scaled"] == ("bn", "skipped")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_bn_is_reported(name):
    model, fused = make_pair(name)
    sites = {r.name.split("@")[0] for r in cnnops.fusion_report(fused)}
    bns = {n for n, m in model.named_modules()
           if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))}
    assert bns <= sites, bns - sites


# ---------------------------------------------------------------------------
# fuse changes nothing

def _everything(model):
    """Each module's training flag, plain attributes, and its parameters and buffers with
    their version counters (which count in-place writes, even ones undone later)."""
    state = {}
    for name, m in model.named_modules():
        attrs = {k: v for k, v in vars(m).items()
                 if k not in ("_parameters", "_buffers", "_modules", "forward",
                              "_cnnops_fusion_records")}
        tensors = {k: (t.detach().clone(), t._version, t.requires_grad)
                   for k, t in list(m._parameters.items()) + list(m._buffers.items())
                   if t is not None}
        state[name] = (m.training, attrs, tensors)
    return state


def _assert_unchanged(model, before):
    after = _everything(model)
    assert list(after) == list(before)
    for name, (training, attrs, tensors) in before.items():
        training2, attrs2, tensors2 = after[name]
        assert training2 == training, name
        assert attrs2 == attrs, name
        assert list(tensors2) == list(tensors), name
        for k, (t, version, requires_grad) in tensors.items():
            t2, version2, requires_grad2 = tensors2[k]
            assert torch.equal(t2, t), (name, k)
            assert (version2, requires_grad2) == (version, requires_grad), (name, k)


class NotCopyable(TimmMixed):
    """fusion_report analyses a model it cannot copy in place."""

    def __deepcopy__(self, memo):
        raise TypeError("not copyable")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["timm_regnet", "timm_densenet", "timm_mixed", "timm_untraced",
                                  "writes_buffers", "inception", "quirks"])
def test_fuse_changes_nothing(name, mode):
    """No forward runs while fusing: BatchNormAct2d's num_batches_tracked.add_(1) and a
    module's ``self.seen += 1`` included. Parameters, buffers, attributes and training flags
    stay as they were, in place (inplace=True) or in the copy."""
    torch.manual_seed(0)
    model = CASES[name].make().double()
    _randomize_stats(model)
    model.train(mode == "train")
    before = _everything(model)
    records = cnnops.fusion_report(model)        # a dry run, on a copy
    _assert_unchanged(model, before)
    fused = cnnops.fuse(model)
    _assert_unchanged(model, before)
    _assert_same_state(model, fused, rtol=0, atol=0)
    assert [m.training for m in fused.modules()] == [m.training for m in model.modules()]
    assert cnnops.fuse(model, inplace=True) is model
    _assert_unchanged(model, before)
    assert cnnops.fusion_report(model) == records
    if name == "timm_mixed":
        torch.manual_seed(0)
        model = NotCopyable().double()
        model.train(mode == "train")
        before = _everything(model)
        assert cnnops.fusion_report(model) == records
        assert not any("forward" in m.__dict__ for m in model.modules())
        _assert_unchanged(model, before)


def test_writes_in_forward_are_kept():
    """A forward writing into its buffers keeps its forward: the writes happen at each call,
    as in the original, not once at fuse time. Its children are fused."""
    model, fused = make_pair("writes_buffers")
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert "aten.add_" in by_name["counter"].reason and "aten.mul_" in by_name["smooth"].reason
    assert "forward" in fused.__dict__ and "forward" not in fused.counter.__dict__
    assert by_name["counter.body.1"].status == "fused"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(3):
        _step(model, x)
        _step(fused, x)
    assert int(fused.counter.seen) == int(model.counter.seen) == 3
    _assert_same_state(model, fused)


@pytest.mark.parametrize("name", ["regnety_002", "densenet121", "cspresnet50"])
def test_real_timm(name):
    """Where timm can be imported: its models' BNs are all reported, every BatchNormAct2d with a
    ReLU or no activation is fused, and nothing changes but how forward runs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).double()
    _randomize_stats(model)
    fused = cnnops.fuse(model)
    _assert_same_state(model, fused, rtol=0, atol=0)
    by_name = {r.name.split("@")[0]: r for r in cnnops.fusion_report(fused)}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert n in by_name, n
            if (type(m).__name__ == "BatchNormAct2d" and type(m.drop) is nn.Identity
                    and type(m.act) in (nn.ReLU, nn.Identity)):
                assert by_name[n].status == "fused", by_name[n]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)   # 2x2 maps at the end: BN is stable
    for train in (True, False):
        model.train(train), fused.train(train)
        out_m, gx_m = _step(model, x)
        out_f, gx_f = _step(fused, x)
        torch.testing.assert_close(out_f[0], out_m[0], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(gx_f, gx_m, rtol=1e-7, atol=1e-8)
        for (k, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-8, msg=k)
        _assert_same_state(model, fused)


# ---------------------------------------------------------------------------
# state_dict and checkpoints

@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_and_checkpoints(name):
    model, fused = make_pair(name)
    assert list(fused.state_dict()) == list(model.state_dict())
    _assert_same_state(model, fused, rtol=0, atol=0)
    assert type(fused) is type(model)
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]
    # an existing checkpoint loads strictly into the fused model and the other way round
    torch.manual_seed(1)
    other = CASES[name].make().double()
    _randomize_stats(other)
    fused.load_state_dict(other.state_dict(), strict=True)
    _assert_same_state(other, fused, rtol=0, atol=0)
    fresh = CASES[name].make().double()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    _assert_same_state(fused, fresh, rtol=0, atol=0)
    x = torch.randn(CASES[name].shape, dtype=torch.float64)
    other.eval(), fused.eval()
    with torch.no_grad():
        for a, b in zip(_outputs(fused(x)), _outputs(other(x))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Outputs, gradients, statistics

def _check_steps(name, mode, steps):
    model, fused = make_pair(name)
    model.train(mode == "train")
    fused.train(mode == "train")
    torch.manual_seed(3)
    x = torch.randn(CASES[name].shape, dtype=torch.float64)
    for step in range(steps):  # running statistics and num_batches_tracked accumulate
        out_m, gx_m = _step(model, x, seed=step)
        out_f, gx_f = _step(fused, x, seed=step)
        assert len(out_m) == len(out_f)
        for a, b in zip(out_f, out_m):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gx_f, gx_m, rtol=1e-8, atol=1e-9)
        for (k, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
            assert (p.grad is None) == (q.grad is None), k
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-9, msg=k)
        _assert_same_state(model, fused)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_matches_original(name, mode):
    """Outputs, input and parameter gradients, running statistics, num_batches_tracked."""
    _check_steps(name, mode, 2 if mode == "train" else 1)


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "inception", "quirks"])
def test_step_matches_original_per_backend(name, backend):
    _check_steps(name, "train", 1)


@pytest.mark.parametrize("core", ["im2col", "onednn"])
def test_float32_matches_original(core):
    """A float32 training step and an eval step of fused models, on each CPU convolution core."""
    with cnnops.use_backend("cpu"), cnnops.use_cpu_conv(core):
        _check_float32_steps()


def _check_float32_steps():
    for name in ("resnet_basic", "densenet", "inception", "quirks", "seed_residual_plain"):
        torch.manual_seed(0)
        model = CASES[name].make()
        _randomize_stats(model)
        fused = cnnops.fuse(model)
        x = torch.randn(CASES[name].shape)
        for train in (True, False):
            model.train(train), fused.train(train)
            out_m, gx_m = _step(model, x)
            out_f, gx_f = _step(fused, x)
            for a, b in zip(out_f, out_m):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gx_f, gx_m, rtol=1e-3, atol=5e-4)
            _assert_same_state(model, fused, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# The fused ops run

_OP_OF_PATTERN = {"bn": "batch_norm",     # a BatchNormAct2d without activation, alone
                  "conv-bn": "conv_bn_relu", "conv-bn-relu": "conv_bn_relu",
                  "conv-bn-add": "conv_bn_relu", "conv-bn-add-relu": "conv_bn_relu",
                  "bn-relu": "bn_relu", "bn-add": "bn_relu", "bn-add-relu": "bn_relu",
                  "conv-relu": "conv2d_relu", "conv-add-relu": "conv2d_relu",
                  "add-relu": "add_relu", "max_pool2d": "max_pool2d",
                  "avg_pool2d": "avg_pool2d", "adaptive_avg_pool2d": "adaptive_avg_pool2d"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_ops_run(name):
    """In train mode (every site runs), on the cpu backend, each fused record is one op call."""
    _, fused = make_pair(name)
    fused.train()
    want = collections.Counter(_OP_OF_PATTERN[r.pattern] for r in cnnops.fusion_report(fused)
                               if r.status == "fused")
    recorder = OpRecorder()
    x = torch.randn(CASES[name].shape, dtype=torch.float64)
    with cnnops.use_backend("cpu"), recorder:
        fused(x)
    got = {k[len("cnnops::"):]: v for k, v in recorder.calls.items()
           if k.startswith("cnnops::") and k[len("cnnops::"):] in set(_OP_OF_PATTERN.values())}
    assert got == dict(want)
    # a fused BN no longer runs aten's batch norm: only the skipped BN sites do
    aten_bn = sum(v for k, v in recorder.calls.items() if "batch_norm" in k and "aten" in k)
    unfused_bn = [n for n, m in fused.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and n not in _fused_bn(cnnops.fusion_report(fused))]
    assert aten_bn == len(unfused_bn)


# ---------------------------------------------------------------------------
# deepcopy, pickle, .to(), compile

@pytest.mark.parametrize("name", sorted(CASES))
def test_copy_pickle_and_to(name):
    torch.manual_seed(0)
    model = CASES[name].make()
    _randomize_stats(model)
    fused = cnnops.fuse(model)
    records = cnnops.fusion_report(fused)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copies = {"deepcopy": copy.deepcopy(fused), "pickle": pickle.loads(pickle.dumps(fused)),
              "torch.save": loaded}
    model64 = copy.deepcopy(model).to(torch.float64).train()
    fused64 = fused.to(torch.float64)
    assert fused64 is fused
    x = torch.randn(CASES[name].shape, dtype=torch.float64)
    out_ref, gx_ref = _step(model64, x)
    for label, c in list(copies.items()) + [("to", fused64)]:
        assert cnnops.fusion_report(c) == records, label
        assert list(c.state_dict()) == list(model.state_dict()), label
        c.to(torch.float64).train()
        out, gx = _step(c, x)
        for a, b in zip(out, out_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=label)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-8, atol=1e-9, msg=label)
        _assert_same_state(model64, c)   # each copy updated its own statistics like the original


COMPILE_FAST = [("resnet_basic", "train"), ("inception", "train"), ("inception", "eval"),
                ("untraceable", "train"), ("quirks", "eval")]


@pytest.mark.parametrize("name,mode", COMPILE_FAST)
def test_compile(name, mode):
    _check_compiled(name, mode)


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", [(n, m) for n in sorted(CASES) for m in ("train", "eval")
                                       if (n, m) not in COMPILE_FAST])
def test_compile_every_model(name, mode):
    _check_compiled(name, mode)


def _check_compiled(name, mode):
    """torch.compile(aot_eager) of the fused model: fullgraph where the original traces as a
    whole; same outputs, gradients and statistics as the original."""
    model, fused = make_pair(name)
    model.train(mode == "train")
    fused.train(mode == "train")
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=CASES[name].fullgraph)
    x = torch.randn(CASES[name].shape, dtype=torch.float64)
    out_m, gx_m = _step(model, x)
    out_c, gx_c = _step(compiled, x)
    for a, b in zip(out_c, out_m):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx_c, gx_m, rtol=1e-8, atol=1e-9)
    for (k, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-9, msg=k)
    _assert_same_state(model, fused)


# ---------------------------------------------------------------------------
# Behaviour around the fused forward

def test_inplace_and_idempotent():
    torch.manual_seed(0)
    model = CASES["resnet_basic"].make()
    same = cnnops.fuse(model, inplace=True)
    assert same is model and "forward" in model.__dict__
    records = cnnops.fusion_report(model)
    again = cnnops.fuse(model)
    assert cnnops.fusion_report(again) == records
    original = CASES["resnet_basic"].make()
    copy_ = cnnops.fuse(original)      # inplace=False: the original is left alone
    assert copy_ is not original and "forward" in copy_.__dict__
    assert not any("forward" in m.__dict__ for m in original.modules())
    assert not hasattr(original, "_cnnops_fusion_records")


def test_mixed_training_flags_fall_back():
    """Inception's traced code depends on self.training: with its modules in mixed modes the
    class's own forward runs, still giving the original's results."""
    model, fused = make_pair("inception")
    assert "_cnnops_eval" in fused.__dict__["forward"].source   # train and eval code differ
    for m in (model, fused):
        m.train()
        m.Mixed_5b.eval()
    x = torch.randn(CASES["inception"].shape, dtype=torch.float64)
    out_m, _ = _step(model, x)
    out_f, _ = _step(fused, x)
    for a, b in zip(out_f, out_m):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    _assert_same_state(model, fused)


def test_replaced_submodule_is_used():
    """The fused forward looks modules up at call time: fine-tuning a new head works."""
    model, fused = make_pair("resnet_basic")
    model.fc = nn.Linear(64, 3).double()
    fused.fc = copy.deepcopy(model.fc)
    x = torch.randn(CASES["resnet_basic"].shape, dtype=torch.float64)
    model.eval(), fused.eval()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


class InplaceIntoInput(nn.Module):
    """out += x writes into the caller's tensor; the fused model must do the same."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        z = x * 2.0
        x += self.bn(self.conv(z))
        return torch.relu(x)


class ResidualInto(nn.Module):
    """identity += bn(conv(x)) with a fresh identity: fused, the add writing into identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        identity = self.proj(x)
        identity += self.bn(self.conv(x))
        return F.relu(identity)


class BroadcastResidual(nn.Module):
    """out += a [N, C, 1, 1] residual: fused, and at run time the original ops (shapes differ)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x.mean((2, 3), keepdim=True)
        return torch.relu(out)


@pytest.mark.parametrize("make", [InplaceIntoInput, ResidualInto, BroadcastResidual],
                         ids=["into_input", "into_residual", "broadcast_residual"])
def test_inplace_adds(make):
    torch.manual_seed(0)
    model = make().double()
    fused = cnnops.fuse(model)
    for train in (True, False):
        model.train(train), fused.train(train)
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        xm, xf = x.clone(), x.clone()
        with torch.no_grad():
            torch.testing.assert_close(fused(xf), model(xm), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(xf, xm, rtol=1e-9, atol=1e-9)   # same caller-visible effect
        grads = []
        for m in (model, fused):
            leaf = x.clone().requires_grad_(True)
            out = m(leaf * 1.0)       # not a leaf: in-place into the input is allowed
            weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            (out * weights).sum().backward()
            grads.append((out, leaf.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-8, atol=1e-9)
        _assert_same_state(model, fused)
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    if make is InplaceIntoInput:      # x += ... must keep writing into the caller's tensor
        assert by_name["bn"].pattern == "conv-bn" and by_name["iadd"].status == "skipped"
    else:
        assert by_name["bn"].pattern == "conv-bn-add-relu" and by_name["bn"].status == "fused"


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes(padding_mode, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode),
                          nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode=padding_mode),
                          nn.ReLU()).double()
    fused = cnnops.fuse(model)
    assert [r.status for r in cnnops.fusion_report(fused)] == ["fused", "fused"]
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for train in (True, False):
        model.train(train), fused.train(train)
        out_m, gx_m = _step(model, x)
        out_f, gx_f = _step(fused, x)
        torch.testing.assert_close(out_f[0], out_m[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gx_f, gx_m, rtol=1e-8, atol=1e-9)
        _assert_same_state(model, fused)


def test_unbatched_input_uses_original_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)).double()
    fused = cnnops.fuse(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused(x[None]), model(x[None]), rtol=1e-9, atol=1e-9)


def test_conv_subclasses_and_hooks():
    class StdConv2d(nn.Conv2d):   # weight standardisation: traced through, not a conv module
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class MyConv(nn.Conv2d):      # keeps Conv2d.forward: fused like one
        pass

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          MyConv(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).double()
    seen = []
    model[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = cnnops.fuse(model)
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["1"].pattern == "bn-relu" and by_name["1"].status == "fused"
    assert by_name["4"].pattern == "conv-bn-relu" and by_name["4"].status == "fused"
    assert by_name["6"].status == "skipped" and "hooks" in by_name["6"].reason
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for train in (True, False):
        model.train(train), fused.train(train)
        out_m, gx_m = _step(model, x)
        out_f, gx_f = _step(fused, x)
        torch.testing.assert_close(out_f[0], out_m[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gx_f, gx_m, rtol=1e-8, atol=1e-9)
        _assert_same_state(model, fused)
    assert len(seen) == 4   # the hook ran in both models, both modes


def test_fuse_never_raises():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ConvBNReLU(3, 4)

        def forward(self, x, scale=None):
            if scale is not None and scale.item() > 1:
                x = x * 2
            y = self.block(x)
            return {"out": y, "n": int(y.shape[0])}

    torch.manual_seed(0)
    model = Weird().double()
    fused = cnnops.fuse(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval(), fused.eval()
    torch.testing.assert_close(fused(x, torch.tensor(2.0))["out"],
                               model(x, torch.tensor(2.0))["out"])
    assert {r.name: r.status for r in cnnops.fusion_report(fused)}["block.1"] == "fused"
    with pytest.raises(TypeError):
        cnnops.fuse(lambda x: x)


class NoGradStats(nn.Module):
    """A forward with its own grad mode and a side effect: kept as it is (fused inside)."""

    def __init__(self):
        super().__init__()
        self.body = ConvBNReLU(3, 4)
        self.probe = nn.Conv2d(4, 4, 1)
        self.last_mean = None

    def forward(self, x):
        y = self.body(x)
        with torch.no_grad():
            z = self.probe(y)
        self.last_mean = z.mean()
        return y + z


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stats = NoGradStats()
        self.head = ConvBNReLU(4, 4)

    def forward(self, x):
        return self.head(self.stats(x))


def test_grad_mode_and_side_effects_are_kept():
    torch.manual_seed(0)
    model = Holder().double()
    fused = cnnops.fuse(model)
    by_name = {r.name: r for r in cnnops.fusion_report(fused)}
    assert by_name["stats"].status == "skipped" and "no_grad" in by_name["stats"].reason
    assert by_name["stats.body.1"].status == "fused" and by_name["head.1"].status == "fused"
    assert "forward" in fused.__dict__ and "forward" not in fused.stats.__dict__
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out_m, gx_m = _step(model, x)
    out_f, gx_f = _step(fused, x)
    torch.testing.assert_close(out_f[0], out_m[0], rtol=1e-9, atol=1e-9)
    assert fused.stats.probe.weight.grad is None and model.stats.probe.weight.grad is None
    torch.testing.assert_close(fused.stats.last_mean, model.stats.last_mean)
    _assert_same_state(model, fused)


def test_wrapped_in_data_parallel():
    torch.manual_seed(0)
    model = nn.DataParallel(resnet(plain.TvBasicBlock, [1, 1, 1, 1])).double()
    fused = cnnops.fuse(model)
    assert len(_fused_bn(cnnops.fusion_report(fused))) == 12
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_m, _ = _step(model, x)
    out_f, _ = _step(fused, x)
    torch.testing.assert_close(out_f[0], out_m[0], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# channels_last inference on the CPU

class _FeatureNet(nn.Module):
    """conv-BN-ReLU, a residual block, a pool; returns the 4-D features and the logits."""

    def __init__(self, view=False):
        super().__init__()
        self.view = view
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        f = F.max_pool2d(x, 2)
        flat = f.view(f.shape[0], -1) if self.view else torch.flatten(f, 1)
        return f, self.fc(flat)


def _eval_source(fused):
    return fused.__dict__["forward"].source.split("def _cnnops_eval")[1]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fuse_runs_cpu_inference_in_channels_last(layout):
    """fuse's eval forward takes a 4-D CPU input to channels_last (oneDNN's native layout)
    when every op of the graph is layout-free, and gives its 4-D outputs back in the input's
    layout: the same values and layouts as eager; training is untouched."""
    torch.manual_seed(16)
    model = _FeatureNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_var.uniform_(0.5, 2)
    fused = cnnops.fuse(model)
    assert "to_channels_last(" in _eval_source(fused)
    train_source = fused.__dict__["forward"].source.split("def _cnnops_train")[1]
    assert "to_channels_last(" not in train_source.split("def _cnnops_eval")[0]
    x = make_input((2, 3, 8, 8), layout)
    with torch.no_grad():
        (f_e, y_e), (f_f, y_f) = model(x), fused(x)
    assert_close(f_f, f_e)
    assert_close(y_f, y_e)
    assert f_f.stride() == f_e.stride()
    fused.train()
    assert_close(fused(x)[1], model.train()(x)[1])


class _PreActNet(nn.Module):
    """DenseNet's pattern: BN-ReLU before each conv (cnnops bn_relu sites), concatenation,
    average pooling."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.conv0(x)
        x = torch.cat([x, self.conv1(F.relu(self.bn1(x)))], 1)
        x = F.avg_pool2d(F.relu(self.bn2(x)), 2)
        return x, self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_fuse_runs_bn_relu_sites_in_channels_last():
    """BN-ReLU sites run cnnops' BN kernels, which read channels_last as it is: a
    pre-activation graph is taken to channels_last too, with eager's values and layouts."""
    torch.manual_seed(18)
    model = _PreActNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-1, 1)
    fused = cnnops.fuse(model)
    source = _eval_source(fused)
    assert "to_channels_last(" in source and "bn_relu" in source
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        (f_e, y_e), (f_f, y_f) = model(x), fused(x)
    assert_close(f_f, f_e)
    assert_close(y_f, y_e)
    assert f_f.stride() == f_e.stride()


def test_lone_convs_run_cnnops_conv2d_on_the_cpu():
    """A convolution with nothing after it to fuse (DenseNet's 3x3 ones, a pre-activation
    net's) runs cnnops' conv2d on CPU tensors, in training and inference, with eager's values
    and gradients; one with a hook stays a module call, so its hook runs."""
    torch.manual_seed(19)
    model = _PreActNet().double()
    seen = []
    model.conv0.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = cnnops.fuse(model)
    source = fused.__dict__["forward"].source
    assert source.count("conv2d_on_cpu(") == 2  # conv1, in the train and the eval forward
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for train in (True, False):
        model.train(train), fused.train(train)
        out_m, gx_m = _step(model, x)
        with torch.profiler.profile() as prof:
            out_f, gx_f = _step(fused, x)
        assert [e.name for e in prof.events()].count("cnnops::conv2d") == 1
        for a, e in zip(out_f, out_m):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gx_f, gx_m, rtol=1e-8, atol=1e-9)
        _assert_same_state(model, fused)
    assert len(seen) == 4  # the hook ran in both models, both modes
    # where the cpu backend does not run the call (float16 on the CPU, another backend
    # chosen), the lone conv is torch's, as an unfused op is
    half, x16 = model.half(), x.half()
    fused16 = cnnops.fuse(half)
    for backend in ("auto", "reference"):
        with cnnops.use_backend(backend), torch.profiler.profile() as prof:
            torch.testing.assert_close(fused16.eval()(x16)[1], half.eval()(x16)[1],
                                       rtol=1e-2, atol=1e-3)  # (the BN sites round apart)
        assert "cnnops::conv2d" not in [e.name for e in prof.events()]
    # the cpu backend forced: a lone conv it cannot run is still torch's, not an error
    alone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()).half()
    with cnnops.use_backend("cpu"):
        torch.testing.assert_close(cnnops.fuse(alone)(x16), alone(x16))


def test_fuse_keeps_the_layout_of_graphs_with_other_ops():
    """A .view() (which raises on a channels_last activation) or any op outside the
    layout-free set keeps the eval graph in the layout it is given."""
    torch.manual_seed(17)
    model = _FeatureNet(view=True).eval()
    fused = cnnops.fuse(model)
    assert "to_channels_last(" not in fused.__dict__["forward"].source
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(fused(x)[1], model(x)[1])


def test_to_channels_last_only_where_onednn_runs():
    x = torch.randn(2, 3, 4, 4)
    assert to_channels_last(x).is_contiguous(memory_format=torch.channels_last)
    for other in (x.double(), torch.randn(2, 3, 4), x.contiguous(memory_format=torch.channels_last)):
        assert to_channels_last(other) is other
    with cnnops.use_cpu_conv("im2col"):
        assert to_channels_last(x) is x
    with cnnops.use_backend("reference"):
        assert to_channels_last(x) is x
    y = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    assert restore_layout((y, 1), x, x)[0] is y
    assert restore_layout((y, 1), x, y)[0].is_contiguous()


@pytest.mark.parametrize("norm", ["batch_norm", "frozen"])
def test_eval_residual_adds_write_over_a_residual_nothing_reads(norm):
    """Each bottleneck's residual add, whose residual nothing reads afterwards, writes its
    result over that residual in inference outside autograd (cnnops::conv_bn_relu_into_residual:
    no new output), on each core (auto: from the call after the one that measures it), and the
    other conv-BN sites run cnnops::conv_bn_relu_inference; with autograd recording they all
    run the op with a backward. Same outputs as eager throughout."""
    torch.manual_seed(23)
    model = resnet(plain.TvBottleneck, [2, 1, 1, 1],
                   norm_layer=FrozenBatchNorm2d if norm == "frozen" else None).eval()
    _randomize_stats(model)
    fused = cnnops.fuse(model)
    assert _eval_source(fused).count("reuse_residual = True") == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    for core in ("im2col", "onednn", "auto"):
        with cnnops.use_cpu_conv(core):
            for call, no_autograd in enumerate([torch.no_grad, torch.no_grad,
                                                torch.inference_mode]):
                recorder = OpRecorder()
                with no_autograd(), recorder:
                    out = fused(x)
                assert recorder.calls["cnnops::conv_bn_relu_into_residual"] == 5, call
                # (the other sites: the inference op, without statistics)
                assert recorder.calls["cnnops::conv_bn_relu_inference"] == 15, call
                assert "cnnops::conv_bn_relu" not in recorder.calls, call
                assert_close(out, want)
    recorder = OpRecorder()
    with recorder:
        out = fused(x)
    assert recorder.calls["cnnops::conv_bn_relu"] == 20
    assert not {"cnnops::conv_bn_relu_into_residual",
                "cnnops::conv_bn_relu_inference"} & set(recorder.calls)
    assert_close(out, want)


class _ResidualsReadAgain(nn.Module):
    """Residual blocks whose residual is the caller's tensor, is returned, or has a view taken
    of it: only the one whose residual nothing else holds may write over it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                                 nn.BatchNorm2d(4), nn.ReLU())
                                   for _ in range(4))
        self.outer = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                                 nn.BatchNorm2d(4)) for _ in range(4))

    def block(self, i, t):
        return self.outer[i](self.inner[i](t))

    def forward(self, x):
        a = F.relu(self.block(0, x) + x)   # x: the caller's
        b = F.relu(self.block(1, a) + a)   # a: read before the add only: written over
        c = F.relu(self.block(2, b) + b)   # b: returned
        v = c.flatten(1)                   # a view of c
        d = F.relu(self.block(3, c) + c)
        return d, b, v


def test_residuals_read_again_are_not_written_over():
    torch.manual_seed(29)
    model = _ResidualsReadAgain().eval()
    _randomize_stats(model)
    fused = cnnops.fuse(model)
    # (one forward for both modes: a view keeps the eval graph as the training one)
    assert fused.__dict__["forward"].source.count("reuse_residual = True") == 1
    x = torch.randn(2, 4, 6, 6)
    before = x.clone()
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            for a, e in zip(fused(x), want):
                assert_close(a, e)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------
# GPU entries only (marked `cuda`, see tests/conftest.py): a ResNet-ish model, one training step
# and inference, fused against torch.nn on CUDA

from conftest import axis, check, needs_cuda, on_gpu, twin_resnet  # noqa: E402


def _gpu_train_step(model, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return out.detach(), loss.detach(), grads


@on_gpu(axis("dtype", [torch.float32, torch.float64], str),
        axis("layout", ["contiguous", "channels_last"]))
def test_resnet_training_step_matches_torch(backend, dtype, layout):
    """cnnops.fuse(model) against the model itself: one SGD step (outputs, loss, every
    gradient, updated parameters, running statistics, num_batches_tracked), then inference."""
    plain, fused = twin_resnet(dtype, layout, backend.device)
    x = backend.make((6, 3, 32, 32), dtype, layout)
    y = torch.randint(0, 10, (6,)).to(backend.device)
    out_p, loss_p, grads_p = _gpu_train_step(plain, x, y)
    out_f, loss_f, grads_f = _gpu_train_step(fused, x, y)
    check(out_f, out_p, dtype, "logits")
    check(loss_f, loss_p, dtype, "loss")
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        check(grads_f[name], grads_p[name], dtype, "grad of " + name)
    state_p, state_f = plain.state_dict(), fused.state_dict()
    assert state_p.keys() == state_f.keys()
    for name in state_p:
        if state_p[name].is_floating_point():
            check(state_f[name], state_p[name], dtype, name)
        else:
            assert torch.equal(state_f[name], state_p[name]), name
    plain.eval()
    fused.eval()
    with torch.no_grad():
        check(fused(x), plain(x), dtype, "eval logits")


@needs_cuda
@on_gpu(axis("amp_dtype", [torch.float16, torch.bfloat16], str))
def test_resnet_training_step_under_autocast(backend, amp_dtype):
    """The same step under torch.autocast. Gradients are judged against the float32 step: cnnops
    under autocast must be about as accurate as torch under autocast.

    Comparing the two autocast runs with each other tests noise: in bfloat16 torch's own
    gradients of this net are 20-50% off the float32 step (relative L2 over all parameters
    0.19-0.33 over 4 seeds, bn1.bias 0.22-0.50; measured on the CPU), so a fused-vs-eager
    difference of 0.30 (the first GPU run) says nothing about either. A wrong gradient is off
    by ~1 or more and still fails."""
    plain, fused = twin_resnet(torch.float32, "channels_last", backend.device)
    exact = copy.deepcopy(plain)
    x = backend.make((6, 3, 32, 32), torch.float32, "channels_last")
    y = torch.randint(0, 10, (6,)).to(backend.device)
    _, _, grads_e = _gpu_train_step(exact, x, y)
    with torch.autocast("cuda", dtype=amp_dtype):
        out_p, loss_p, grads_p = _gpu_train_step(plain, x, y)
        out_f, loss_f, grads_f = _gpu_train_step(fused, x, y)
    assert out_f.dtype == out_p.dtype
    check(out_f, out_p.float(), amp_dtype, "logits")
    assert abs(loss_f.item() - loss_p.item()) < 0.02 * abs(loss_p.item())

    def error(grads, names):
        a = torch.cat([grads[n].double().flatten() for n in names])
        b = torch.cat([grads_e[n].double().flatten() for n in names])
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    names = list(grads_e)
    assert error(grads_f, names) <= 1.25 * error(grads_p, names) + 0.02, (
        error(grads_f, names), error(grads_p, names))
    for name in names:
        assert error(grads_f, [name]) <= 2 * error(grads_p, [name]) + 0.05, (
            name, error(grads_f, [name]), error(grads_p, [name]))

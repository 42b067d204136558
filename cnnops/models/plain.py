"""The networks of cnnops.models, each defined once: here, as plain torch.nn twins.

Each network builds its convolution, BatchNorm and pooling layers from a layer kit
(cnnops.models._kit): a class's ``kit`` attribute, a function's ``kit=`` argument.
Here the kit is TORCH and the forwards are torch.nn code as torchvision / d2l /
users write it (conv -> BatchNorm2d -> ReLU(inplace) as separate modules, ``out +=
identity``): the unfused baselines. cnnops.models builds the same definitions on the
CNNOPS kit (cnnops.nn's drop-in subclasses), its classes subclassing these as
cnnops.nn's modules subclass torch.nn's, with a forward that runs the fused ops
where they fuse explicitly. So the module names, and the state_dict keys, are the
same both ways and state_dicts transfer with strict=True:
``plain.residual_net().load_state_dict(cnnops.models.residual_net().state_dict())``.

The main job (python -m cnnops) trains a seed network and its plain twin from the
same initial weights; the benchmarks time the torchvision-style ResNet / DenseNet
(written out here: torchvision is not a dependency) and d2l's GoogLeNet as eager
PyTorch; the model tests compare cnnops.models against them and tests/test_fuse.py
fuses them.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._kit import TORCH

__all__ = ["lenet", "alexnet", "vgg_block", "vgg11", "nin_block", "nin", "residual_net",
           "inception_net", "PLAIN", "TvBasicBlock", "TvBottleneck", "TvResNet", "TvDenseNet",
           "TwinInception", "twin_googlenet"]


# ---------------------------------------------------------------------------
# d2l (Dive into Deep Learning): nn.Sequential with d2l's indices

def lenet(num_classes=10, in_channels=1, *, kit=TORCH):
    """LeNet-5 (sigmoid, average pooling). [N, in_channels, 28, 28] -> [N, num_classes]"""
    return nn.Sequential(
        kit.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        kit.AvgPool2d(kernel_size=2, stride=2),
        kit.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        kit.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes))


def alexnet(num_classes=10, in_channels=1, hidden_features=4096, dropout=0.5, *, kit=TORCH):
    """AlexNet. [N, in_channels, 224, 224] -> [N, num_classes]; ``hidden_features``: the
    width of the two hidden Linear layers."""
    return nn.Sequential(
        kit.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        kit.MaxPool2d(kernel_size=3, stride=2),
        kit.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        kit.MaxPool2d(kernel_size=3, stride=2),
        kit.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        kit.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        kit.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        kit.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, hidden_features), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(hidden_features, hidden_features), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(hidden_features, num_classes))


VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs, in_channels, out_channels, *, kit=TORCH):
    """num_convs x (3x3 conv, pad 1 -> ReLU) -> 2x2 max pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""
    layers = []
    for _ in range(num_convs):
        layers.append(kit.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(kit.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg11(num_classes=10, in_channels=1, conv_arch=None, width_divisor=1, hidden_features=4096,
          input_size=224, dropout=0.5, *, kit=TORCH):
    """VGG-11. [N, in_channels, input_size, input_size] -> [N, num_classes].

    conv_arch: ((num_convs, out_channels), ...), default VGG11_ARCH; each
    out_channels is divided by ``width_divisor`` (d2l's ``ratio``, for small
    models). The classifier's first Linear takes
    channels * (input_size // 2**len(conv_arch))**2 features (512*7*7 for 224).
    """
    conv_arch = VGG11_ARCH if conv_arch is None else conv_arch
    conv_arch = [(n, c // width_divisor) for n, c in conv_arch]
    blocks, channels = [], in_channels
    for num_convs, out_channels in conv_arch:
        blocks.append(vgg_block(num_convs, channels, out_channels, kit=kit))
        channels = out_channels
    side = input_size // 2 ** len(conv_arch)
    if side < 1:
        raise ValueError("input_size %d is too small for %d pooling blocks"
                         % (input_size, len(conv_arch)))
    return nn.Sequential(
        *blocks, nn.Flatten(),
        nn.Linear(channels * side * side, hidden_features), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_features, hidden_features), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_features, num_classes))


def nin_block(in_channels, out_channels, kernel_size, strides, padding, *, kit=TORCH):
    """conv(k, s, p) -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv -> ReLU."""
    return nn.Sequential(
        kit.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
        kit.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        kit.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())


def nin(num_classes=10, in_channels=1, dropout=0.5, *, kit=TORCH):
    """NiN. [N, in_channels, 224, 224] (any side >= 67) -> [N, num_classes]"""
    return nn.Sequential(
        nin_block(in_channels, 96, kernel_size=11, strides=4, padding=0, kit=kit),
        kit.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2, kit=kit),
        kit.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1, kit=kit),
        kit.MaxPool2d(3, stride=2),
        nn.Dropout(dropout),
        nin_block(384, num_classes, kernel_size=3, strides=1, padding=1, kit=kit),
        kit.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten())


class TwinInception(nn.Module):
    """d2l's Inception: four paths concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5;
    3x3 max pool -> 1x1, each conv followed by a ReLU.

    [N, in_channels, H, W] -> [N, c1 + c2[1] + c3[1] + c4, H, W]
    """
    kit = TORCH

    def __init__(self, in_channels, c1, c2, c3, c4):
        super().__init__()
        kit = self.kit
        self.p1_1 = kit.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = kit.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = kit.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = kit.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = kit.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = kit.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = kit.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=1)


def twin_googlenet(num_classes=10, in_channels=1, *, kit=TORCH, inception=TwinInception):
    """d2l's GoogLeNet: Sequential(b1, ..., b5, Linear); ``inception``: the Inception class.
    [N, in_channels, 96, 96] (any side >= 17) -> [N, num_classes]"""
    b1 = nn.Sequential(kit.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                       nn.ReLU(), kit.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(kit.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                       kit.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
                       kit.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b3 = nn.Sequential(inception(192, 64, (96, 128), (16, 32), 32),
                       inception(256, 128, (128, 192), (32, 96), 64),
                       kit.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b4 = nn.Sequential(inception(480, 192, (96, 208), (16, 48), 64),
                       inception(512, 160, (112, 224), (24, 64), 64),
                       inception(512, 128, (128, 256), (24, 64), 64),
                       inception(512, 112, (144, 288), (32, 64), 64),
                       inception(528, 256, (160, 320), (32, 128), 128),
                       kit.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b5 = nn.Sequential(inception(832, 256, (160, 320), (32, 128), 128),
                       inception(832, 384, (192, 384), (48, 128), 128),
                       kit.AdaptiveAvgPool2d((1, 1)),
                       nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))


# ---------------------------------------------------------------------------
# The seed networks for 1x28x28 input

class ResidualBlock(nn.Module):
    """relu(x + conv2(relu(conv1(x)))), 3x3 convolutions with padding 1.

    [N, channels, H, W] -> same
    """
    kit = TORCH

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.conv1 = self.kit.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = self.kit.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = self.conv2(y)
        return torch.relu(x + y)


class ResidualNet(nn.Module):
    """conv -> max pool -> ReLU -> ResidualBlock -> conv -> max pool -> ReLU -> ResidualBlock
    -> Linear. input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 512 ->
    num_classes)."""
    kit = TORCH
    block = ResidualBlock

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = self.kit.Conv2d(in_channels, 16, kernel_size=5)
        self.conv2 = self.kit.Conv2d(16, 32, kernel_size=5)
        self.mp = self.kit.MaxPool2d(2)
        self.rblock1 = self.block(16)
        self.rblock2 = self.block(32)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.rblock1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.rblock2(x)
        return self.fc(torch.flatten(x, 1))


def residual_net(num_classes=10, in_channels=1):
    return ResidualNet(num_classes, in_channels)


class InceptionA(nn.Module):
    """Four branches concatenated to 88 channels, in this order:

    avg pool 3x3 (stride 1, pad 1) -> 1x1 conv (24); 1x1 conv (16);
    1x1 (16) -> 5x5 pad 2 (24); 1x1 (16) -> 3x3 pad 1 (24) -> 3x3 pad 1 (24).
    No activations inside. [N, in_channels, H, W] -> [N, 88, H, W]
    """
    kit = TORCH

    def __init__(self, in_channels):
        super().__init__()
        kit = self.kit
        self.branch_pool_avg = kit.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = kit.Conv2d(in_channels, 24, kernel_size=1)
        self.branch1x1 = kit.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_1 = kit.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_2 = kit.Conv2d(16, 24, kernel_size=5, padding=2)
        self.branch3x3_1 = kit.Conv2d(in_channels, 16, kernel_size=1)
        self.branch3x3_2 = kit.Conv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3_3 = kit.Conv2d(24, 24, kernel_size=3, padding=1)

    def forward(self, x):
        branch_pool = self.branch_pool(self.branch_pool_avg(x))
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_1(x)))
        return torch.cat([branch_pool, branch1x1, branch5x5, branch3x3], dim=1)


class InceptionNet(nn.Module):
    """conv -> max pool -> ReLU -> InceptionA -> conv -> max pool -> ReLU -> InceptionA ->
    Linear. input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 1408 ->
    num_classes)."""
    kit = TORCH
    inception = InceptionA

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = self.kit.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = self.kit.Conv2d(88, 20, kernel_size=5)
        self.incep1 = self.inception(10)
        self.incep2 = self.inception(20)
        self.mp = self.kit.MaxPool2d(2)
        self.fc = nn.Linear(1408, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.incep1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.incep2(x)
        return self.fc(torch.flatten(x, 1))


def inception_net(num_classes=10, in_channels=1):
    return InceptionNet(num_classes, in_channels)


PLAIN = {"lenet": lenet, "residual_net": residual_net, "inception_net": inception_net}


# ---------------------------------------------------------------------------
# torchvision.models.resnet / densenet (written out: torchvision is not a dependency).
# ``bias`` gives every convolution a bias (the seed resnet_classifier); ``norm_layer``
# replaces the kit's BatchNorm2d (e.g. torchvision's FrozenBatchNorm2d).

class TvBasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); 3x3 convs, stride on conv1.

    [N, inplanes, H, W] -> [N, planes, H/stride, W/stride]
    """
    expansion = 1
    kit = TORCH

    def __init__(self, inplanes, planes, stride=1, downsample=None, bias=False, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or self.kit.BatchNorm2d
        self.conv1 = self.kit.Conv2d(inplanes, planes, 3, stride, 1, bias=bias)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = self.kit.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TvBottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), each with BN, ReLU after the residual add
    (v1.5: stride on the 3x3 convolution). [N, inplanes, H, W] -> [N, 4 * planes, H/stride,
    W/stride]"""
    expansion = 4
    kit = TORCH

    def __init__(self, inplanes, planes, stride=1, downsample=None, bias=False, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or self.kit.BatchNorm2d
        self.conv1 = self.kit.Conv2d(inplanes, planes, 1, bias=bias)
        self.bn1 = norm_layer(planes)
        self.conv2 = self.kit.Conv2d(planes, planes, 3, stride, 1, bias=bias)
        self.bn2 = norm_layer(planes)
        self.conv3 = self.kit.Conv2d(planes, planes * self.expansion, 1, bias=bias)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TvResNet(nn.Module):
    """torchvision's ResNet. input [N, in_channels, H, W] -> logits [N, num_classes].

    block: TvBasicBlock or TvBottleneck; layers: blocks per stage; width: channels of
    the stem and of the first stage (stages use width, 2w, 4w, 8w; 64 as torchvision).
    torch's default initialisation.
    """
    kit = TORCH

    def __init__(self, block, layers, num_classes=1000, in_channels=3, width=64, bias=False,
                 norm_layer=None):
        super().__init__()
        self._bias = bias
        self._norm_layer = norm_layer or self.kit.BatchNorm2d
        self.inplanes = width
        self.conv1 = self.kit.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3,
                                     bias=bias)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = self.kit.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = self.kit.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                self.kit.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                                bias=self._bias),
                self._norm_layer(planes * block.expansion))
        kwargs = dict(bias=self._bias, norm_layer=self._norm_layer)
        layers = [block(self.inplanes, planes, stride, downsample, **kwargs)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TvDenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * growth) -> BN-ReLU-3x3 conv (growth) -> dropout (drop_rate).

    forward(a list of tensors, concatenated on channels) -> [N, growth_rate, H, W]
    """
    kit = TORCH

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate=0.0):
        super().__init__()
        kit = self.kit
        self.norm1 = kit.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = kit.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                                stride=1, bias=False)
        self.norm2 = kit.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = kit.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                                padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs):
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class TvDenseBlock(nn.ModuleDict):
    """num_layers dense layers; each sees the concatenation of the input and all earlier outputs.

    [N, C, H, W] -> [N, C + num_layers * growth_rate, H, W]
    """
    dense_layer = TvDenseLayer

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate=0.0):
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1),
                            self.dense_layer(num_input_features + i * growth_rate, growth_rate,
                                             bn_size, drop_rate))

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class TvTransition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 avg pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""
    kit = TORCH

    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = self.kit.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = self.kit.Conv2d(num_input_features, num_output_features, kernel_size=1,
                                    stride=1, bias=False)
        self.pool = self.kit.AvgPool2d(kernel_size=2, stride=2)


class TvDenseNet(nn.Module):
    """torchvision's DenseNet-BC. input [N, in_channels, H, W] -> logits [N, num_classes].

    growth_rate: channels each layer adds; block_config: layers per dense block;
    num_init_features: stem channels; bn_size: bottleneck width factor; drop_rate:
    dropout after each dense layer. ``features`` ends at norm5, before the final ReLU.
    torch's default initialisation.
    """
    kit = TORCH
    dense_block = TvDenseBlock
    transition = TvTransition

    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                 bn_size=4, num_classes=1000, in_channels=3, drop_rate=0.0):
        super().__init__()
        kit = self.kit
        self.features = nn.Sequential(OrderedDict([
            ("conv0", kit.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2,
                                 padding=3, bias=False)),
            ("norm0", kit.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", kit.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module("denseblock%d" % (i + 1),
                                     self.dense_block(num_layers, num_features, bn_size,
                                                      growth_rate, drop_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1),
                                         self.transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", kit.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)

"""DenseNet-121 with torchvision's module names (checkpoints load with strict=True).

Fused ops, on the modules torchvision names (so the keys stay
``features.denseblock1.denselayer1.norm1`` etc.):

- stem: features.conv0 -> norm0 -> ReLU as one conv_bn_relu; pool0 on cnnops MaxPool2d
- dense layer: cat(inputs) -> norm1 -> ReLU as one bn_relu; conv1 (1x1) -> norm2 -> ReLU
  as one conv_bn_relu; conv2 (3x3) on cnnops Conv2d
- transition: norm -> ReLU as one bn_relu; conv (1x1) on cnnops Conv2d; cnnops AvgPool2d
- end: features.norm5 -> ReLU as one bn_relu (torchvision's final F.relu), then
  cnnops AdaptiveAvgPool2d, flatten, classifier (torch Linear)

``model.features`` stays an nn.Sequential that, called on its own, computes what
torchvision's ``features`` does (it ends at norm5, before the final ReLU);
DenseNet.forward walks it with the fused ops instead.
"""
from collections import OrderedDict

import torch
from torch import nn

from .. import nn as cnn
from ..nn import apply_bn_relu, apply_conv_bn_relu

__all__ = ["DenseNet", "densenet121"]


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * growth) -> BN-ReLU-3x3 conv (growth).

    forward(a tensor or a list of tensors, concatenated on channels) -> [N, growth_rate, H, W]
    """

    def __init__(self, num_input_features, growth_rate, bn_size):
        super().__init__()
        self.norm1 = cnn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = cnn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                                stride=1, bias=False)
        self.norm2 = cnn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = cnn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                                padding=1, bias=False)

    def forward(self, input):
        x = torch.cat(input, 1) if isinstance(input, (list, tuple)) else input
        x = apply_bn_relu(self.norm1, x)
        x = apply_conv_bn_relu(self.conv1, self.norm2, x)
        return self.conv2(x)


class _DenseBlock(nn.ModuleDict):
    """num_layers dense layers; each sees the concatenation of the input and all earlier outputs.

    [N, C, H, W] -> [N, C + num_layers * growth_rate, H, W]
    """

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1),
                            _DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                        bn_size))

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN -> ReLU (one bn_relu) -> 1x1 conv -> 2x2 avg pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""

    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = cnn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = cnn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                               bias=False)
        self.pool = cnn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.pool(self.conv(apply_bn_relu(self.norm, x)))


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC on cnnops ops. input [N, in_channels, H, W] -> [N, num_classes].

    growth_rate: channels each layer adds; block_config: layers per dense block;
    num_init_features: stem channels; bn_size: bottleneck width factor.
    Initialisation as torchvision (Kaiming normal convolutions, BN 1/0, Linear bias 0).
    """

    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                 bn_size=4, num_classes=1000, in_channels=3):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", cnn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2,
                                 padding=3, bias=False)),
            ("norm0", cnn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", cnn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module("denseblock%d" % (i + 1),
                                     _DenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1),
                                         _Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", cnn.BatchNorm2d(num_features))
        self.avgpool = cnn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        f = self.features
        x = apply_conv_bn_relu(f.conv0, f.norm0, x)
        x = f.pool0(x)
        for name, module in f.named_children():
            if name.startswith(("denseblock", "transition")):
                x = module(x)
        x = apply_bn_relu(f.norm5, x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def densenet121(num_classes=1000, in_channels=3, growth_rate=32, block_config=(6, 12, 24, 16),
                num_init_features=64, bn_size=4):
    """DenseNet-121 (7,978,856 parameters for 1000 classes). input [N, in_channels, 224, 224]."""
    return DenseNet(growth_rate, block_config, num_init_features, bn_size, num_classes,
                    in_channels)

"""DenseNet-121 with torchvision's module names (checkpoints load with strict=True).

The structure is cnnops.models.plain's torchvision DenseNet (TvDenseNet and its
dense layers, blocks and transitions), built on the cnnops.nn kit; the classes here
subclass it with forwards that run the fused ops on the modules torchvision names
(so the keys stay ``features.denseblock1.denselayer1.norm1`` etc.):

- stem: features.conv0 -> norm0 -> ReLU as one conv_bn_relu; pool0 on cnnops MaxPool2d
- dense layer: cat(inputs) -> norm1 -> ReLU as one bn_relu; conv1 (1x1) -> norm2 -> ReLU
  as one conv_bn_relu; conv2 (3x3) on cnnops Conv2d
- transition: norm -> ReLU as one bn_relu; conv (1x1) on cnnops Conv2d; cnnops AvgPool2d
- end: features.norm5 -> ReLU as one bn_relu (torchvision's final F.relu), then
  cnnops adaptive_avg_pool2d, flatten, classifier (torch Linear)

``model.features`` stays an nn.Sequential that, called on its own, computes what
torchvision's ``features`` does (it ends at norm5, before the final ReLU);
DenseNet.forward walks it with the fused ops instead.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as CF
from ..nn import apply_bn_relu, apply_conv_bn_relu
from . import plain
from ._kit import CNNOPS

__all__ = ["DenseNet", "densenet121"]


class _DenseLayer(plain.TvDenseLayer):
    """BN-ReLU-1x1 conv (bn_size * growth) -> BN-ReLU-3x3 conv (growth) -> dropout (drop_rate).

    forward(a tensor or a list of tensors, concatenated on channels) -> [N, growth_rate, H, W]
    """
    kit = CNNOPS

    def forward(self, input):
        x = torch.cat(input, 1) if isinstance(input, (list, tuple)) else input
        x = apply_bn_relu(self.norm1, x)
        x = apply_conv_bn_relu(self.conv1, self.norm2, x)
        x = self.conv2(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class _DenseBlock(plain.TvDenseBlock):
    """plain.TvDenseBlock of fused dense layers. [N, C, H, W] -> [N, C + layers * growth, H, W]"""
    dense_layer = _DenseLayer


class _Transition(plain.TvTransition):
    """BN -> ReLU (one bn_relu) -> 1x1 conv -> 2x2 avg pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""
    kit = CNNOPS

    def forward(self, x):
        return self.pool(self.conv(apply_bn_relu(self.norm, x)))


class DenseNet(plain.TvDenseNet):
    """torchvision's DenseNet-BC on cnnops ops. input [N, in_channels, H, W] -> [N, num_classes].

    growth_rate: channels each layer adds; block_config: layers per dense block;
    num_init_features: stem channels; bn_size: bottleneck width factor; drop_rate:
    dropout after each dense layer.
    Initialisation as torchvision (Kaiming normal convolutions, BN 1/0, Linear bias 0).
    """
    kit = CNNOPS
    dense_block = _DenseBlock
    transition = _Transition

    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                 bn_size=4, num_classes=1000, in_channels=3, drop_rate=0.0):
        super().__init__(growth_rate, block_config, num_init_features, bn_size, num_classes,
                         in_channels, drop_rate)
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
        x = CF.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def densenet121(num_classes=1000, in_channels=3, growth_rate=32, block_config=(6, 12, 24, 16),
                num_init_features=64, bn_size=4):
    """DenseNet-121 (7,978,856 parameters for 1000 classes). input [N, in_channels, 224, 224]."""
    return DenseNet(growth_rate, block_config, num_init_features, bn_size, num_classes,
                    in_channels)

"""ResNet-18/34/50 with torchvision's module names (checkpoints load with strict=True).

The structure is cnnops.models.plain's torchvision ResNet (TvBasicBlock, TvBottleneck,
TvResNet), built on the cnnops.nn kit; the classes here subclass it with forwards in
which every conv -> BN pair runs as one cnnops::conv_bn_relu call through
cnnops.nn.apply_conv_bn_relu, on the block's own ``convN`` / ``bnN`` modules so the
state_dict keys stay torchvision's:

- stem: conv1 -> bn1 -> ReLU fused; maxpool on cnnops.nn.MaxPool2d
- block interior: conv -> bn -> ReLU fused
- block end: relu(bn(conv(out)) + identity) fused (``residual=identity``)
- downsample (Sequential(conv1x1, bn), keys ``downsample.0`` / ``downsample.1``):
  conv -> bn fused with relu=False
- head: cnnops.nn.AdaptiveAvgPool2d, torch flatten + Linear

(The ``relu`` modules are the torch.nn forward's; the fused forwards do not call them.)

Bottleneck is v1.5 (stride on the 3x3 convolution), as torchvision.
"""
import torch
from torch import nn

from ..nn import apply_conv_bn_relu
from . import plain
from ._kit import CNNOPS

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def _conv_bn_shortcut(downsample, x):
    """The block's shortcut: x, or its downsample (conv -> bn, fused when it is that pair)."""
    if downsample is None:
        return x
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and isinstance(downsample[0], nn.Conv2d)
            and isinstance(downsample[1], nn.BatchNorm2d)):
        return apply_conv_bn_relu(downsample[0], downsample[1], x, relu=False)
    return downsample(x)


class BasicBlock(plain.TvBasicBlock):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); 3x3 convs, stride on conv1.

    [N, inplanes, H, W] -> [N, planes, H/stride, W/stride]
    """
    kit = CNNOPS

    def forward(self, x):
        identity = _conv_bn_shortcut(self.downsample, x)
        out = apply_conv_bn_relu(self.conv1, self.bn1, x)
        return apply_conv_bn_relu(self.conv2, self.bn2, out, residual=identity)


class Bottleneck(plain.TvBottleneck):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), each with BN, ReLU after the residual add.

    [N, inplanes, H, W] -> [N, 4 * planes, H/stride, W/stride]
    """
    kit = CNNOPS

    def forward(self, x):
        identity = _conv_bn_shortcut(self.downsample, x)
        out = apply_conv_bn_relu(self.conv1, self.bn1, x)
        out = apply_conv_bn_relu(self.conv2, self.bn2, out)
        return apply_conv_bn_relu(self.conv3, self.bn3, out, residual=identity)


class ResNet(plain.TvResNet):
    """torchvision's ResNet on cnnops ops. input [N, in_channels, H, W] -> logits [N, num_classes].

    block: BasicBlock or Bottleneck; layers: blocks per stage; width: channels of
    the stem and of the first stage (stages use width, 2w, 4w, 8w; 64 as
    torchvision); conv_bias: give every convolution a bias (torchvision: False).
    Initialisation as torchvision (Kaiming normal, fan_out, for convolutions;
    BN weight 1, bias 0).
    """
    kit = CNNOPS

    def __init__(self, block, layers, num_classes=1000, in_channels=3, width=64, conv_bias=False):
        super().__init__(block, layers, num_classes, in_channels, width, bias=conv_bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = apply_conv_bn_relu(self.conv1, self.bn1, x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes=1000, in_channels=3, layers=(2, 2, 2, 2), width=64):
    """ResNet-18 (11,689,512 parameters for 1000 classes). input [N, in_channels, 224, 224]."""
    return ResNet(BasicBlock, layers, num_classes, in_channels, width)


def resnet34(num_classes=1000, in_channels=3, layers=(3, 4, 6, 3), width=64):
    """ResNet-34 (21,797,672 parameters for 1000 classes). input [N, in_channels, 224, 224]."""
    return ResNet(BasicBlock, layers, num_classes, in_channels, width)


def resnet50(num_classes=1000, in_channels=3, layers=(3, 4, 6, 3), width=64):
    """ResNet-50 v1.5 (25,557,032 parameters for 1000 classes). input [N, in_channels, 224, 224]."""
    return ResNet(Bottleneck, layers, num_classes, in_channels, width)

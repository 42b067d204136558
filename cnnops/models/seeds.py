"""The seed networks: a ResNet-18 classifier with biased convolutions, and two small MNIST nets.

- resnet_classifier: torchvision ResNet-18 layout and names, every convolution
  with bias=True before its BN; conv -> BN (-> + identity) -> ReLU fused as in
  cnnops.models.resnet (a conv bias before BN is honoured by conv_bn_relu).
- inception_net: conv -> max pool -> ReLU -> Inception -> conv -> max pool -> ReLU ->
  Inception -> Linear, for 1x28x28 input. No BN: convolutions on cnnops Conv2d,
  pools on cnnops pooling modules, ReLU and torch.cat stay torch.
- residual_net: conv -> max pool -> ReLU -> ResidualBlock -> conv -> max pool -> ReLU ->
  ResidualBlock -> Linear, for 1x28x28 input; each block is two cnnops::conv2d_relu.

inception_net and residual_net are cnnops.models.plain's InceptionNet / ResidualNet
(their definitions) on the cnnops.nn kit; only ResidualBlock has a forward of its own.
"""
from .. import nn as cnn
from . import plain
from ._kit import CNNOPS
from .resnet import BasicBlock, ResNet

__all__ = ["resnet_classifier", "InceptionA", "InceptionNet", "inception_net", "ResidualBlock",
           "ResidualNet", "residual_net"]


def resnet_classifier(num_classes=11, in_channels=3, layers=(2, 2, 2, 2), width=64):
    """ResNet-18 whose convolutions have biases.

    input [N, in_channels, 224, 224] -> logits [N, num_classes].

    Keys as torchvision's resnet18 plus a ``.bias`` for every convolution
    (conv1.bias, layerX.Y.conv1.bias, layerX.0.downsample.0.bias, ...).
    """
    return ResNet(BasicBlock, layers, num_classes, in_channels, width, conv_bias=True)


class InceptionA(plain.InceptionA):
    """plain.InceptionA (88 channels out, no activations) on cnnops.nn convolutions and pools.

    [N, in_channels, H, W] -> [N, 88, H, W]
    """
    kit = CNNOPS


class InceptionNet(plain.InceptionNet):
    """input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 1408 -> num_classes)."""
    kit = CNNOPS
    inception = InceptionA


def inception_net(num_classes=10, in_channels=1):
    """The Inception seed net for 1x28x28 input."""
    return InceptionNet(num_classes, in_channels)


class ResidualBlock(plain.ResidualBlock):
    """relu(x + conv2(relu(conv1(x)))), 3x3 convolutions with padding 1: two cnnops::conv2d_relu.

    [N, channels, H, W] -> same
    """
    kit = CNNOPS

    def forward(self, x):
        y = cnn.apply_conv_relu(self.conv1, x)
        return cnn.apply_conv_relu(self.conv2, y, residual=x)


class ResidualNet(plain.ResidualNet):
    """input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 512 -> num_classes)."""
    kit = CNNOPS
    block = ResidualBlock


def residual_net(num_classes=10, in_channels=1):
    """The residual seed net for 1x28x28 input."""
    return ResidualNet(num_classes, in_channels)

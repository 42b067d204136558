"""The seed networks: a ResNet-18 classifier with biased convolutions, and two small MNIST nets.

- resnet_classifier: torchvision ResNet-18 layout and names, every convolution
  with bias=True before its BN; conv -> BN (-> + identity) -> ReLU fused as in
  cnnops.models.resnet (a conv bias before BN is honoured by conv_bn_relu).
- inception_net: conv -> max pool -> ReLU -> Inception -> conv -> max pool -> ReLU ->
  Inception -> Linear, for 1x28x28 input. No BN: convolutions on cnnops Conv2d,
  pools on cnnops pooling modules, ReLU and torch.cat stay torch.
- residual_net: conv -> max pool -> ReLU -> ResidualBlock -> conv -> max pool -> ReLU ->
  ResidualBlock -> Linear, for 1x28x28 input; each block is two cnnops::conv2d_relu.
"""
import torch
from torch import nn

from .. import functional as CF
from .. import nn as cnn
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


class InceptionA(nn.Module):
    """Four branches concatenated to 88 channels, in this order:

    avg pool 3x3 (stride 1, pad 1) -> 1x1 conv (24); 1x1 conv (16);
    1x1 (16) -> 5x5 pad 2 (24); 1x1 (16) -> 3x3 pad 1 (24) -> 3x3 pad 1 (24).
    No activations inside. [N, in_channels, H, W] -> [N, 88, H, W]
    """

    def __init__(self, in_channels):
        super().__init__()
        self.branch_pool_avg = cnn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = cnn.Conv2d(in_channels, 24, kernel_size=1)
        self.branch1x1 = cnn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_1 = cnn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_2 = cnn.Conv2d(16, 24, kernel_size=5, padding=2)
        self.branch3x3_1 = cnn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch3x3_2 = cnn.Conv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3_3 = cnn.Conv2d(24, 24, kernel_size=3, padding=1)

    def forward(self, x):
        branch_pool = self.branch_pool(self.branch_pool_avg(x))
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_1(x)))
        return torch.cat([branch_pool, branch1x1, branch5x5, branch3x3], dim=1)


class InceptionNet(nn.Module):
    """input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 1408 -> num_classes)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = cnn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = cnn.Conv2d(88, 20, kernel_size=5)
        self.incep1 = InceptionA(in_channels=10)
        self.incep2 = InceptionA(in_channels=20)
        self.mp = cnn.MaxPool2d(2)
        self.fc = nn.Linear(1408, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.incep1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.incep2(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def inception_net(num_classes=10, in_channels=1):
    """The Inception seed net for 1x28x28 input."""
    return InceptionNet(num_classes, in_channels)


class ResidualBlock(nn.Module):
    """relu(x + conv2(relu(conv1(x)))), 3x3 convolutions with padding 1: two cnnops::conv2d_relu.

    [N, channels, H, W] -> same
    """

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.conv1 = cnn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = cnn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        y = cnn.apply_conv_relu(self.conv1, x)
        return cnn.apply_conv_relu(self.conv2, y, residual=x)


class ResidualNet(nn.Module):
    """input [N, in_channels, 28, 28] -> logits [N, num_classes] (Linear 512 -> num_classes)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = cnn.Conv2d(in_channels, 16, kernel_size=5)
        self.conv2 = cnn.Conv2d(16, 32, kernel_size=5)
        self.mp = cnn.MaxPool2d(2)
        self.rblock1 = ResidualBlock(16)
        self.rblock2 = ResidualBlock(32)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.rblock1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.rblock2(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def residual_net(num_classes=10, in_channels=1):
    """The residual seed net for 1x28x28 input."""
    return ResidualNet(num_classes, in_channels)

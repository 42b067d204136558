"""GoogLeNet as in Dive into Deep Learning (ch. 7.4 / 8.4), for 96x96 input.

No BatchNorm: inside the Inception blocks each conv -> ReLU is one
cnnops::conv2d_relu (apply_conv_relu); cnnops.fuse does the same for the
stem Sequentials, which keep d2l's Conv2d, ReLU indices; pools are cnnops.nn.MaxPool2d / AdaptiveAvgPool2d; torch.cat joins the
Inception paths. Module names and indices as in d2l (net = Sequential(b1, ..., b5,
Linear); Inception.p1_1 ... p4_2).
"""
import torch
from torch import nn

from .. import nn as cnn
from ..fuse import fuse

__all__ = ["Inception", "googlenet"]


class Inception(nn.Module):
    """Four paths concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1.

    [N, in_channels, H, W] -> [N, c1 + c2[1] + c3[1] + c4, H, W]
    """

    def __init__(self, in_channels, c1, c2, c3, c4):
        super().__init__()
        self.p1_1 = cnn.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = cnn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = cnn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = cnn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = cnn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = cnn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = cnn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        p1 = cnn.apply_conv_relu(self.p1_1, x)
        p2 = cnn.apply_conv_relu(self.p2_2, cnn.apply_conv_relu(self.p2_1, x))
        p3 = cnn.apply_conv_relu(self.p3_2, cnn.apply_conv_relu(self.p3_1, x))
        p4 = cnn.apply_conv_relu(self.p4_2, self.p4_1(x))
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet(num_classes=10, in_channels=1):
    """GoogLeNet. input [N, in_channels, 96, 96] (any side >= 17) -> logits [N, num_classes]."""
    b1 = nn.Sequential(cnn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                       nn.ReLU(), cnn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(cnn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                       cnn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
                       cnn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                       Inception(256, 128, (128, 192), (32, 96), 64),
                       cnn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                       Inception(512, 160, (112, 224), (24, 64), 64),
                       Inception(512, 128, (128, 256), (24, 64), 64),
                       Inception(512, 112, (144, 288), (32, 64), 64),
                       Inception(528, 256, (160, 320), (32, 128), 128),
                       cnn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                       Inception(832, 384, (192, 384), (48, 128), 128),
                       cnn.AdaptiveAvgPool2d((1, 1)),
                       nn.Flatten())
    return fuse(nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes)), inplace=True)

"""GoogLeNet as in Dive into Deep Learning (ch. 7.4 / 8.4), for 96x96 input.

cnnops.models.plain.twin_googlenet on the cnnops.nn kit, with this Inception. No
BatchNorm: inside the Inception blocks each conv -> ReLU is one cnnops::conv2d_relu
(apply_conv_relu); cnnops.fuse does the same for the stem Sequentials, which keep
d2l's Conv2d, ReLU indices; pools are cnnops.nn.MaxPool2d / AdaptiveAvgPool2d;
torch.cat joins the Inception paths. Module names and indices as in d2l (net =
Sequential(b1, ..., b5, Linear); Inception.p1_1 ... p4_2).
"""
import torch

from .. import nn as cnn
from ..fuse import fuse
from . import plain
from ._kit import CNNOPS

__all__ = ["Inception", "googlenet"]


class Inception(plain.TwinInception):
    """Four paths concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1.

    plain.TwinInception on the cnnops.nn kit, each conv -> ReLU one cnnops::conv2d_relu.
    [N, in_channels, H, W] -> [N, c1 + c2[1] + c3[1] + c4, H, W]
    """
    kit = CNNOPS

    def forward(self, x):
        p1 = cnn.apply_conv_relu(self.p1_1, x)
        p2 = cnn.apply_conv_relu(self.p2_2, cnn.apply_conv_relu(self.p2_1, x))
        p3 = cnn.apply_conv_relu(self.p3_2, cnn.apply_conv_relu(self.p3_1, x))
        p4 = cnn.apply_conv_relu(self.p4_2, self.p4_1(x))
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet(num_classes=10, in_channels=1):
    """GoogLeNet. input [N, in_channels, 96, 96] (any side >= 17) -> logits [N, num_classes]."""
    return fuse(plain.twin_googlenet(num_classes, in_channels, kit=CNNOPS, inception=Inception),
                inplace=True)

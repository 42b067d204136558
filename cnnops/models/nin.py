"""Network in Network as in Dive into Deep Learning (ch. 7.3).

No BatchNorm: written as d2l's Sequential (Conv2d, ReLU, ...); cnnops.fuse
turns each conv -> ReLU into one cnnops::conv2d_relu (same module tree and keys); pools are cnnops.nn.MaxPool2d / cnnops.nn.AdaptiveAvgPool2d.
Same module indices as d2l.
"""
from torch import nn

from .. import nn as cnn
from ..fuse import fuse

__all__ = ["nin_block", "nin"]


def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    """conv(k, s, p) -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv -> ReLU."""
    return nn.Sequential(
        cnn.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
        cnn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        cnn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())


def nin(num_classes=10, in_channels=1, dropout=0.5):
    """NiN. input [N, in_channels, 224, 224] (any side >= 67) -> logits [N, num_classes]."""
    return fuse(nn.Sequential(
        nin_block(in_channels, 96, kernel_size=11, strides=4, padding=0),
        cnn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        cnn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        cnn.MaxPool2d(3, stride=2),
        nn.Dropout(dropout),
        nin_block(384, num_classes, kernel_size=3, strides=1, padding=1),
        cnn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten()), inplace=True)

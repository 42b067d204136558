"""Network in Network as in Dive into Deep Learning (ch. 7.3).

No BatchNorm: d2l's Sequential (Conv2d, ReLU, ...), cnnops.models.plain.nin on the
cnnops.nn kit; cnnops.fuse turns each conv -> ReLU into one cnnops::conv2d_relu
(same module tree and keys); pools are cnnops.nn.MaxPool2d /
cnnops.nn.AdaptiveAvgPool2d. Same module indices as d2l.
"""
from ..fuse import fuse
from . import plain
from ._kit import CNNOPS

__all__ = ["nin_block", "nin"]


def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    """conv(k, s, p) -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv -> ReLU."""
    return plain.nin_block(in_channels, out_channels, kernel_size, strides, padding, kit=CNNOPS)


def nin(num_classes=10, in_channels=1, dropout=0.5):
    """NiN. input [N, in_channels, 224, 224] (any side >= 67) -> logits [N, num_classes]."""
    return fuse(plain.nin(num_classes, in_channels, dropout, kit=CNNOPS), inplace=True)

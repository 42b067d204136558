"""VGG-11 as in Dive into Deep Learning (ch. 7.2).

Blocks of 3x3 pad-1 convolutions + ReLU, each block ending in a 2x2 max pool.
No BatchNorm: written as d2l's Sequential (Conv2d, ReLU, ...); cnnops.fuse
turns each conv -> ReLU into one cnnops::conv2d_relu (same module tree and keys); pools are cnnops.nn.MaxPool2d; the MLP
head stays torch. Same module indices as d2l's ``vgg(conv_arch)``.
"""
from torch import nn

from .. import nn as cnn
from ..fuse import fuse

__all__ = ["VGG11_ARCH", "vgg_block", "vgg11"]

VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs, in_channels, out_channels):
    """num_convs x (3x3 conv, pad 1 -> ReLU) -> 2x2 max pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""
    layers = []
    for _ in range(num_convs):
        layers.append(cnn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(cnn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg11(num_classes=10, in_channels=1, conv_arch=None, width_divisor=1, hidden_features=4096,
          input_size=224, dropout=0.5):
    """VGG-11. input [N, in_channels, input_size, input_size] -> logits [N, num_classes].

    conv_arch: ((num_convs, out_channels), ...), default VGG11_ARCH; each
    out_channels is divided by ``width_divisor`` (d2l's ``ratio``, for small
    models). The classifier's first Linear takes
    channels * (input_size // 2**len(conv_arch))**2 features (512*7*7 for 224).
    """
    conv_arch = VGG11_ARCH if conv_arch is None else conv_arch
    conv_arch = [(n, c // width_divisor) for n, c in conv_arch]
    blocks, channels = [], in_channels
    for num_convs, out_channels in conv_arch:
        blocks.append(vgg_block(num_convs, channels, out_channels))
        channels = out_channels
    side = input_size // 2 ** len(conv_arch)
    if side < 1:
        raise ValueError("input_size %d is too small for %d pooling blocks"
                         % (input_size, len(conv_arch)))
    return fuse(nn.Sequential(
        *blocks, nn.Flatten(),
        nn.Linear(channels * side * side, hidden_features), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_features, hidden_features), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_features, num_classes)), inplace=True)

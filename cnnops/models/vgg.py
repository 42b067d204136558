"""VGG-11 as in Dive into Deep Learning (ch. 7.2).

Blocks of 3x3 pad-1 convolutions + ReLU, each block ending in a 2x2 max pool.
No BatchNorm: d2l's Sequential (Conv2d, ReLU, ...), cnnops.models.plain.vgg11 on
the cnnops.nn kit; cnnops.fuse turns each conv -> ReLU into one cnnops::conv2d_relu
(same module tree and keys); pools are cnnops.nn.MaxPool2d; the MLP head stays
torch. Same module indices as d2l's ``vgg(conv_arch)``.
"""
from ..fuse import fuse
from . import plain
from ._kit import CNNOPS
from .plain import VGG11_ARCH

__all__ = ["VGG11_ARCH", "vgg_block", "vgg11"]


def vgg_block(num_convs, in_channels, out_channels):
    """num_convs x (3x3 conv, pad 1 -> ReLU) -> 2x2 max pool. [N, C, H, W] -> [N, OC, H/2, W/2]"""
    return plain.vgg_block(num_convs, in_channels, out_channels, kit=CNNOPS)


def vgg11(num_classes=10, in_channels=1, conv_arch=None, width_divisor=1, hidden_features=4096,
          input_size=224, dropout=0.5):
    """VGG-11. input [N, in_channels, input_size, input_size] -> logits [N, num_classes].

    conv_arch: ((num_convs, out_channels), ...), default VGG11_ARCH; each
    out_channels is divided by ``width_divisor`` (d2l's ``ratio``, for small
    models). The classifier's first Linear takes
    channels * (input_size // 2**len(conv_arch))**2 features (512*7*7 for 224).
    """
    return fuse(plain.vgg11(num_classes, in_channels, conv_arch, width_divisor, hidden_features,
                            input_size, dropout, kit=CNNOPS), inplace=True)

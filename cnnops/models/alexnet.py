"""AlexNet as in Dive into Deep Learning (ch. 7.1): one input channel, 224x224 input.

AlexNet has no BatchNorm: the model is d2l's Sequential (Conv2d, ReLU, ...),
cnnops.models.plain.alexnet on the cnnops.nn kit, and cnnops.fuse turns each conv
-> ReLU into one cnnops::conv2d_relu without changing the module tree or its
state_dict keys. Pools are cnnops.nn.MaxPool2d; the MLP head (Linear, ReLU, Dropout)
stays torch. Same nn.Sequential indices as d2l.
"""
from ..fuse import fuse
from . import plain
from ._kit import CNNOPS

__all__ = ["alexnet"]


def alexnet(num_classes=10, in_channels=1, hidden_features=4096, dropout=0.5):
    """AlexNet. input [N, in_channels, 224, 224] -> logits [N, num_classes].

    46,764,746 parameters with the defaults. ``hidden_features`` (4096) is the
    width of the two hidden Linear layers; smaller values make cheap test models.
    """
    return fuse(plain.alexnet(num_classes, in_channels, hidden_features, dropout, kit=CNNOPS),
                inplace=True)

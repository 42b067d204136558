"""AlexNet as in Dive into Deep Learning (ch. 7.1): one input channel, 224x224 input.

AlexNet has no BatchNorm: the model is written as d2l's Sequential (Conv2d,
ReLU, ...) and cnnops.fuse turns each conv -> ReLU into one cnnops::conv2d_relu
without changing the module tree or its state_dict keys. Pools are cnnops.nn.MaxPool2d; the MLP head
(Linear, ReLU, Dropout) stays torch. Same nn.Sequential indices as d2l.
"""
from torch import nn

from .. import nn as cnn
from ..fuse import fuse

__all__ = ["alexnet"]


def alexnet(num_classes=10, in_channels=1, hidden_features=4096, dropout=0.5):
    """AlexNet. input [N, in_channels, 224, 224] -> logits [N, num_classes].

    46,764,746 parameters with the defaults. ``hidden_features`` (4096) is the
    width of the two hidden Linear layers; smaller values make cheap test models.
    """
    return fuse(nn.Sequential(
        cnn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        cnn.MaxPool2d(kernel_size=3, stride=2),
        cnn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        cnn.MaxPool2d(kernel_size=3, stride=2),
        cnn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        cnn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        cnn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        cnn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, hidden_features), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(hidden_features, hidden_features), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(hidden_features, num_classes)), inplace=True)

"""LeNet-5 as in Dive into Deep Learning (ch. 6.6): sigmoid activations, average pooling.

No BatchNorm, so there is nothing to fuse: the convolutions and pools run on
cnnops.nn.Conv2d / cnnops.nn.AvgPool2d, the sigmoids and the MLP head stay torch.
The model is an nn.Sequential with d2l's layer indices, so d2l checkpoints
("0.weight", "3.weight", "7.weight", ...) load unchanged.
"""
from torch import nn

from .. import nn as cnn

__all__ = ["lenet"]


def lenet(num_classes=10, in_channels=1):
    """LeNet-5. input [N, in_channels, 28, 28] -> logits [N, num_classes].

    61,706 parameters with the defaults.
    """
    return nn.Sequential(
        cnn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        cnn.AvgPool2d(kernel_size=2, stride=2),
        cnn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        cnn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes))

"""LeNet-5 as in Dive into Deep Learning (ch. 6.6): sigmoid activations, average pooling.

No BatchNorm, so there is nothing to fuse: the network is cnnops.models.plain.lenet
built on the cnnops.nn kit, so the convolutions and pools run on cnnops.nn.Conv2d /
cnnops.nn.AvgPool2d, the sigmoids and the MLP head stay torch. The model is an
nn.Sequential with d2l's layer indices, so d2l checkpoints ("0.weight", "3.weight",
"7.weight", ...) load unchanged.
"""
from . import plain
from ._kit import CNNOPS

__all__ = ["lenet"]


def lenet(num_classes=10, in_channels=1):
    """LeNet-5. input [N, in_channels, 28, 28] -> logits [N, num_classes].

    61,706 parameters with the defaults.
    """
    return plain.lenet(num_classes, in_channels, kit=CNNOPS)

"""Layer kits: the layer classes a network in cnnops.models is built from.

Each network is defined once, in cnnops.models.plain, on a kit: TORCH (torch.nn's
modules) gives the plain twin, CNNOPS (cnnops.nn's drop-in subclasses: the same
constructor arguments, attributes and state_dict keys) the cnnops network. Linear,
ReLU, Sigmoid, Flatten, Dropout and the containers are torch.nn's in both.
"""
from collections import namedtuple

from torch import nn

from .. import nn as cnn

Kit = namedtuple("Kit", "name Conv2d BatchNorm2d MaxPool2d AvgPool2d AdaptiveAvgPool2d")

TORCH = Kit("torch", nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
CNNOPS = Kit("cnnops", cnn.Conv2d, cnn.BatchNorm2d, cnn.MaxPool2d, cnn.AvgPool2d,
             cnn.AdaptiveAvgPool2d)

"""The reference models, built from cnnops.nn modules and fused ops.

Each network is defined once, in cnnops.models.plain (its plain torch.nn twin), on a
layer kit; the constructors here build it on the cnnops.nn kit, with fused forwards,
so a model and its twin have the same state_dict keys.

Each constructor takes ``num_classes`` (and ``in_channels``); ``resnet*`` and
``densenet121`` have torchvision's state_dict keys, the d2l models (lenet,
alexnet, vgg11, nin, googlenet) d2l's nn.Sequential indices.

MODELS maps each name to (constructor, example input shape) for tools:

    fn, shape = cnnops.models.MODELS["resnet18"]
    logits = fn()(torch.randn(shape))
"""
from .alexnet import alexnet
from .densenet import DenseNet, densenet121
from .googlenet import Inception, googlenet
from .lenet import lenet
from .nin import nin, nin_block
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from .seeds import inception_net, residual_net, resnet_classifier
from .vgg import vgg11, vgg_block

MODELS = {
    "lenet": (lenet, (1, 1, 28, 28)),
    "alexnet": (alexnet, (1, 1, 224, 224)),
    "vgg11": (vgg11, (1, 1, 224, 224)),
    "nin": (nin, (1, 1, 224, 224)),
    "googlenet": (googlenet, (1, 1, 96, 96)),
    "resnet18": (resnet18, (1, 3, 224, 224)),
    "resnet34": (resnet34, (1, 3, 224, 224)),
    "resnet50": (resnet50, (1, 3, 224, 224)),
    "densenet121": (densenet121, (1, 3, 224, 224)),
    "resnet_classifier": (resnet_classifier, (1, 3, 224, 224)),
    "inception_net": (inception_net, (1, 1, 28, 28)),
    "residual_net": (residual_net, (1, 1, 28, 28)),
}

__all__ = ["MODELS", "lenet", "alexnet", "vgg11", "nin", "googlenet", "resnet18", "resnet34",
           "resnet50", "densenet121", "resnet_classifier", "inception_net", "residual_net",
           "ResNet", "BasicBlock", "Bottleneck", "DenseNet", "Inception", "vgg_block",
           "nin_block"]

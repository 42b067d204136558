"""Plain torch.nn twins of the cnnops.models the benchmarks time.

Unfused PyTorch with the same module names (so state_dicts transfer with
strict=True), defined in cnnops.models.plain, where tests/test_models.py checks
them against cnnops.models.

These are the baseline "torch eager" models: conv -> BatchNorm2d -> ReLU(inplace)
as separate modules, running PyTorch's native kernels (oneDNN/MKL on CPU, cuDNN on
GPU).
"""
from cnnops.models.plain import TvBasicBlock, TvBottleneck, TvDenseNet, TvResNet, twin_googlenet

__all__ = ["TvBasicBlock", "TvBottleneck", "TvResNet", "TvDenseNet", "twin_googlenet", "TWINS"]


# name -> (plain twin constructor, cnnops.models constructor name, input channels)
TWINS = {
    "resnet_classifier": (lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=11, bias=True),
                          "resnet_classifier", 3),
    "resnet18": (lambda: TvResNet(TvBasicBlock, [2, 2, 2, 2]), "resnet18", 3),
    "resnet50": (lambda: TvResNet(TvBottleneck, [3, 4, 6, 3]), "resnet50", 3),
    "densenet121": (lambda: TvDenseNet(), "densenet121", 3),
    "googlenet": (lambda: twin_googlenet(), "googlenet", 1),
}

"""Plain torch.nn definitions of the small seed networks, as the course notes give them.

Same module names as their cnnops versions, so state_dicts transfer both ways:
``plain.residual_net().load_state_dict(cnnops.models.residual_net().state_dict())``.
The main job (python -m cnnops) trains each pair from the same initial weights.
"""
import torch
from torch import nn

__all__ = ["lenet", "residual_net", "inception_net", "PLAIN"]


def lenet(num_classes=10, in_channels=1):
    """LeNet-5 (sigmoid, average pooling). [N, in_channels, 28, 28] -> [N, num_classes]"""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes))


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = self.conv2(y)
        return torch.relu(x + y)


class ResidualNet(nn.Module):
    """[N, in_channels, 28, 28] -> [N, num_classes]"""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.mp = nn.MaxPool2d(2)
        self.rblock1 = ResidualBlock(16)
        self.rblock2 = ResidualBlock(32)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.rblock1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.rblock2(x)
        return self.fc(torch.flatten(x, 1))


def residual_net(num_classes=10, in_channels=1):
    return ResidualNet(num_classes, in_channels)


class InceptionA(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch_pool_avg = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = nn.Conv2d(in_channels, 24, kernel_size=1)
        self.branch1x1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_2 = nn.Conv2d(16, 24, kernel_size=5, padding=2)
        self.branch3x3_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch3x3_2 = nn.Conv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3_3 = nn.Conv2d(24, 24, kernel_size=3, padding=1)

    def forward(self, x):
        branch_pool = self.branch_pool(self.branch_pool_avg(x))
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_1(x)))
        return torch.cat([branch_pool, branch1x1, branch5x5, branch3x3], dim=1)


class InceptionNet(nn.Module):
    """[N, in_channels, 28, 28] -> [N, num_classes]"""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(88, 20, kernel_size=5)
        self.incep1 = InceptionA(10)
        self.incep2 = InceptionA(20)
        self.mp = nn.MaxPool2d(2)
        self.fc = nn.Linear(1408, num_classes)

    def forward(self, x):
        x = torch.relu(self.mp(self.conv1(x)))
        x = self.incep1(x)
        x = torch.relu(self.mp(self.conv2(x)))
        x = self.incep2(x)
        return self.fc(torch.flatten(x, 1))


def inception_net(num_classes=10, in_channels=1):
    return InceptionNet(num_classes, in_channels)


PLAIN = {"lenet": lenet, "residual_net": residual_net, "inception_net": inception_net}

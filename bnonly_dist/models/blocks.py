"""Residual blocks and the ResNet skeleton shared by the CIFAR and ImageNet families
(torchvision's parameter names: conv1, bn1, layerN.i.*, downsample, fc)."""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.models.layers import BatchNorm2d, Conv2d, ReLU, Stage


def downsample(f_in: int, f_out: int, stride: int) -> nn.Module | None:
    """The 1x1 conv + BN projection shortcut where the shape changes (None: identity)."""
    if stride == 1 and f_in == f_out:
        return None
    return nn.Sequential(Conv2d(f_in, f_out, 1, stride, bias=False), BatchNorm2d(f_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, f_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = Conv2d(f_in, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.relu = ReLU()
        self.downsample = downsample(f_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, f_in: int, planes: int, stride: int):
        super().__init__()
        f_out = planes * self.expansion
        self.conv1 = Conv2d(f_in, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, f_out, 1, bias=False)
        self.bn3 = BatchNorm2d(f_out)
        self.relu = ReLU()
        self.downsample = downsample(f_in, f_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        out = self.bn2(self.conv2(out), relu=True)
        out = self.bn3(self.conv3(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A stem (subclass), residual stages layer1..layerK, global average pool, linear output.

    Stage s has planes[s] planes and blocks[s] blocks; its first block has stride 2 from
    the second stage on, and a projection shortcut wherever the shape changes.
    """

    def build_stages(self, block: type[nn.Module], f_in: int, planes: list[int], blocks: list[int],
                     num_classes: int) -> None:
        for number, (width, count) in enumerate(zip(planes, blocks), 1):
            layers = []
            for i in range(count):
                layers.append(block(f_in, width, 2 if number > 1 and i == 0 else 1))
                f_in = width * block.expansion
            self.add_module(f"layer{number}", Stage(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(f_in, num_classes)

    def stages(self) -> list[Stage]:
        return [m for name, m in self.named_children() if name.startswith("layer")]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

"""Residual blocks shared by the CIFAR and ImageNet ResNets (torchvision's parameter names)."""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.models.layers import BatchNorm2d, Conv2d, ReLU


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

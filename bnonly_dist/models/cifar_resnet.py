"""CIFAR ResNet-N (N = 6D + 2) of He et al. 2016 in OpenLTH's layout; width W = base channels.

Stem 3x3 conv (3 -> W) + BN + ReLU, three stages of D basic blocks with W, 2W, 4W
channels, then the shared pool and linear head (blocks.ResNet). Depth is checked by
catalog.parse_arch.
"""
from __future__ import annotations

import torch

from bnonly_dist.models.blocks import BasicBlock, ResNet
from bnonly_dist.models.layers import BatchNorm2d, Conv2d


class CifarResNet(ResNet):
    def __init__(self, depth: int, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        blocks = (depth - 2) // 6
        self.build_stages(BasicBlock, width, [width, 2 * width, 4 * width], [blocks] * 3, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x), relu=True)

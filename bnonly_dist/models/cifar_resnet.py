"""CIFAR ResNet-N (N = 6D + 2) of He et al. 2016 in OpenLTH's layout; width W = base channels.

Stem 3x3 conv (3 -> W) + BN, three stages of D basic blocks with W, 2W, 4W channels
(stride 2 at the first block of stages 2 and 3), 1x1 conv + BN shortcut
(`downsample`, as torchvision names it) where the shape changes, global average pool,
linear output.
"""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.models.blocks import BasicBlock
from bnonly_dist.models.layers import BatchNorm2d, Conv2d, Stage


class CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int = 16, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        f_in = width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(f_in, f_out, stride))
                f_in = f_out
            self.add_module(f"layer{stage + 1}", Stage(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(f_in, num_classes)

    def stages(self) -> list[Stage]:
        return [m for name, m in self.named_children() if name.startswith("layer")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x), relu=True)
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))

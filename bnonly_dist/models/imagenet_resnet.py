"""ImageNet ResNets in torchvision's layout (parameter names match torchvision's).

Width W scales every stage (W, 2W, 4W, 8W planes; torchvision's ResNets have W = 64), as
in OpenLTH's imagenet_resnet_D_W. Own implementation: torchvision is optional.
"""
from __future__ import annotations

import torch
from torch import nn

from bnonly_dist.models.blocks import BasicBlock, downsample
from bnonly_dist.models.layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Stage

STAGE_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


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


class ImageNetResNet(nn.Module):
    def __init__(self, depth: int, width: int = 64, num_classes: int = 1000):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        kind, counts = STAGE_BLOCKS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.maxpool = MaxPool2d(3, 2, 1)
        f_in = width
        for stage, count in enumerate(counts):
            planes = width * 2**stage
            layers = []
            for i in range(count):
                layers.append(block(f_in, planes, 2 if stage > 0 and i == 0 else 1))
                f_in = planes * block.expansion
            self.add_module(f"layer{stage + 1}", Stage(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(f_in, num_classes)

    def stages(self) -> list[Stage]:
        return [m for name, m in self.named_children() if name.startswith("layer")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x), relu=True))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

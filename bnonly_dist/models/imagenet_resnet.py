"""ImageNet ResNets in torchvision's layout (parameter names match torchvision's).

Width W scales every stage (W, 2W, 4W, 8W planes; torchvision's ResNets have W = 64), as
in OpenLTH's imagenet_resnet_D_W. Own implementation: torchvision is optional. Depth is
checked by catalog.parse_arch, which also holds the blocks per stage (STAGE_BLOCKS).
"""
from __future__ import annotations

import torch

from bnonly_dist.config.catalog import STAGE_BLOCKS
from bnonly_dist.models.blocks import BasicBlock, Bottleneck, ResNet
from bnonly_dist.models.layers import BatchNorm2d, Conv2d, MaxPool2d


class ImageNetResNet(ResNet):
    def __init__(self, depth: int, width: int = 64, num_classes: int = 1000):
        super().__init__()
        kind, counts = STAGE_BLOCKS[depth]
        self.conv1 = Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.maxpool = MaxPool2d(3, 2, 1)
        block = BasicBlock if kind == "basic" else Bottleneck
        self.build_stages(block, width, [width * 2**s for s in range(4)], list(counts), num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.bn1(self.conv1(x), relu=True))

"""The paper's CIFAR-10 test accuracies (%), read off its v1 figure (+-1-2 points).

Frankle, Schwab & Morcos, "Training BatchNorm and Only BatchNorm", ICLR 2021. Keys are
our architecture names; WRN-14-k is cifar_resnet_14 with base width 16k.
"""
from __future__ import annotations

MODES = ("all", "bn", "bn_shortcut_output", "shortcut_output")
_ROWS = {
    "cifar_resnet_14": (90.5, 48, 63, 48.5),
    "cifar_resnet_32": (92.3, 57.5, 66.5, 45.5),
    "cifar_resnet_56": (93, 63, 71, 42.5),
    "cifar_resnet_110": (93.3, 69.5, 74.5, 19),
    "cifar_resnet_218": (93.3, 76, 78, 17),
    "cifar_resnet_434": (93, 80, 80, 12.5),
    "cifar_resnet_866": (92.8, 82.5, 81.5, 13),  # bn: "82-83"
    "cifar_resnet_14_32": (93, 53, 72.5, 57.5),  # WRN-14-2
    "cifar_resnet_14_64": (94, 59.5, 79.5, 66),  # WRN-14-4
    "cifar_resnet_14_128": (94.7, 64.5, 83.5, 73),  # WRN-14-8
    "cifar_resnet_14_256": (95, 68, 85.5, 77.5),  # WRN-14-16
    "cifar_resnet_14_512": (95.2, 73, 87, 80),  # WRN-14-32
}
CIFAR10_TOP1 = {(arch, mode): row[i] for arch, row in _ROWS.items() for i, mode in enumerate(MODES)}


def top1(dataset: str, arch: str, mode: str) -> float | None:
    return CIFAR10_TOP1.get((arch, mode)) if dataset == "cifar10" else None

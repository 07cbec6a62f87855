import json
import subprocess
import sys

import pytest
import torch

from bnonly_dist import models
from bnonly_dist.models.init import initialize

# docs/paper.md: (arch, total, BN, output, shortcut 1x1 or None)
PAPER_COUNTS = [
    ("cifar_resnet_14", 175_258, 1_120, 650, 2_560),
    ("cifar_resnet_32", 466_906, 2_464, 650, 2_560),
    ("cifar_resnet_56", 855_770, 4_256, 650, 2_560),
    ("cifar_resnet_110", 1_730_714, 8_288, 650, 2_560),
    ("cifar_resnet_218", 3_480_602, 16_352, 650, 2_560),
    ("cifar_resnet_434", 6_980_378, 32_480, 650, 2_560),
    ("cifar_resnet_866", 13_979_930, 64_736, 650, 2_560),
    ("cifar_resnet_14_32", 696_618, 2_240, 1_290, 10_240),
    ("cifar_resnet_14_64", 2_777_674, 4_480, 2_570, 40_960),
    ("cifar_resnet_14_128", 11_093_130, 8_960, 5_130, 163_840),
    ("cifar_resnet_14_256", 44_337_418, 17_920, 10_250, 655_360),
    ("cifar_resnet_14_512", 177_279_498, 35_840, 20_490, 2_621_440),
    ("imagenet_resnet_18", 11_689_512, 9_600, 513_000, None),
    ("imagenet_resnet_34", 21_797_672, 17_024, 513_000, None),
    ("imagenet_resnet_50", 25_557_032, 53_120, 2_049_000, None),
    ("imagenet_resnet_101", 44_549_160, 105_344, 2_049_000, None),
    ("imagenet_resnet_152", 60_192_808, 151_424, 2_049_000, None),
    ("imagenet_resnet_200", 64_673_832, 176_000, 2_049_000, None),
]


@pytest.mark.parametrize("arch, total, bn, output, shortcut", PAPER_COUNTS)
def test_parameter_counts_match_the_paper(arch, total, bn, output, shortcut):
    counts = models.info(arch)
    assert (counts["total"], counts["bn"], counts["output"]) == (total, bn, output)
    if shortcut is not None:
        assert counts["shortcut"] == shortcut
    assert counts["conv"] + counts["shortcut"] + counts["bn"] + counts["output"] == total


def test_wide_imagenet_resnet50_matches_openlth():
    assert models.info("imagenet_resnet_50_128")["total"] == 98_004_072


def test_model_info_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "model-info", "cifar_resnet_110"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert (info["total"], info["bn"], info["output"], info["shortcut"]) == (1_730_714, 8_288, 650, 2_560)


@pytest.mark.parametrize("arch, size", [("cifar_resnet_20", 32), ("cifar_resnet_14_32", 32), ("imagenet_resnet_18", 64),
                                        ("imagenet_resnet_50_16", 64)])
def test_forward_shapes(arch, size):
    model = models.build(arch, 7, seed=0)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_init_is_a_function_of_seed_and_name():
    a = models.build("cifar_resnet_20", 10, seed=5)
    b = models.build("cifar_resnet_20", 10, seed=5)
    c = models.build("cifar_resnet_20", 10, seed=6)
    roles = models.parameter_roles(a)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if roles[name] != "bn" or name.endswith("weight"):  # BN beta is 0 for every seed
            assert not torch.equal(pa, pc), name
    # A deeper net shares the layers it has in common: numbers depend on names only.
    deep = dict(models.build("cifar_resnet_32", 10, seed=5).named_parameters())
    assert torch.equal(deep["layer1.0.conv1.weight"], dict(a.named_parameters())["layer1.0.conv1.weight"])


def test_init_statistics():
    model = models.build("imagenet_resnet_50", 1000, seed=0)
    weight = model.layer3[0].conv2.weight  # fan_in = 256 * 9
    assert abs(weight.std().item() - (2 / (256 * 9)) ** 0.5) < 0.02 * (2 / (256 * 9)) ** 0.5
    gamma = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert 0 <= gamma.min() and gamma.max() <= 1 and abs(gamma.mean().item() - 0.5) < 0.01
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("bn_init, lo, hi, beta", [("fixed", 1, 1, 0), ("oneone", 1, 1, 1), ("positivenegative", -1, 1, 0)])
def test_bn_inits(bn_init, lo, hi, beta):
    model = models.create("cifar_resnet_14", 10)
    initialize(model, 0, bn_init)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bns])
    assert gamma.min() >= lo and gamma.max() <= hi and all((m.bias == beta).all() for m in bns)
    if bn_init == "positivenegative":
        assert (gamma < 0).any() and (gamma > 0).any()

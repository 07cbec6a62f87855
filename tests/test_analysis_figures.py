"""Every figure `bnonly analyze` writes, checked as a reader would meet it: nothing drawn outside the
image (legend, titles, tick labels), the legend off the data, and under every group of seeds one
label that is its own. Extents come from matplotlib's renderer; run records are made for the test."""
from pathlib import Path

import pytest
import torch
from matplotlib.collections import PathCollection

from bnonly_dist import config
from bnonly_dist.analysis import cells, claims, claims_figures, figures, runs, tables
from bnonly_dist.analysis.gamma import GammaReport

TOP1 = {"all": 91.0, "bn": 60.0, "bn_shortcut_output": 68.0, "bn_output": 55.0, "output": 30.0, "none": 10.0,
        "random_per_channel": 40.0}


def record(arch, mode, seed, *overrides):
    cfg = config.load("configs/cifar10_resnet14.yaml", [f"model.arch={arch}", f"mode={mode}", f"seed={seed}",
                                                         "data.root=/nowhere", *overrides])
    top1 = TOP1[mode] + seed - 1.0
    summary = {"trainable_params": 1_000, "final": {"top1": top1, "top5": 99.0}, "step": 10, "epoch": 160,
               "fingerprint": f"{arch}-{mode}-{seed}-{overrides}"}
    return runs.RunRecord(Path(f"/runs/{arch}_{mode}_{seed}_{len(overrides)}"), cfg, summary, summary["final"])


def report(seed: int) -> GammaReport:
    torch.manual_seed(seed)
    layers = {name: torch.randn(n) * 0.05 for name, n in (("conv.bn", 16), ("layer1.0.bn1", 16),
                                                          ("layer2.0.bn1", 32), ("layer3.0.bn1", 64))}
    return GammaReport(layers, {k: torch.randn(v.numel()) for k, v in layers.items()}, 0.1, {k: 0.1 for k in layers})


@pytest.fixture
def drawn(monkeypatch):
    """The figures as written: each one laid out by the renderer, then saved as usual."""
    out, save = {}, figures.save

    def keep(fig, path):
        fig.canvas.draw()
        out[Path(path).name] = facts(fig)
        return save(fig, path)
    monkeypatch.setattr(figures, "save", keep)
    return out


def facts(fig) -> dict:
    """What a reader sees: every text's and legend's box, and per axes the groups of strips and the labels."""
    renderer = fig.canvas.get_renderer()
    # What is drawn: per axes its tight box (title, axis labels, the tick labels in view, its legend), and the
    # figure's own texts (suptitle)
    boxes = [(ax.get_title() or "an axes", ax.get_tightbbox(renderer)) for ax in fig.axes if ax.get_visible()]
    boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]
    legends = [leg.get_window_extent(renderer) for leg in fig.legends]
    legends += [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
    axes = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        # a strip: one scatter of seeds (spread evenly about its centre) or a paper's mark
        strips = sorted({round(float(c.get_offsets()[:, 0].mean()), 3) for c in ax.collections
                         if isinstance(c, PathCollection) and c.get_offsets().size})
        major = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.get_xticklabels() if t.get_text()]
        minor = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels(minor=True) if t.get_text()]
        axes.append({"ax": ax, "strips": strips, "major": major, "minor": minor})
    return {"bbox": fig.bbox, "texts": boxes, "legends": legends, "axes": axes,
            "axes_boxes": [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]}


def inside(box, outer, slack=1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack and box.x1 <= outer.x1 + slack
            and box.y1 <= outer.y1 + slack)


def assert_readable(name: str, f: dict) -> None:
    for text, box in f["texts"]:
        assert inside(box, f["bbox"]), f"{name}: {text!r} runs off the image ({box} outside {f['bbox']})"
    for legend in f["legends"]:
        assert inside(legend, f["bbox"]), f"{name}: the legend runs off the image"
        assert not any(legend.overlaps(plot) for plot in f["axes_boxes"]), f"{name}: the legend hides data"


def groups_of(strips: list[float]) -> list[list[float]]:
    """Strips one apart belong to one group; a wider gap starts the next."""
    out = []
    for x in strips:
        if out and x - out[-1][-1] <= 1.001:
            out[-1].append(x)
        else:
            out.append([x])
    return out


def assert_one_label_per_group(name: str, axes: dict, named_strips: bool) -> None:
    display = axes["ax"].transData
    groups = groups_of(axes["strips"])
    assert len(axes["major"]) == len(groups), f"{name}: {len(axes['major'])} group labels for {len(groups)} groups"
    for (label, box), members in zip(axes["major"], groups):
        left, right = display.transform((members[0] - 0.5, 0))[0], display.transform((members[-1] + 0.5, 0))[0]
        assert left <= (box.x0 + box.x1) / 2 <= right, f"{name}: {label!r} is not under its own group"
    if named_strips:  # every strip of seeds has its mode's name under it
        assert sorted(round(x, 3) for x, _ in axes["minor"]) == axes["strips"], name


def long_settings_records():
    """Two settings whose labels are long (the legend that ran off the left edge) and one net with two modes."""
    short = ("optim.epochs=2", "optim.milestones=[1]", "train.max_steps=3")
    out = [record(arch, mode, 0, *extra) for extra in ((), short) for arch in ("cifar_resnet_14", "cifar_resnet_20")
           for mode in ("all", "bn", "bn_output")]
    return out + [record("cifar_resnet_32", mode, seed, "optim.lr=0.05") for mode in ("bn", "random_per_channel")
                  for seed in (0, 1)]


def test_accuracy_figures_keep_the_legend_inside_the_image_and_off_the_data(drawn, tmp_path):
    rows = tables.rows(cells.group(long_settings_records()), {}, 0.01)
    made = figures.accuracy_figures(rows, tmp_path)
    assert [p.name for p in made] == ["cifar10_depth.png"]
    f = drawn["cifar10_depth.png"]
    assert_readable("cifar10_depth.png", f)
    (legend,) = f["legends"]
    (plot,) = f["axes_boxes"]
    assert legend.y1 <= plot.y0  # below the axes: no point hidden under it


def test_claim_figures_label_every_group_once_under_itself(drawn, tmp_path):
    by_setting = {}
    for cell in cells.group(long_settings_records()):
        by_setting.setdefault(cell.setting_key, []).append(cell)
    one_net = next(m for m in by_setting.values() if {c.arch for c in m} == {"cifar_resnet_32"})
    ev = claims.Evidence({(c.arch, c.mode): c for c in one_net}, {}, 0.01)
    claims_figures.all_figures(ev, "cifar10", 10.0, tmp_path, "_one")
    (axes,) = drawn["claim2_bn_vs_random_one.png"]["axes"]  # ResNet-32: bn and random_per_channel, two strips
    assert [label for label, _ in axes["major"]] == ["ResNet-32"] and len(axes["strips"]) == 2
    assert sorted(text for _, text in axes["minor"]) == ["bn", "random_per_channel"]
    (ordering,) = drawn["claim4_ordering_one.png"]["axes"]  # no run of claim 4's own modes: the net claim 4 reads
    assert [label for label, _ in ordering["major"]] == ["ResNet-14"]
    for name, f in drawn.items():
        assert_readable(name, f)


def test_every_claim_figure_of_a_full_grid_is_readable(drawn, tmp_path):
    nets = ("cifar_resnet_14", "cifar_resnet_110", "cifar_resnet_14_128")
    records = [record(net, mode, seed) for net in nets for mode in ("all", "bn", "output", "random_per_channel")
               for seed in (0, 1, 2)]
    records += [record("cifar_resnet_14", mode, seed) for mode in ("bn_shortcut_output", "bn_output", "none")
                for seed in (0, 1, 2)]
    grouped = cells.group(records)
    reports = {str(r.run_dir): report(i) for i, r in enumerate(records) if r.cfg.mode in ("bn", "all")}
    ev = claims.Evidence({(c.arch, c.mode): c for c in grouped}, reports, 0.01)
    claims_figures.all_figures(ev, "cifar10", 10.0, tmp_path)
    figures.gamma_figures(grouped, reports, tmp_path, 0.01)
    rows = tables.rows(grouped, reports, 0.01)
    figures.accuracy_figures(rows, tmp_path)
    assert set(drawn) >= {"claim1_depth_width.png", "claim2_bn_vs_random.png", "claim3_small_gamma.png",
                          "claim4_ordering.png", "gamma_cifar10_cifar_resnet_14.png", "cifar10_depth.png",
                          "cifar10_width.png"}
    for name, f in drawn.items():
        assert_readable(name, f)
    for name in ("claim2_bn_vs_random.png", "claim4_ordering.png"):
        (axes,) = drawn[name]["axes"]
        assert_one_label_per_group(name, axes, named_strips=True)
    assert [label for label, _ in drawn["claim2_bn_vs_random.png"]["axes"][0]["major"]] == [
        "ResNet-14", "ResNet-110", "WRN-14-8"]
    panels = drawn["claim3_small_gamma.png"]["axes"]
    assert len(panels) == 3
    for axes in panels:  # a group per stage (and all channels), bn and all side by side
        assert_one_label_per_group("claim3_small_gamma.png", axes, named_strips=False)
        assert [label for label, _ in axes["major"]] == ["all channels", "stem", "layer1", "layer2", "layer3"]

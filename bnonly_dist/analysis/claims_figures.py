"""A figure per claim, in the style of figures.py: every seed a point, the mean a bar or a line."""
from __future__ import annotations

import statistics
from pathlib import Path

from bnonly_dist import models
from bnonly_dist.analysis import paper
from bnonly_dist.analysis.claims import ORDER, ORDER_ONLY, PAPER_SMALL_GAMMA, Evidence, bn_count
from bnonly_dist.analysis.figures import COLORS, plt


def short(net: str) -> str:
    """cifar_resnet_110 -> ResNet-110, cifar_resnet_14_128 -> WRN-14-8 (docs/paper.md's names)."""
    arch = models.parse_arch(net)
    if arch.family != "cifar":
        return net
    return f"ResNet-{arch.depth}" if arch.width == 16 else f"WRN-{arch.depth}-{arch.width / 16:g}"


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _seeds(ax, x: float, values: list[float], color: str, label: str | None, width: float = 0.0) -> None:
    """The seeds as points (spread a little sideways when width > 0) and their mean as a short bar."""
    if not values:
        return
    offsets = [width * (i - (len(values) - 1) / 2) / max(len(values), 1) for i in range(len(values))]
    ax.scatter([x + o for o in offsets], values, s=18, color=color, alpha=0.7, label=label, zorder=3)
    half = max(width, 0.15) / 2
    ax.hlines(statistics.fmean(values), x - half, x + half, color=color, linewidth=2, zorder=4)


def depth_width(ev: Evidence, dataset: str, path: Path) -> Path:
    """Claim 1: BN-only top-1 against the BN parameter count; depth (width 16) and width (depth 14) series."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    nets = [a for a in ev.nets(("bn",)) if models.parse_arch(a).family == "cifar"]
    for word, color, members in (("depth (width 16)", "tab:orange", [a for a in nets if models.parse_arch(a).width == 16]),
                                 ("width (ResNet-14, WRN-14-k)", "tab:green",
                                  [a for a in nets if models.parse_arch(a).depth == 14])):
        xs, means = [], []
        for net in members:
            values = ev.top1(net, "bn")
            ax.scatter([bn_count(net)] * len(values), values, s=18, color=color, alpha=0.7, zorder=3)
            xs.append(bn_count(net))
            means.append(statistics.fmean(values))
        if xs:
            ax.plot(xs, means, color=color, marker="o", label=f"{word}: mean, seeds as points")
        published = [(bn_count(n), paper.top1(dataset, n, "bn")) for n in members if paper.top1(dataset, n, "bn")]
        if published:
            ax.plot(*zip(*sorted(published)), linestyle="--", marker="x", color=color, alpha=0.6,
                    label=f"{word} (paper)")
        for net in members:
            ax.annotate(short(net), (bn_count(net), statistics.fmean(ev.top1(net, "bn"))),
                        textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("BN parameters (trainable under mode=bn)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Claim 1: BN-only accuracy against depth and width")
    return _save(fig, ax, path)


def _per_net(ev: Evidence, modes: tuple[str, ...], path: Path, title: str, chance: float | None = None,
             paper_of=None, nets: list[str] | None = None) -> Path:
    nets = ev.nets(modes) if nets is None else nets
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(nets) * len(modes) / 2), 4.5), dpi=120)
    step, labelled = 1.0 / (len(modes) + 1), set()  # each legend entry once, wherever it first appears
    for i, net in enumerate(nets):
        for j, mode in enumerate(modes):
            x = i + (j - (len(modes) - 1) / 2) * step
            values = ev.top1(net, mode)
            _seeds(ax, x, values, COLORS.get(mode), None if mode in labelled or not values else mode, step * 0.8)
            labelled |= {mode} if values else set()
            published = paper_of(net, mode) if paper_of else None
            if published is not None:
                ax.scatter([x], [published], marker="x", color=COLORS.get(mode), alpha=0.6, zorder=5,
                           label=None if "paper" in labelled else "paper")
                labelled.add("paper")
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:g} %)")
    ax.set_xticks(range(len(nets)), [short(n) for n in nets], fontsize=8)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title)
    return _save(fig, ax, path)


def bn_vs_random(ev: Evidence, dataset: str, path: Path) -> Path:
    return _per_net(ev, ("bn", "random_per_channel", "output"), path,
                    "Claim 2: bn against random_per_channel and output, per net",
                    paper_of=lambda net, mode: paper.top1(dataset, net, mode))


def ordering(ev: Evidence, dataset: str, chance: float, path: Path) -> Path:
    return _per_net(ev, ORDER, path, "Claim 4: the modes in the paper's order, per net", chance,
                    paper_of=lambda net, mode: paper.top1(dataset, net, mode), nets=ev.nets(ORDER_ONLY))


def small_gamma(ev: Evidence, path: Path) -> Path:
    """Claim 3: % of channels with |gamma| < threshold, bn against all, per net and stage."""
    columns = [(net, stage) for net in ev.nets(("bn", "all")) for stage in [None, *ev.stages(net)]]
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(columns)), 4.5), dpi=120)
    labelled = set()  # each legend entry once, wherever it first appears
    for i, (net, stage) in enumerate(columns):
        for j, mode in enumerate(("bn", "all")):
            x = i + (j - 0.5) * 0.35
            values = ev.small_gamma(net, mode, stage)
            _seeds(ax, x, values, COLORS.get(mode), None if mode in labelled or not values else mode, 0.28)
            labelled |= {mode} if values else set()
            if stage is None and ev.threshold == 0.01:
                ax.scatter([x], [PAPER_SMALL_GAMMA[mode]], marker="x", color=COLORS.get(mode), alpha=0.6, zorder=5,
                           label=None if "paper" in labelled else "paper (uncertain)")
                labelled.add("paper")
    ax.set_xticks(range(len(columns)), [f"{short(net)}\n{stage or 'all'}" for net, stage in columns], fontsize=7,
                  rotation=45)
    ax.set_ylabel(f"% of channels with |γ| < {ev.threshold:g}")
    ax.set_title("Claim 3: channels switched off, bn against all, per stage")
    return _save(fig, ax, path)


def all_figures(ev: Evidence, dataset: str, chance: float, folder: Path, suffix: str = "") -> dict[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {1: depth_width(ev, dataset, folder / f"claim1_depth_width{suffix}.png"),
            2: bn_vs_random(ev, dataset, folder / f"claim2_bn_vs_random{suffix}.png"),
            3: small_gamma(ev, folder / f"claim3_small_gamma{suffix}.png"),
            4: ordering(ev, dataset, chance, folder / f"claim4_ordering{suffix}.png")}

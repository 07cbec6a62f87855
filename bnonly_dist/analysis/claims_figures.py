"""A figure per claim, in the style of figures.py: every seed a point, the mean a bar or a line."""
from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bnonly_dist import models
from bnonly_dist.analysis import figures, paper
from bnonly_dist.analysis.claims import (ORDER, ORDER_NET, ORDER_ONLY, PAPER_RANGE, PAPER_SMALL_GAMMA,
                                         PAPER_THRESHOLD, Evidence, bn_count)
from bnonly_dist.analysis.figures import COLORS, legend_below, plt


def short(net: str) -> str:
    """cifar_resnet_110 -> ResNet-110, cifar_resnet_14_128 -> WRN-14-8 (docs/paper.md's names)."""
    arch = models.parse_arch(net)
    if arch.family != "cifar":
        return net
    return f"ResNet-{arch.depth}" if arch.width == 16 else f"WRN-{arch.depth}-{arch.width / 16:g}"


def _save(fig, ax, path: Path, grid: str = "both") -> Path:
    ax.grid(alpha=0.3, axis=grid)
    legend_below(fig, *ax.get_legend_handles_labels())
    return figures.save(fig, path)


def _seeds(ax, x: float, values: list[float], color: str, label: str | None, width: float = 0.0) -> None:
    """The seeds as points (spread a little sideways when width > 0) and their mean as a short bar."""
    if not values:
        return
    offsets = [width * (i - (len(values) - 1) / 2) / max(len(values), 1) for i in range(len(values))]
    ax.scatter([x + o for o in offsets], values, s=18, color=color, alpha=0.7, label=label, zorder=3)
    half = max(width, 0.15) / 2
    ax.hlines(statistics.fmean(values), x - half, x + half, color=color, linewidth=2, zorder=4)


@dataclass
class Strip:
    """One column of seeds: a mode (or what it measures) within a group."""
    name: str
    color: str
    values: list[float]
    paper: float | None = None


def _strips(fig, ax, groups: list[tuple[str, list[Strip]]], paper_label: str = "paper",
            name_strips: bool = True) -> None:
    """Groups of strips side by side: each strip a column of seeds; each group one tick label centred
    under its own strips (name_strips: each strip's name under it too, else a legend entry per name).
    Strips with neither runs nor a paper number take no room."""
    x, strips, centres, labelled = 0.0, [], [], set()
    for group, members in groups:
        shown = [m for m in members if m.values or m.paper is not None]
        if not shown:
            continue
        first = x
        for m in shown:
            legend = None if name_strips or m.name in labelled or not m.values else m.name
            _seeds(ax, x, m.values, m.color, legend, 0.6)
            labelled |= {m.name} if legend else set()
            if m.paper is not None:
                ax.scatter([x], [m.paper], marker="x", color=m.color, alpha=0.6, zorder=5,
                           label=None if "paper" in labelled else paper_label)
                labelled.add("paper")
            strips.append((x, m.name))
            x += 1.0
        centres.append(((first + x - 1.0) / 2, group))
        x += 0.6  # the gap between groups
    if strips:
        ax.set_xlim(-0.7, x - 0.9)
    ax.set_xticks([c for c, _ in centres], [g for _, g in centres], fontsize=8)
    if not name_strips:
        return
    ax.xaxis.remove_overlapping_locs = False  # a group of an odd number of strips has its name where a strip's is
    ax.set_xticks([p for p, _ in strips], [n for _, n in strips], minor=True, fontsize=7, rotation=90)
    fig.canvas.draw()  # the strips' names are laid out: the group names go below the tallest of them
    tallest = max((t.get_window_extent().height for t in ax.get_xticklabels(minor=True)), default=0.0)
    ax.tick_params(axis="x", which="major", length=0, pad=tallest * 72 / fig.dpi + 10)


def depth_width(ev: Evidence, dataset: str, path: Path) -> Path:
    """Claim 1: BN-only top-1 against the BN parameter count; depth (width 16) and width (depth 14) series."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120, layout="constrained")
    nets = [a for a in ev.nets(("bn",)) if models.parse_arch(a).family == "cifar"]
    for word, color, below, members in (
            ("depth (width 16)", "tab:orange", True, [a for a in nets if models.parse_arch(a).width == 16]),
            ("width (ResNet-14, WRN-14-k)", "tab:green", False, [a for a in nets if models.parse_arch(a).depth == 14])):
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
        for net in members:  # depth's names under their points, width's above: the two series' names never meet
            ax.annotate(short(net), (bn_count(net), statistics.fmean(ev.top1(net, "bn"))), textcoords="offset points",
                        xytext=(0, -12 if below else 8), ha="center", va="top" if below else "bottom", fontsize=7,
                        color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("BN parameters (trainable under mode=bn)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Claim 1: BN-only accuracy against depth and width")
    return _save(fig, ax, path)


def _per_net(ev: Evidence, modes: tuple[str, ...], path: Path, title: str, chance: float | None = None,
             paper_of=None, nets: list[str] | None = None) -> Path:
    nets = ev.nets(modes) if nets is None else nets
    groups = [(short(net), [Strip(mode, COLORS.get(mode), ev.top1(net, mode), paper_of(net, mode) if paper_of else None)
                            for mode in modes]) for net in nets]
    strips = sum(1 for _, members in groups for m in members if m.values or m.paper is not None)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * strips + 2), 5), dpi=120, layout="constrained")
    _strips(fig, ax, groups)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:g} %)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(textwrap.fill(title, 60))  # a figure of one net is narrow
    return _save(fig, ax, path, grid="y")


def bn_vs_random(ev: Evidence, dataset: str, path: Path) -> Path:
    return _per_net(ev, ("bn", "random_per_channel", "output"), path,
                    "Claim 2: bn against random_per_channel (output: context), per net",
                    paper_of=lambda net, mode: paper.top1(dataset, net, mode))


def ordering(ev: Evidence, dataset: str, chance: float, path: Path) -> Path:
    # The nets claims.ordering compares on: where the ordering's own modes ran, else ResNet-14.
    return _per_net(ev, ORDER, path, "Claim 4: the modes in the paper's order, per net", chance,
                    paper_of=lambda net, mode: paper.top1(dataset, net, mode), nets=ev.nets(ORDER_ONLY) or [ORDER_NET])


def small_gamma(ev: Evidence, path: Path) -> Path:
    """Claim 3: % of channels with |gamma| < threshold, bn against all; a panel per net, a group per stage,
    the paper's range for bn shaded where the threshold is the paper's."""
    nets = ev.nets(("bn", "all")) or [None]
    cols = min(3, len(nets))
    rows = -(-len(nets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 3.6 * rows), dpi=120, squeeze=False,
                             layout="constrained")
    paper_range = PAPER_RANGE if ev.threshold == PAPER_THRESHOLD else None
    for ax, net in zip(axes.flat, nets):
        groups = [(stage or "all channels",
                   [Strip(mode, COLORS.get(mode), ev.small_gamma(net, mode, stage) if net else [],
                          PAPER_SMALL_GAMMA[mode] if stage is None and paper_range else None)
                    for mode in ("bn", "all")]) for stage in [None, *(ev.stages(net) if net else [])]]
        if paper_range:
            ax.axhspan(*paper_range, color=COLORS["bn"], alpha=0.12, label="the paper's range for bn")
        _strips(fig, ax, groups, "paper (uncertain)", name_strips=False)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(short(net) if net else "no runs of bn or all", fontsize=9)
        ax.set_ylabel(f"% of channels with |γ| < {ev.threshold:g}", fontsize=8)
    for ax in list(axes.flat)[len(nets):]:
        ax.set_visible(False)
    fig.suptitle("Claim 3: channels switched off, bn against all, per stage")
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    legend_below(fig, list(handles.values()), list(handles))
    return figures.save(fig, path)


def all_figures(ev: Evidence, dataset: str, chance: float, folder: Path, suffix: str = "") -> dict[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {1: depth_width(ev, dataset, folder / f"claim1_depth_width{suffix}.png"),
            2: bn_vs_random(ev, dataset, folder / f"claim2_bn_vs_random{suffix}.png"),
            3: small_gamma(ev, folder / f"claim3_small_gamma{suffix}.png"),
            4: ordering(ev, dataset, chance, folder / f"claim4_ordering{suffix}.png")}

"""The paper's figures from your runs: accuracy against depth and width per mode, and the
gamma/beta distributions of BN-only against full training."""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bnonly_dist.analysis.cells import Cell  # noqa: E402
from bnonly_dist.analysis.gamma import GammaReport  # noqa: E402
from bnonly_dist.run.bn_stats import bn_stage  # noqa: E402

COLORS = {"all": "tab:blue", "bn": "tab:orange", "bn_output": "tab:olive", "bn_shortcut_output": "tab:green",
          "shortcut_output": "tab:red", "output": "tab:purple", "none": "tab:gray",
          "random_per_channel": "tab:brown", "bn_fixed": "tab:pink"}


def legend_below(fig, handles: list, labels: list[str]) -> None:
    """The legend under the axes, outside them (no data hidden), in as many columns as fit the
    figure's width; long labels (a setting's keys) wrapped. Needs layout="constrained"."""
    if not handles:
        return
    labels = [textwrap.fill(label, 50) for label in labels]
    for ncols in (3, 2, 1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(handles)), fontsize=8)
        fig.canvas.draw()  # lays the figure out, so the legend's extent is its final one
        if legend.get_window_extent().width <= 0.98 * fig.bbox.width or ncols == 1:
            return
        legend.remove()


def save(fig, path: Path) -> Path:
    """Every figure of the analysis is written here (tests check its layout on the way)."""
    fig.savefig(path)
    plt.close(fig)
    return path


def _spread(stats: tuple) -> float:
    """The error bar: the std over seeds, none (nan) for one seed."""
    return math.nan if stats[1] is None else stats[1]


def accuracy_plot(rows: list[dict], x_key: str, path: Path, title: str, xlabel: str, metric: str = "top1") -> Path | None:
    """One line per mode (and setting): mean over seeds with std error bars; the paper's numbers dashed."""
    by_mode = defaultdict(list)
    for r in rows:
        by_mode[(r["mode"], r["setting"])].append(r)
    if len({r[x_key] for r in rows}) < 2:
        return None  # a figure needs at least two depths (widths)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120, layout="constrained")
    for (mode, setting), points in by_mode.items():
        points.sort(key=lambda r: r[x_key])
        xs = [r[x_key] for r in points]
        ax.errorbar(xs, [r[metric][0] for r in points], yerr=[_spread(r[metric]) for r in points], marker="o",
                    capsize=3, color=COLORS.get(mode), label=f"{mode} (ours{', ' + setting if setting else ''})")
        published = [(r[x_key], r["paper_top1"]) for r in points if metric == "top1" and r["paper_top1"] is not None]
        if published and not any(label == f"{mode} (paper)" for label in ax.get_legend_handles_labels()[1]):
            ax.plot(*zip(*published), linestyle="--", marker="x", color=COLORS.get(mode), alpha=0.6,
                    label=f"{mode} (paper)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r[x_key] for r in rows}), [str(x) for x in sorted({r[x_key] for r in rows})])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric.replace('top', 'top-')} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend_below(fig, *ax.get_legend_handles_labels())
    return save(fig, path)


def accuracy_figures(rows: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    cifar = [r for r in rows if r["dataset"] == "cifar10" and r["family"] == "cifar"]
    made.append(accuracy_plot([r for r in cifar if r["width"] == 16], "depth", folder / "cifar10_depth.png",
                              "CIFAR-10: accuracy against depth (base width 16)", "depth (ResNet-N)"))
    width_rows = [dict(r, k=r["width"] // 16) for r in cifar if r["depth"] == 14]
    made.append(accuracy_plot(width_rows, "k", folder / "cifar10_width.png",
                              "CIFAR-10: accuracy against width (ResNet-14, WRN-14-k)", "width multiplier k"))
    imagenet = [r for r in rows if r["dataset"] == "imagenet"]
    for metric in ("top1", "top5"):
        made.append(accuracy_plot(imagenet, "depth", folder / f"imagenet_depth_{metric}.png",
                                  f"ImageNet: {metric.replace('top', 'top-')} against depth", "depth (ResNet-D)",
                                  metric))
    return [p for p in made if p]


def gamma_figures(cells: list[Cell], reports: dict[str, GammaReport], folder: Path,
                  threshold: float) -> list[Path]:
    """Per (data set, model, setting): gamma (top) and beta (bottom) histograms per stage, one colour per mode."""
    folder.mkdir(parents=True, exist_ok=True)
    groups, settings = defaultdict(list), {}
    for cell in cells:
        settings.setdefault(cell.setting_key, (len(settings), cell.setting))
        groups[(cell.dataset, cell.arch, cell.setting_key)] += [r for r in cell.records if str(r.run_dir) in reports]
    made = []
    for (dataset, arch, setting_key), runs in sorted(groups.items()):
        if not runs:
            continue
        number, setting = settings[setting_key]
        stages = sorted({bn_stage(n) for n in reports[str(runs[0].run_dir)].layers}, key=lambda s: (s != "stem", s))
        fig, axes = plt.subplots(2, len(stages), figsize=(3.2 * len(stages), 5.5), dpi=110, squeeze=False,
                                 layout="constrained")
        modes, small, frozen = sorted({r.cfg.mode for r in runs}), defaultdict(list), False
        for mode in modes:
            mine = [reports[str(r.run_dir)] for r in runs if r.cfg.mode == mode]
            for col, stage in enumerate(stages):
                for row, kind in enumerate(("layers", "betas")):
                    values = torch.cat([t for rep in mine for n, t in getattr(rep, kind).items()
                                        if bn_stage(n) == stage]).numpy()
                    if kind == "layers":
                        small[stage].append(f"{mode} {100 * (abs(values) < threshold).mean():.0f} %")
                    if values.std() == 0:  # frozen (e.g. beta = 0 when BN does not train): a line, not a spike
                        axes[row, col].axvline(values[0], color=COLORS.get(mode), linestyle=":")
                        frozen = True
                        continue
                    axes[row, col].hist(values, bins=40, density=True, histtype="step", linewidth=1.4,
                                        color=COLORS.get(mode))
        for col, stage in enumerate(stages):  # the shares in the titles, the modes in one legend: no data covered
            axes[0, col].set_title(f"{stage}\n" + textwrap.fill(f"|γ| < {threshold:g}: " + ", ".join(small[stage]), 40),
                                   fontsize=9)
            for row, name in enumerate(("gamma", "beta")):
                axes[row, col].set_xlabel(name)
                axes[row, col].xaxis.set_major_locator(MaxNLocator(4))  # beta's small numbers: no labels overlap
                axes[row, col].grid(alpha=0.3)
            axes[0, col].axvspan(-threshold, threshold, color="gray", alpha=0.2)
        handles = [Line2D([], [], color=COLORS.get(mode), label=mode) for mode in modes]
        if frozen:
            handles.append(Line2D([], [], color="gray", linestyle=":", label="dotted: did not train (one value)"))
        legend_below(fig, handles, [h.get_label() for h in handles])
        axes[0, 0].set_ylabel("density")
        axes[1, 0].set_ylabel("density")
        fig.suptitle(textwrap.fill(f"{dataset} {arch}{' (' + setting + ')' if setting else ''}: BN parameters after "
                                   f"training (|γ| < {threshold} shaded)", int(14 * fig.get_figwidth())))
        path = folder / f"gamma_{dataset}_{arch}{f'_setting{number}' if len(settings) > 1 else ''}.png"
        made.append(save(fig, path))
    return made

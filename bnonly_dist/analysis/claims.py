"""The paper's four claims (docs/paper.md) as verdicts from the user's own runs.

Evidence comes only from cells (cells.group: runs equal in all but the seed) of one setting,
so a claim never compares runs that differ in anything but the net and the mode. Every
comparison "A above B" gets Welch's 95 % interval of mean(A) - mean(B) over seeds (stats.py):
supported when the interval lies above 0, not supported when it lies below, undecided when
it covers 0, when a cell has one seed (the sign is then shown, indicative only) or when a
cell is missing. A number the paper states as a range ("a quarter to a third") is tested too:
the t 95 % interval of the mean inside the range, wholly outside it, or across its edge. Each
claim is decided by the comparisons that test its own words (docs/paper.md, "Which comparison
decides each claim"); the others are shown as context and never enter the verdict. A claim is
supported when all its deciding comparisons are, not supported when any is not, undecided
otherwise. Each undecided deciding comparison names the runs that would decide it.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

from bnonly_dist import models
from bnonly_dist.analysis import paper, stats
from bnonly_dist.analysis.cells import Cell
from bnonly_dist.analysis.gamma import GammaReport
from bnonly_dist.run.bn_stats import bn_stage

RULE = ("Each comparison 'A above B' uses Welch's 95 % interval of the difference of the means over seeds "
        "(unequal variances, Welch-Satterthwaite degrees of freedom): supported when the whole interval is above 0, "
        "not supported when it is below 0, undecided when it covers 0 or a cell is missing. One seed per cell: "
        "indicative only (the sign is shown, the verdict stays undecided). 'A ≈ chance' is supported when the t 95 % "
        "interval of A's mean covers chance. 'A within the paper's range' is supported when the t 95 % interval of A's "
        "mean lies inside the range, not supported when it lies wholly outside it, undecided when it crosses an edge. "
        "Comparisons marked context are shown, not counted. A claim is supported when all its deciding comparisons "
        "are, not supported when any is not, and undecided otherwise.")
MIN_SEEDS = 3  # a cell with fewer gets seeds up to this; an undecided comparison with as many gets MORE_SEEDS more
MORE_SEEDS = 2
PAIR_RATIO = 1.25  # "equal number of BN parameters": the nearer count within this ratio of the wide net's
DEEP_NETS = ("cifar_resnet_14", "cifar_resnet_32", "cifar_resnet_56", "cifar_resnet_110", "cifar_resnet_218",
             "cifar_resnet_434", "cifar_resnet_866")  # the paper's depth series (base width 16)
# The smallest grid that decides every claim (configs/sweeps/claims.yaml): asked for when a claim has no evidence.
CLAIM_NETS = ("cifar_resnet_14", "cifar_resnet_110", "cifar_resnet_14_128")
ORDER_NET = "cifar_resnet_14"
ORDER = ("all", "bn_shortcut_output", "bn_output", "bn", "output", "none")
ORDER_ONLY = ("bn_shortcut_output", "bn_output", "none")  # the modes only claim 4 asks for
MODE_INDEX = {m: i for i, m in enumerate((*ORDER, "random_per_channel", "shortcut_output", "bn_fixed"))}
TITLES = {1: "Depth and width", 2: "BN beats as many random parameters", 3: "BN-only switches channels off",
          4: "The ordering of the modes"}
# Verbatim from docs/paper.md (tests/test_claims.py checks that they still are).
QUOTES = {
    1: ["For an equal budget of BN parameters, making the network deeper helps more than making it wider.",
        "On CIFAR-10, ResNet-866 trained BN-only reaches roughly 82 % test accuracy (a random, untrained network "
        "scores about 10 %)."],
    2: ["Training gamma and beta does better than training the same number of randomly chosen weights elsewhere in "
        "the network (the `random_per_channel` mode below)."],
    3: ["BN-only training learns to turn off a sizeable fraction of channels, somewhere between a quarter and a "
        "third of them, by driving gamma towards zero.",
        "One summary of the paper's first version puts it at about 27 % of channels with |gamma| < 0.01 under "
        "BN-only training against about 9 % under full training."],
    4: ["Chance level (`none`) is about 10 %."],
}
PAPER_SMALL_GAMMA = {"bn": 27.0, "all": 9.0}  # %, at |gamma| < 0.01, "not certain" (docs/paper.md)
PAPER_RANGE = (25.0, 100 / 3)  # % of channels switched off by BN-only training: "a quarter to a third"
PAPER_THRESHOLD = 0.01  # the cut-off of both numbers above
HOW = {
    1: f"Mode bn. Decided by the equal budget: each wide net (WRN-14-k) against the deeper net of base width 16 "
       f"whose BN parameter count is nearest, if within a ratio of {PAIR_RATIO:g} (ResNet-110's 8,288 against "
       f"WRN-14-8's 8,960). Context: depth (each net of base width 16 against the next shallower one) and width "
       f"(each ResNet-14/WRN-14-k against the next narrower one).",
    2: "Decided per net by bn above random_per_channel (the same number of trainable parameters elsewhere), refused "
       "as evidence unless the runs' own trainable counts are equal. Context: bn and random_per_channel each above "
       "output.",
    3: f"Decided per net by bn above all in the share of channels with |γ| below the threshold over all channels "
       f"(the direction), and by that share under bn within the paper's quarter to a third "
       f"({PAPER_RANGE[0]:g}–{PAPER_RANGE[1]:.1f} %, at |γ| < {PAPER_THRESHOLD:g}; the magnitude). Context: bn above "
       f"all per stage; the top-1 change with those channels zeroed is shown beside it.",
    4: "Per net that has runs of bn_shortcut_output, bn_output or none (else ResNet-14), each mode above the next "
       "in the paper's order; none against chance (100 / classes).",
}


@dataclass
class Comparison:
    claim: int
    what: str
    a: tuple[str, str]  # (arch, mode) expected above
    b: tuple[str, str] | None  # None: against a number (chance)
    metric: str
    a_values: list[float]
    b_values: list[float]
    paper: tuple[float | None, float | None] = (None, None)
    context: bool = False  # shown beside the claim's own comparisons, never part of its verdict
    target: tuple[float, float] | None = None  # b is None: the range A's mean should lie in (else: chance)
    verdict: str = "undecided"
    reason: str = ""
    interval: tuple[float, float] | None = None
    diff: float | None = None
    needs: dict[tuple[str, str], int] = field(default_factory=dict)  # (arch, mode) -> seeds wanted in all

    def as_dict(self) -> dict:
        return {"what": self.what, "metric": self.metric, "verdict": self.verdict, "reason": self.reason,
                "context": self.context, "target": list(self.target) if self.target else None,
                "a": {"arch": self.a[0], "mode": self.a[1], **_summary(self.a_values), "paper": self.paper[0]},
                "b": None if self.b is None else {"arch": self.b[0], "mode": self.b[1], **_summary(self.b_values),
                                                  "paper": self.paper[1]},
                "difference": self.diff, "interval_95": list(self.interval) if self.interval else None}


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}  # one value: no spread


def _wanted(have: int, decided_by_seeds: bool) -> int:
    return MIN_SEEDS if have < MIN_SEEDS else have + MORE_SEEDS if decided_by_seeds else have


def judge(comparison: Comparison, chance: float | None = None) -> Comparison:
    """Fill in verdict, reason, interval and the runs that would decide it (see RULE)."""
    c, a, b = comparison, comparison.a_values, comparison.b_values
    absent = [cell for cell, values in ((c.a, a), (c.b, b)) if cell is not None and not values]
    if absent:
        c.verdict, c.reason = "undecided", "no runs of " + " and ".join(f"{arch} mode={mode}" for arch, mode in absent)
    elif c.target is not None:  # A within a range
        low, high = c.target
        interval, where = stats.mean_interval(a), f"the paper's {low:g}–{high:.1f}"
        if interval is None:
            c.reason = f"one seed per cell: indicative only ({a[0]:.2f} against {where})"
        else:
            c.interval = interval
            inside, outside = low <= interval[0] and interval[1] <= high, interval[1] < low or interval[0] > high
            c.verdict = "supported" if inside else "not supported" if outside else "undecided"
            c.reason = f"the 95 % interval of the mean, {interval[0]:.2f} to {interval[1]:.2f}, lies " + \
                ("inside" if inside else "outside" if outside else "across an edge of") + f" {where}"
    elif c.b is None:  # A ≈ chance
        c.diff = statistics.fmean(a) - chance
        interval = stats.mean_interval(a)
        if interval is None:
            c.reason = f"one seed per cell: indicative only ({c.diff:+.2f} points from chance {chance:g})"
        else:
            c.interval = (interval[0] - chance, interval[1] - chance)
            inside = interval[0] <= chance <= interval[1]
            c.verdict = "supported" if inside else "not supported"
            c.reason = f"the 95 % interval of the mean, {interval[0]:.2f} to {interval[1]:.2f}, " + \
                ("covers" if inside else "excludes") + f" chance ({chance:g})"
    else:
        d = stats.welch(a, b)
        c.diff = d.diff
        if d.low is None:
            c.reason = f"one seed per cell: indicative only (A {'above' if d.diff > 0 else 'not above'} B by {d.diff:+.2f})"
        else:
            c.interval = (d.low, d.high)
            c.verdict = "supported" if d.low > 0 else "not supported" if d.high < 0 else "undecided"
            c.reason = f"difference {d.diff:+.2f}, 95 % interval {d.low:+.2f} to {d.high:+.2f}" + \
                (" covers 0" if c.verdict == "undecided" else "")
    if c.verdict == "undecided" and not c.context:  # context decides nothing: no runs asked for it
        covers = c.interval is not None
        for cell, values in ((c.a, a), (c.b, b)):
            if cell is not None and _wanted(len(values), covers) > len(values):
                c.needs[cell] = _wanted(len(values), covers)
    return c


@dataclass
class Evidence:
    """The cells of one setting and what was measured in them."""
    cells: dict[tuple[str, str], Cell]
    reports: dict[str, GammaReport]
    threshold: float

    def top1(self, arch: str, mode: str) -> list[float]:
        cell = self.cells.get((arch, mode))
        return cell.top1() if cell else []

    def small_gamma(self, arch: str, mode: str, stage: str | None = None) -> list[float]:
        """% of channels with |gamma| < threshold per seed (overall, or in one stage)."""
        cell, out = self.cells.get((arch, mode)), []
        for record in cell.records if cell else []:
            report = self.reports.get(str(record.run_dir))
            if report is not None:
                gammas = [g for name, g in report.layers.items() if stage is None or bn_stage(name) == stage]
                if gammas:
                    out.append(100 * sum(int((g.abs() < self.threshold).sum()) for g in gammas)
                               / sum(g.numel() for g in gammas))
            elif stage is None and record.cfg.train.gamma_threshold == self.threshold \
                    and record.last_eval.get("gamma_small_frac") is not None:
                out.append(100 * record.last_eval["gamma_small_frac"])
        return out

    def stages(self, arch: str) -> list[str]:
        for mode in ("bn", "all"):
            cell = self.cells.get((arch, mode))
            for record in cell.records if cell else []:
                if str(record.run_dir) in self.reports:
                    return sorted({bn_stage(n) for n in self.reports[str(record.run_dir)].layers},
                                  key=lambda s: (s != "stem", s))
        return []

    def nets(self, modes: tuple[str, ...]) -> list[str]:
        return sorted({arch for arch, mode in self.cells if mode in modes}, key=net_order)


def net_order(arch: str) -> tuple:
    a = models.parse_arch(arch)
    return a.family, a.width, a.depth


@functools.lru_cache(maxsize=None)  # builds the net (on the meta device) once per name
def bn_count(arch: str) -> int:
    return models.info(arch)["bn"]


def _top1(ev: Evidence, claim: int, a: tuple[str, str], b: tuple[str, str], dataset: str) -> Comparison:
    return Comparison(claim, f"{a[0]} {a[1]} above {b[0]} {b[1]}", a, b, "top-1 %", ev.top1(*a), ev.top1(*b),
                      (paper.top1(dataset, *a), paper.top1(dataset, *b)))


def depth_and_width(ev: Evidence, dataset: str) -> list[Comparison]:
    cifar = [a for a in ev.nets(("bn",)) if models.parse_arch(a).family == "cifar"]
    deep = [a for a in cifar if models.parse_arch(a).width == 16]
    wide = [a for a in cifar if models.parse_arch(a).depth == 14]
    out = []
    for series, default, word in ((deep, (CLAIM_NETS[0], CLAIM_NETS[1]), "depth"),
                                  (wide, (CLAIM_NETS[0], CLAIM_NETS[2]), "width")):
        pairs = list(zip(series, series[1:])) if len(series) > 1 else [default]
        for low, high in pairs:  # context: the claim compares depth with width, not each with itself
            out.append(_top1(ev, 1, (high, "bn"), (low, "bn"), dataset))
            out[-1].what, out[-1].context = f"{word}: " + out[-1].what, True
    candidates = sorted(set(DEEP_NETS) | set(deep), key=net_order)
    wide_nets = [a for a in wide if models.parse_arch(a).width > 16] or [CLAIM_NETS[2]]
    for net in wide_nets:
        count = bn_count(net)
        deeper = [d for d in candidates if models.parse_arch(d).depth > 14
                  and max(bn_count(d), count) / min(bn_count(d), count) <= PAIR_RATIO]
        if not deeper:
            continue  # no deep net within the ratio: this wide net pairs with none
        partner = min(deeper, key=lambda d: abs(bn_count(d) - count))
        out.append(_top1(ev, 1, (partner, "bn"), (net, "bn"), dataset))
        out[-1].what = (f"deeper beats wider at equal BN parameters ({bn_count(partner):,} against {count:,}): "
                        + out[-1].what)
    return [judge(c) for c in out]


def bn_against_random(ev: Evidence, dataset: str) -> list[Comparison]:
    out = []
    for net in ev.nets(("bn", "random_per_channel", "output")) or list(CLAIM_NETS):
        # Only bn against random_per_channel is the claim; the output comparisons are context.
        for a, b in (("bn", "random_per_channel"), ("bn", "output"), ("random_per_channel", "output")):
            c = _top1(ev, 2, (net, a), (net, b), dataset)
            c.context = b == "output"
            counts = [ev.cells[(net, m)].trainable for m in (a, b) if (net, m) in ev.cells]
            if (a, b) == ("bn", "random_per_channel") and len(counts) == 2 and (
                    len(counts[0]) != 1 or counts[0] != counts[1]):
                c.verdict = "undecided"
                c.reason = (f"refused as evidence: the runs' trainable counts differ ({sorted(counts[0])} against "
                            f"{sorted(counts[1])}); the claim is about the same number of parameters")
                out.append(c)
                continue
            out.append(judge(c))
    return out


def switched_off(ev: Evidence, dataset: str) -> list[Comparison]:
    out = []
    paper_pair = (PAPER_SMALL_GAMMA["bn"], PAPER_SMALL_GAMMA["all"]) if ev.threshold == PAPER_THRESHOLD else (None, None)
    for net in ev.nets(("bn", "all")) or list(CLAIM_NETS):
        for stage in [None, *ev.stages(net)]:  # per stage: context (the paper states the share over all channels)
            where = "all channels" if stage is None else stage
            c = judge(Comparison(
                3, f"{net}: % of channels with |γ| < {ev.threshold:g} ({where}) under bn above all", (net, "bn"),
                (net, "all"), f"% |γ| < {ev.threshold:g}", ev.small_gamma(net, "bn", stage),
                ev.small_gamma(net, "all", stage), paper_pair if stage is None else (None, None), context=stage is not None))
            out.append(_unread(c, ev, net))
            if stage is None:
                out.append(_unread(magnitude(ev, net), ev, net))
    return out


def magnitude(ev: Evidence, net: str) -> Comparison:
    """The share of channels bn switches off against the paper's "a quarter to a third" (at its threshold only)."""
    c = Comparison(3, f"{net}: % of channels with |γ| < {ev.threshold:g} (all channels) under bn within a quarter to "
                   "a third", (net, "bn"), None, f"% |γ| < {ev.threshold:g}", ev.small_gamma(net, "bn"), [],
                   (PAPER_SMALL_GAMMA["bn"] if ev.threshold == PAPER_THRESHOLD else None, None), target=PAPER_RANGE)
    if ev.threshold != PAPER_THRESHOLD:  # another cut-off measures something else: more seeds would not help
        c.reason = (f"the paper's range is for |γ| < {PAPER_THRESHOLD:g}, this analysis counts |γ| < {ev.threshold:g} "
                    f"(--threshold {PAPER_THRESHOLD:g} tests it)")
        return c
    return judge(c)


def _unread(c: Comparison, ev: Evidence, net: str) -> Comparison:
    """Where runs exist but their gammas could not be read, say so: more seeds would not help."""
    values = {"bn": c.a_values, "all": c.b_values}
    unread = [m for m in ("bn", "all") if (net, m) in (c.a, c.b) and not values[m] and (net, m) in ev.cells]
    if unread:
        c.reason = f"{net} mode={' and '.join(unread)}: runs without a gamma analysis (no readable checkpoint)"
        for m in unread:
            c.needs.pop((net, m), None)
    return c


def ablation(ev: Evidence) -> list[dict]:
    """Top-1 change when the small-|gamma| channels are zeroed, per bn cell: evidence, no verdict."""
    out = []
    for (net, mode), cell in sorted(ev.cells.items()):
        if mode != "bn":
            continue
        changes = [rep.ablated_top1 - rep.top1 for rep in (ev.reports.get(str(r.run_dir)) for r in cell.records)
                   if rep is not None and rep.ablated_top1 is not None]
        if changes:
            out.append({"arch": net, "mode": mode, **_summary(changes)})
    return out


def ordering(ev: Evidence, dataset: str, chance: float) -> list[Comparison]:
    out = []
    # The nets where the ordering's own modes were run (the others come with claims 1-3 on every net).
    for net in ev.nets(ORDER_ONLY) or [ORDER_NET]:
        for high, low in zip(ORDER, ORDER[1:]):
            out.append(judge(_top1(ev, 4, (net, high), (net, low), dataset)))
        none = Comparison(4, f"{net} none ≈ chance ({chance:g} %)", (net, "none"), None, "top-1 %",
                          ev.top1(net, "none"), [], (chance, None))
        out.append(judge(none, chance))
    return out


def verdict(comparisons: list[Comparison]) -> str:
    """From the deciding comparisons only (context never counts)."""
    deciding = [c for c in comparisons if not c.context]
    words = {c.verdict for c in deciding}
    if "not supported" in words:
        return "not supported"
    return "supported" if deciding and words == {"supported"} else "undecided"


def evaluate(ev: Evidence, dataset: str, chance: float) -> list[dict]:
    """The four claims of one setting: verdict, comparisons, the runs missing (arch, mode) -> seeds wanted."""
    per_claim = {1: depth_and_width(ev, dataset), 2: bn_against_random(ev, dataset), 3: switched_off(ev, dataset),
                 4: ordering(ev, dataset, chance)}
    out = []
    for number, comparisons in per_claim.items():
        wanted: dict[tuple[str, str], int] = {}
        for c in comparisons:
            for cell, seeds in c.needs.items():
                wanted[cell] = max(wanted.get(cell, 0), seeds)
        out.append({"claim": number, "title": TITLES[number], "quotes": QUOTES[number], "how": HOW[number],
                    "verdict": verdict(comparisons),
                    "comparisons": comparisons, "wanted": wanted,
                    "ablation": ablation(ev) if number == 3 else None})
    return out


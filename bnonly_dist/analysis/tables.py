"""Results tables: one row per cell (runs equal in all but the seed, cells.group), mean +- std over seeds."""
from __future__ import annotations

import csv
from pathlib import Path

from bnonly_dist.analysis import paper
from bnonly_dist.analysis.cells import Cell
from bnonly_dist.analysis.cells import mean_std as _mean_std
from bnonly_dist.analysis.gamma import GammaReport
from bnonly_dist.analysis.runs import RunRecord
from bnonly_dist.modes import MODES

MODE_ORDER = {m: i for i, m in enumerate(MODES)}


def rows(cells: list[Cell], gammas: dict[str, GammaReport], threshold: float) -> list[dict]:
    out = []
    for cell in cells:
        runs, dataset, arch_name, mode = cell.records, cell.dataset, cell.arch, cell.mode
        arch = runs[0].arch
        reports = [gammas.get(str(r.run_dir)) for r in runs]
        row = {"dataset": dataset, "arch": arch_name, "family": arch.family, "depth": arch.depth,
               "width": arch.width, "mode": mode, "setting": cell.setting,
               "trainable_params": runs[0].summary["trainable_params"],
               "runs": len(runs), "seeds": cell.seeds, "duplicates": cell.duplicates,
               "top1": _mean_std([r.summary["final"]["top1"] for r in runs]),
               "top5": _mean_std([r.summary["final"]["top5"] for r in runs]),
               "paper_top1": paper.top1(dataset, arch_name, mode),
               "gamma_small_frac": _mean_std([_small_frac(r, rep, threshold) for r, rep in zip(runs, reports)]),
               "ablated_top1": _mean_std([rep.ablated_top1 if rep else None for rep in reports]),
               "ablation_change": _mean_std([rep.ablated_top1 - rep.top1 if rep and rep.ablated_top1 is not None
                                             else None for rep in reports])}
        out.append(row)
    return sorted(out, key=lambda r: (r["dataset"], r["setting"], r["family"], r["width"], r["depth"],
                                      MODE_ORDER[r["mode"]]))


def _small_frac(record: RunRecord, report: GammaReport | None, threshold: float) -> float | None:
    """From the checkpoint if analysed, else as logged at the end of training (same threshold only)."""
    if report is not None:
        return report.small_frac
    return record.last_eval.get("gamma_small_frac") if record.cfg.train.gamma_threshold == threshold else None


def _fmt(stats, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """mean ± std, or the one value and n=1 (one seed has no spread to show)."""
    if stats is None:
        return ""
    mean, std, _ = stats
    if std is None:
        return f"{scale * mean:.{digits}f}{unit} (n=1)"
    return f"{scale * mean:.{digits}f}{unit} ± {scale * std:.{digits}f}{unit}"


def write(rows_: list[dict], folder: Path, threshold: float) -> tuple[Path, Path]:
    """results.md and results.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path = folder / "results.md", folder / "results.csv"
    with open(csv_path, "w", newline="") as f:
        fields = ["dataset", "arch", "depth", "width", "mode", "trainable_params", "runs", "seeds", "top1_mean",
                  "top1_std", "top5_mean", "top5_std", "paper_top1", "gamma_small_frac_mean", "gamma_small_frac_std",
                  "ablated_top1_mean", "ablation_change_mean", "ablation_change_std", "setting"]
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in rows_:
            flat = {k: r[k] for k in ("dataset", "arch", "depth", "width", "mode", "trainable_params", "runs",
                                      "paper_top1", "setting")}
            flat["seeds"] = " ".join(map(str, r["seeds"]))
            for key in ("top1", "top5", "gamma_small_frac", "ablation_change", "ablated_top1"):
                if r[key] is not None:
                    flat[f"{key}_mean"] = r[key][0]
                    if f"{key}_std" in fields:  # empty for one value: no spread
                        flat[f"{key}_std"] = "" if r[key][1] is None else r[key][1]
            writer.writerow(flat)
    lines = []
    for dataset in sorted({r["dataset"] for r in rows_}):
        imagenet = dataset == "imagenet"
        lines += [f"## {dataset}", "",
                  "Test accuracy in %, mean ± std over seeds (one seed: its value and n=1); paper: the published "
                  "number where there is one (±1–2, read off its figure); \\|γ\\| < t: the fraction of BN channels "
                  "with \\|γ\\| below the threshold; zeroed: top-1 after setting those channels' gamma and beta to 0, "
                  "and the change.", "",
                  "| model | mode | trainable | runs | top-1 | " + ("top-5 | " if imagenet else "paper | ")
                  + f"\\|γ\\| < {threshold} | zeroed top-1 | change |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows_ if r["dataset"] == dataset):
            third = _fmt(r["top5"]) if imagenet else ("" if r["paper_top1"] is None else f"{r['paper_top1']:g}")
            model = f"{r['arch']} ({r['setting']})" if r["setting"] else r["arch"]
            lines.append(f"| {model} | {r['mode']} | {r['trainable_params']:,} | {r['runs']} | {_fmt(r['top1'])} | "
                         f"{third} | {_fmt(r['gamma_small_frac'], 1, 100, '%')} | {_fmt(r['ablated_top1'])} | "
                         f"{_fmt(r['ablation_change'])} |")
        lines.append("")
    if any(r["setting"] for r in rows_):
        lines.append("Runs equal in everything but the seed are one row; the keys in brackets set a row's runs apart "
                     "from the other rows' (they are never averaged together).")
    for r in rows_:
        for kept, copy in r["duplicates"]:
            lines.append(f"- {copy} is {kept} again (same seed, every other key equal): counted once.")
    lines.append("")
    md.write_text("\n".join(lines))
    return md, csv_path

"""`bnonly analyze`: from run directories to the paper's tables and figures.

    results.md, results.csv      mean +- std over seeds per (data set, model, mode), the
                                 paper's number beside ours, gamma fractions, ablation
    runs.csv                     one line per run
    gamma_layers.csv             per run and BN layer: channels, fraction |gamma| < t, mean |gamma|
    figures/*.png                accuracy against depth and width; gamma/beta histograms
    claims.md, claims.json       with --claims: the paper's four claims as verdicts (claims.py),
    claims_missing.yaml          the runs that would decide what is undecided (a sweep file), and
    figures/claim*.png           a figure per claim

Runs are grouped by one rule (cells.py): runs whose identity differs only in the seed are
one cell; everything that averages over seeds reads cells.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from bnonly_dist.analysis import cells, figures, gamma, runs, tables
from bnonly_dist.data.layout import DataError
from bnonly_dist.run.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def _write_runs(records, reports, folder: Path) -> None:
    with open(folder / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_dir", "dataset", "arch", "mode", "seed", "trainable_params", "top1", "top5",
                         "gamma_small_frac", "top1_reevaluated", "ablated_top1", "ablated_channels"])
        for r in records:
            rep = reports.get(str(r.run_dir))
            writer.writerow([r.run_dir, *r.key, r.cfg.seed, r.summary["trainable_params"], r.summary["final"]["top1"],
                             r.summary["final"]["top5"], rep.small_frac if rep else "", rep.top1 if rep else "",
                             rep.ablated_top1 if rep else "", rep.ablated_channels if rep else ""])
    with open(folder / "gamma_layers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_dir", "mode", "layer", "channels", "gamma_small_frac", "gamma_abs_mean", "beta_mean"])
        for r in records:
            rep = reports.get(str(r.run_dir))
            for layer, gammas in (rep.layers.items() if rep else []):
                writer.writerow([r.run_dir, r.cfg.mode, layer, gammas.numel(), rep.small_frac_per_layer[layer],
                                 gammas.abs().mean().item(), rep.betas[layer].mean().item()])


def run(paths: list[str], out: Path, threshold: float = 0.01, ablate: bool = True, device: str = "cpu",
        claims: bool = False) -> dict:
    records = runs.collect(paths)
    if not records:
        raise DataError(f"no finished runs under {', '.join(map(str, paths))}; pass run directories, a folder "
                        "of runs (e.g. runs/) or a sweep file")
    grouped = cells.group(records)
    if claims and not any(c.dataset == "cifar10" for c in grouped):  # said before anything is written
        raise DataError("--claims: no finished CIFAR-10 runs among these; the paper's claims are about CIFAR-10 "
                        "(drop --claims for the table of other runs)")
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for record in records:
        try:
            reports[str(record.run_dir)] = gamma.analyze(record, threshold, ablate, torch.device(device))
        except (CheckpointError, DataError) as err:
            log.warning("gamma analysis of %s skipped: %s", record.run_dir, err)
    rows = tables.rows(grouped, reports, threshold)
    md, csv_path = tables.write(rows, out, threshold)
    _write_runs(records, reports, out)
    made = figures.accuracy_figures(rows, out / "figures") + figures.gamma_figures(grouped, reports,
                                                                                   out / "figures", threshold)
    result = {"runs": len(records), "groups": len(rows), "gamma_analysed": len(reports), "table": str(md),
              "csv": str(csv_path), "figures": [str(p) for p in made],
              "duplicates": sum(len(c.duplicates) for c in grouped)}
    if claims:
        from bnonly_dist.analysis import claims_report
        result["claims"] = claims_report.write(grouped, reports, threshold, out)
    return result

"""claims.md, claims.json and the sweep of what is missing, from claims.evaluate's verdicts.

`bnonly analyze ... --claims` calls write(): one section per claim and setting (cells of
different settings are never compared), the paper's number beside the user's, the rule
stated once, and a sweep file of the missing runs that launchers/sweep.py accepts.
"""
from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

import yaml

from bnonly_dist import config
from bnonly_dist.analysis import claims, claims_figures
from bnonly_dist.analysis.cells import Cell
from bnonly_dist.analysis.gamma import GammaReport
from bnonly_dist.analysis.runs import RunRecord
from bnonly_dist.data.layout import DataError, cifar10_dir

REAL_CIFAR10 = (50_000, 10_000)
NO_GPU_ESTIMATE = ("no GPU-hour estimate: the project has no GPU throughput on record (docs/benchmarks.md); "
                   "GPU-hours = training images / (images/s of `bnonly bench CONFIG model.arch=ARCH mode=MODE` "
                   "on your GPU) / 3600")


def data_note(cfg: config.Config) -> str | None:
    """What makes the verdicts say nothing about the paper: generated data, or not the whole data set."""
    if cfg.data.name == "synthetic":
        return "these runs trained on synthetic data: the verdicts exercise the pipeline and mean nothing"
    try:
        folder = cifar10_dir(cfg.data.root)
        with open(folder / "test_batch", "rb") as f:
            test = pickle.load(f, encoding="bytes")
        names, counts = test[b"filenames"], []
        for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
            with open(folder / name, "rb") as f:
                counts.append(len(pickle.load(f, encoding="bytes")[b"labels"]))
    except (OSError, DataError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as err:
        return f"the data at {cfg.data.root} could not be read ({type(err).__name__}), so it was not checked"
    if names and bytes(names[0]).startswith(b"fake_"):
        return ("these runs trained on generated data (`bnonly data fake-cifar10`): the verdicts exercise the "
                "pipeline and mean nothing about the paper")
    if (sum(counts), len(names)) != REAL_CIFAR10:
        return (f"the data has {sum(counts):,} training and {len(names):,} test images, not CIFAR-10's "
                f"{REAL_CIFAR10[0]:,} and {REAL_CIFAR10[1]:,}: the paper's numbers do not apply")
    return None


def _seeds_to_add(cell: Cell | None, wanted: int) -> list[int]:
    have = set(cell.seeds) if cell else set()
    out, seed = [], 0
    while len(have) + len(out) < wanted:
        if seed not in have:
            out.append(seed)
        seed += 1
    return out


def missing_runs(claim: dict, cells: dict[tuple[str, str], Cell]) -> list[dict]:
    return [{"arch": arch, "mode": mode, "seeds": _seeds_to_add(cells.get((arch, mode)), n)}
            for (arch, mode), n in sorted(claim["wanted"].items(),
                                          key=lambda item: (claims.net_order(item[0][0]), claims.MODE_INDEX[item[0][1]]))]


def _grids(missing: list[dict]) -> list[dict]:
    """Sweep grid blocks covering exactly the missing points: nets sharing (modes, seeds) in one block."""
    by_seeds: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for m in missing:
        by_seeds[tuple(m["seeds"])][m["arch"]].append(m["mode"])
    blocks: dict[tuple, list[str]] = defaultdict(list)
    for seeds, per_arch in by_seeds.items():
        for arch, modes in per_arch.items():
            blocks[(tuple(sorted(set(modes), key=claims.MODE_INDEX.get)), seeds)].append(arch)
    return [{"model.arch": archs, "mode": list(modes), "seed": list(seeds)} for (modes, seeds), archs in blocks.items()]


def write_sweep(folder: Path, suffix: str, reference: RunRecord, missing: list[dict]) -> Path | None:
    """claims_missing{suffix}.yaml and its base config (the reference run's own config, so every missing
    run matches the setting's runs in all but net, mode and seed)."""
    if not missing:
        return None
    base = config.read_run_config(reference.run_dir / "config.yaml")
    base["name"] = None  # one run directory per point, derived from its hyperparameters
    base_path, path = folder / f"claims_missing{suffix}_base.yaml", folder / f"claims_missing{suffix}.yaml"
    base_path.write_text(f"# The config of {reference.run_dir}, the base of {path.name}\n"
                         + yaml.safe_dump(base, sort_keys=False))
    runs = sum(len(m["seeds"]) for m in missing)
    # The resources of the paper's CIFAR sweeps (configs/sweeps/cifar_depth.yaml); flags and the cluster file win.
    slurm = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1} if reference.cfg.train.device == "cpu" else \
        {"nodes": 1, "gpus_per_node": 1, "time": "24:00:00"}
    path.write_text(f"# The runs that would decide the undecided claims (bnonly analyze --claims): {runs} runs.\n"
                    f"#   python launchers/sweep.py {path}\n"
                    + yaml.safe_dump({"config": base_path.name, "grid": _grids(missing), "slurm": slurm},
                                     sort_keys=False, default_flow_style=None))
    return path


def _spread(s: dict, sign: str = "") -> str:
    """mean ± std (n=...) of a claims._summary; one value has no spread to show."""
    mean = f"{s['mean']:{sign}.2f}"
    return f"{mean} (n=1)" if s["std"] is None else f"{mean} ± {s['std']:.2f} (n={s['n']})"


def _cell_text(values: list[float], paper: float | None) -> tuple[str, str]:
    mine = "no runs" if not values else _spread(claims._summary(values))
    return mine, "" if paper is None else f"{paper:g}"


def _row(c: dict) -> str:
    """One comparison as a table row; context rows say they are not counted."""
    a, pa = _cell_text(c["a"]["values"], c["a"]["paper"])
    if c["b"] is not None:
        b, pb = _cell_text(c["b"]["values"], c["b"]["paper"])
    else:
        b, pb = (f"range {c['target'][0]:g}–{c['target'][1]:.1f}", "") if c["target"] else ("chance", "")
    diff = "" if c["difference"] is None else f"{c['difference']:+.2f}"
    if c["interval_95"]:
        low, high = c["interval_95"]
        diff += f" [{low:.2f}, {high:.2f}] (A's mean)" if c["target"] else f" [{low:+.2f}, {high:+.2f}]"
    what = c["what"].replace("|", "\\|")  # |γ| inside a table cell
    verdict = f"context, not counted: {c['verdict']}" if c["context"] else f"**{c['verdict']}**"
    return f"| {'context: ' if c['context'] else ''}{what} | {a} | {pa} | {b} | {pb} | {diff} | {verdict}: {c['reason']} |"


def _markdown(settings: list[dict], note: str | None, out: Path) -> str:
    lines = ["# The paper's claims, from your runs", ""]
    if note:
        lines += [f"**Note: {note}.**", ""]
    lines += [f"How a verdict is reached: {claims.RULE}", "",
              "Numbers: mean ± standard deviation over seeds (n = seeds; one seed: its value, n=1); paper: "
              "docs/paper.md's number where it has one (read off the paper's figure, ±1–2 points). Rows marked "
              "context are shown beside the claim's own comparisons and are not counted in its verdict.", ""]
    for setting in settings:
        if len(settings) > 1:
            lines += [f"# Setting: {setting['setting']}", ""]
        for claim in setting["claims"]:
            lines += [f"## Claim {claim['claim']}: {claim['title']}: **{claim['verdict']}**", ""]
            lines += [f"> {q} (docs/paper.md)" for q in claim["quotes"]] + ["", claim["how"], ""]
            lines += ["| comparison | A | paper | B | paper | A − B, 95 % interval | verdict |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for c in sorted(claim["comparisons"], key=lambda c: c["context"]):  # the deciding ones first
                lines.append(_row(c))
            if claim.get("ablation"):
                lines += ["", "Top-1 change when the channels with small |γ| are zeroed (evidence; docs/paper.md "
                          "gives no number): " + "; ".join(f"{a['arch']}: {_spread(a, '+')}" for a in claim["ablation"])]
            missing = claim["missing"]
            lines += ["", "Missing: " + ("nothing; every comparison is decided." if not missing else
                                         "; ".join(f"{m['arch']} mode={m['mode']} seeds "
                                                   f"{' '.join(map(str, m['seeds']))}" for m in missing))]
            if claim.get("figure"):
                lines += ["", f"![claim {claim['claim']}]({Path(claim['figure']).relative_to(out)})"]
            lines.append("")
        lines += ["## What to run next", ""]
        if setting["missing_sweep"]:
            lines += [f"{setting['missing_runs']} runs decide what is undecided here (a point already finished is "
                      "skipped):", "", "```bash", f"python launchers/sweep.py {setting['missing_sweep']}", "```", "",
                      f"They process {setting['training_images']:,} training images; {setting['gpu_hours_note']}.", ""]
        else:
            lines += ["Nothing: every comparison is decided.", ""]
    return "\n".join(lines)


def write(cells: list[Cell], reports: dict[str, GammaReport], threshold: float, out: Path) -> dict:
    """claims.md, claims.json, a figure per claim and the missing-runs sweep per setting of CIFAR-10 runs."""
    by_setting: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.dataset == "cifar10":
            by_setting[cell.setting_key].append(cell)
    settings, notes = [], []
    for number, members in enumerate(by_setting.values()):
        suffix = f"_setting{number}" if len(by_setting) > 1 else ""
        reference = members[0].records[0]
        notes.append(data_note(reference.cfg))
        ev = claims.Evidence({(c.arch, c.mode): c for c in members}, reports, threshold)
        chance = 100 / reference.num_classes
        evaluated = claims.evaluate(ev, "cifar10", chance)
        figures = claims_figures.all_figures(ev, "cifar10", chance, out / "figures", suffix)
        missing_all: dict[tuple[str, str], list[int]] = {}
        for claim in evaluated:
            claim["missing"] = missing_runs(claim, ev.cells)
            claim["comparisons"] = [c.as_dict() for c in claim["comparisons"]]
            claim["figure"] = str(figures[claim["claim"]])
            del claim["wanted"]
            for m in claim["missing"]:
                missing_all[(m["arch"], m["mode"])] = sorted(set(missing_all.get((m["arch"], m["mode"]), [])) | set(m["seeds"]))
        missing = [{"arch": a, "mode": m, "seeds": s} for (a, m), s in
                   sorted(missing_all.items(), key=lambda i: (claims.net_order(i[0][0]), claims.MODE_INDEX[i[0][1]]))]
        sweep = write_sweep(out, suffix, reference, missing)
        runs = sum(len(m["seeds"]) for m in missing)
        settings.append({"setting": members[0].setting or "the only one", "claims": evaluated,
                         "missing_sweep": str(sweep) if sweep else None, "missing_runs": runs,
                         "training_images": runs * reference.summary["step"] * reference.cfg.data.batch_size,
                         "gpu_hours": None, "gpu_hours_note": NO_GPU_ESTIMATE})
    note = next((n for n in notes if n), None)
    md, js = out / "claims.md", out / "claims.json"
    md.write_text(_markdown(settings, note, out))
    js.write_text(json.dumps({"rule": claims.RULE, "data_note": note, "threshold": threshold, "settings": settings},
                             indent=2, default=str))
    return {"claims_md": str(md), "claims_json": str(js), "missing_sweeps": [s["missing_sweep"] for s in settings
                                                                              if s["missing_sweep"]],
            "verdicts": [{c["claim"]: c["verdict"] for c in s["claims"]} for s in settings]}

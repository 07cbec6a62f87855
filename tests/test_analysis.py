"""`bnonly analyze` on real small runs: its numbers must be the runs' own."""
import csv
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnonly_dist import analysis, models
from bnonly_dist.analysis import gamma, runs
from bnonly_dist.data.layout import load_cifar10
from bnonly_dist.launch import sweep
from bnonly_dist.run import finished, rundir, train

THRESHOLD = 0.01


@pytest.fixture(scope="module")
def mini_sweep(cifar_root, tmp_path_factory):
    """A 3 x 2 x 2 grid (two depths at width 16, two widths at depth 14) run to the end in runs/mini/ (a sweep's
    folder inside the folder of runs), plus one unfinished run in runs/."""
    root = tmp_path_factory.mktemp("mini")
    spec = root / "sweep.yaml"
    spec.write_text(
        f"config: {Path(__file__).resolve().parents[1]}/configs/cifar10_resnet14.yaml\n"
        "grid: {model.arch: [cifar_resnet_8, cifar_resnet_14, cifar_resnet_14_32], mode: [all, bn], seed: [0, 1]}\n"
        f"overrides: {{data.root: {cifar_root}, data.batch_size: 64, train.bn_batch: 64, data.eval_batch_size: 50, "
        "optim.epochs: 1, "
        f"train.device: cpu, train.deterministic: true, train.progress: lines, runs_root: {root / 'runs' / 'mini'}}}\n")
    points = sweep.load(spec).points
    for point in points:
        train.run(point.cfg, point.run_dir)
    trial = points[0].cfg.model_copy(update={"seed": 7, "train": points[0].cfg.train.model_copy(
        update={"max_steps": 2})})
    train.run(trial, root / "runs" / "unfinished")  # finished at its train.max_steps ...
    # ... then started again for all its epochs and stopped before a summary: config.yaml asks for more
    rundir.create(points[0].cfg.model_copy(update={"seed": 7}), root / "runs" / "unfinished", None).release()
    return spec, root


@pytest.fixture(scope="module")
def analysed(mini_sweep):
    spec, root = mini_sweep
    out = root / "analysis"
    result = analysis.run([str(root / "runs")], out, THRESHOLD, ablate=True)
    with open(out / "results.csv") as f:
        table = {(r["arch"], r["mode"]): r for r in csv.DictReader(f)}
    return result, out, table, runs.collect([spec])


def test_table_holds_mean_and_std_over_seeds_of_the_runs_own_results(analysed):
    result, out, table, records = analysed
    assert result["runs"] == 12 and len(table) == 6  # the unfinished run is left out
    for (arch, mode), row in table.items():
        mine = [r.summary["final"]["top1"] for r in records if r.cfg.model.arch == arch and r.cfg.mode == mode]
        assert int(row["runs"]) == 2 and row["seeds"] == "0 1"
        assert float(row["top1_mean"]) == pytest.approx(statistics.fmean(mine))
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(mine))
    assert float(table[("cifar_resnet_14", "bn")]["paper_top1"]) == 48
    assert int(table[("cifar_resnet_14", "bn")]["trainable_params"]) == 1_120
    md = (out / "results.md").read_text()
    assert "| cifar_resnet_14 | bn | 1,120 | 2 |" in md and "| 48 |" in md


def test_gamma_fractions_and_reevaluation_match_what_training_logged(analysed):
    _, out, _, records = analysed
    per_run = {row["run_dir"]: row for row in csv.DictReader(open(out / "runs.csv"))}
    for record in records:
        row = per_run[str(record.run_dir)]
        assert float(row["gamma_small_frac"]) == pytest.approx(record.last_eval["gamma_small_frac"])
        assert float(row["top1_reevaluated"]) == pytest.approx(record.summary["final"]["top1"])
    layers = list(csv.DictReader(open(out / "gamma_layers.csv")))
    bn_layers = {a: sum(isinstance(m, torch.nn.BatchNorm2d) for m in models.create(a, 10, "meta").modules())
                 for a in ("cifar_resnet_8", "cifar_resnet_14", "cifar_resnet_14_32")}
    assert bn_layers["cifar_resnet_8"] == 9  # stem, 3 blocks x 2, 2 shortcut BNs
    assert len(layers) == 4 * sum(bn_layers.values())  # 4 runs per architecture


def test_ablation_zeroes_exactly_the_small_channels(analysed):
    *_, records = analysed
    record = next(r for r in records if r.cfg.mode == "bn")
    model = gamma.load_model(record)
    gammas = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    for threshold in (0.3, 100.0):
        report = gamma.analyze(record, threshold, ablate=True, device=torch.device("cpu"))
        assert report.ablated_channels == int((gammas.abs() < threshold).sum())
        assert report.small_frac == pytest.approx((gammas.abs() < threshold).float().mean().item())
    # every channel off: the output no longer depends on the image, so accuracy is one class's share
    labels = load_cifar10(record.cfg.data.root)["test"][1].tolist()
    shares = {100 * labels.count(c) / len(labels) for c in set(labels)}
    assert report.ablated_channels == gammas.numel()
    assert any(report.ablated_top1 == pytest.approx(share) for share in shares)


def test_figures_are_written(analysed):
    result, out, *_ = analysed
    names = {p.rsplit("/", 1)[1] for p in result["figures"]}
    assert {"cifar10_depth.png", "cifar10_width.png", "gamma_cifar10_cifar_resnet_14.png"} <= names
    for path in result["figures"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_without_finished_runs_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "analyze", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no finished runs" in proc.stderr and proc.stderr.count("\n") == 1


def test_claims_end_to_end_on_real_runs(mini_sweep):
    """--claims on the grid's runs: all four claims with a verdict and a missing-runs list, the generated
    data said, and a missing-runs sweep that launchers/sweep.py accepts."""
    import json
    spec, root = mini_sweep
    out = root / "claims"
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.cli", "analyze", str(spec), "--claims", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "claims.json").read_text())
    assert "generated data" in report["data_note"] and "Welch" in report["rule"]
    (setting,) = report["settings"]
    assert [c["claim"] for c in setting["claims"]] == [1, 2, 3, 4]
    for claim in setting["claims"]:
        assert claim["verdict"] in ("supported", "not supported", "undecided")
        assert isinstance(claim["missing"], list) and claim["comparisons"]
        assert open(claim["figure"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    depth = next(c for c in setting["claims"][0]["comparisons"] if c["what"].startswith("depth"))
    assert (depth["a"]["arch"], depth["b"]["arch"], depth["a"]["n"]) == ("cifar_resnet_14", "cifar_resnet_8", 2)
    missing = {(m["arch"], m["mode"]) for c in setting["claims"] for m in c["missing"]}
    assert ("cifar_resnet_14", "random_per_channel") in missing and ("cifar_resnet_14", "none") in missing
    md = (out / "claims.md").read_text()
    assert md.count("## Claim ") == 4 and "generated data" in md and "Missing: " in md
    assert "within a ratio of 1.25" in md  # the pairing rule is part of the output
    assert "python launchers/sweep.py" in proc.stdout
    dry = subprocess.run([sys.executable, "launchers/sweep.py", setting["missing_sweep"], "--dry-run"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("to submit") == setting["missing_runs"] > 0


def test_a_copied_run_is_counted_once(mini_sweep, tmp_path):
    import shutil
    spec, _ = mini_sweep
    cell = [p.run_dir for p in sweep.load(spec).points if p.cfg.model.arch == "cifar_resnet_8" and p.cfg.mode == "bn"]
    shutil.copytree(cell[0], tmp_path / "copy")
    result = analysis.run([*map(str, cell), str(tmp_path / "copy")], tmp_path / "out", THRESHOLD, ablate=False)
    (row,) = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert result["duplicates"] == 1 and row["runs"] == "2" and row["seeds"] == "0 1"
    assert f"{tmp_path / 'copy'} is {cell[0]} again" in (tmp_path / "out" / "results.md").read_text()


def test_the_unfinished_run_is_skipped_saying_why(mini_sweep, caplog):
    _, root = mini_sweep
    with caplog.at_level(logging.WARNING):
        assert len(runs.collect([root / "runs"])) == 12  # runs/mini/<run> found below runs/
    assert f"skipping {root / 'runs' / 'unfinished'}: not finished; its summary.json is from step 2, before the end " \
        "its config.yaml asks for (optim.epochs=1)" in caplog.text
    assert "1 of 13 run directories skipped, each for the reason said above" in caplog.text


def test_a_trial_finished_at_its_max_steps_is_finished_for_train_analyze_and_sweeps(tiny_cfg, tmp_path, capsys,
                                                                                   caplog):
    """One meaning of finished (run/finished.py): a run that reached its train.max_steps; found at any depth."""
    trial = tiny_cfg("train.max_steps=3")
    run_dir = tmp_path / "runs" / "trials" / "a"  # a sweep's folder inside the folder of runs
    summary = train.run(trial, run_dir)
    assert summary["step"] == 3 and json.loads((run_dir / "summary.json").read_text())["finished"] is True
    capsys.readouterr()
    assert train.run(trial, run_dir)["step"] == 3 and "finished at step 3" in capsys.readouterr().out
    (tmp_path / "runs" / "lost").mkdir()
    (tmp_path / "runs" / "lost" / "metrics.jsonl").write_text("")  # a run's folder that lost its config.yaml
    logging.getLogger().addHandler(caplog.handler)  # training's setup_logging replaced the root's handlers
    with caplog.at_level(logging.WARNING):
        assert [r.run_dir for r in runs.collect([tmp_path / "runs"])] == [run_dir]
    assert f"skipping {tmp_path / 'runs' / 'lost'}: it holds metrics.jsonl but no config.yaml" in caplog.text
    assert sweep.Point((), trial, run_dir).finished()
    whole = tiny_cfg()  # the same run asked for all its epochs: not finished, so a start would go on from step 3
    assert not sweep.Point((), whole, run_dir).finished() and not finished.reached_end(summary, whole)

"""The claims' verdicts (bnonly analyze --claims) and the one grouping rule they share with the
table, on run records made for the test; the end-to-end run on real runs is in test_analysis.py."""
import logging
import re
from pathlib import Path

import pytest

from bnonly_dist import config
from bnonly_dist.analysis import cells, claims, claims_report, runs, stats, tables
from bnonly_dist.launch import sweep

BN_COUNT = {"cifar_resnet_14": 1_120, "cifar_resnet_110": 8_288, "cifar_resnet_14_128": 8_960}


def record(arch, mode, seed, top1, *overrides, trainable=None, run_dir=None):
    cfg = config.load("configs/cifar10_resnet14.yaml", [f"model.arch={arch}", f"mode={mode}", f"seed={seed}",
                                                         "data.root=/nowhere", *overrides])
    summary = {"trainable_params": trainable or BN_COUNT.get(arch, 1_120), "final": {"top1": top1, "top5": 99.0},
               "fingerprint": f"{arch}-{mode}-{seed}-{top1}", "step": 10, "finished": True}
    return runs.RunRecord(Path(run_dir or f"/runs/{arch}_{mode}_{seed}_{'_'.join(overrides)}"), cfg, summary,
                          summary["final"])


def evidence(records):
    grouped = cells.group(records)
    assert len({c.setting_key for c in grouped}) == 1
    return claims.Evidence({(c.arch, c.mode): c for c in grouped}, {}, 0.01)


def seeds(arch, mode, values, **kw):
    return [record(arch, mode, s, v, **kw) for s, v in enumerate(values)]


def budget_comparison(ev):
    """Claim 1's deciding comparison: the deeper net against the wider one at an equal BN budget."""
    return next(c for c in claims.depth_and_width(ev, "cifar10") if c.what.startswith("deeper beats wider"))


DEEP, WIDE = "cifar_resnet_110", "cifar_resnet_14_128"  # 8,288 and 8,960 BN parameters


def test_a_clear_win_is_supported_and_needs_nothing():
    ev = evidence(seeds(DEEP, "bn", [70.1, 71.0, 69.5]) + seeds(WIDE, "bn", [64.2, 63.5, 65.0]))
    c = budget_comparison(ev)
    assert (c.a, c.b) == ((DEEP, "bn"), (WIDE, "bn")) and not c.context
    assert c.verdict == "supported" and c.interval[0] > 0 and not c.needs
    assert c.paper == (69.5, 64.5)  # docs/paper.md's numbers beside the user's


def test_a_clear_loss_is_not_supported():
    c = budget_comparison(evidence(seeds(DEEP, "bn", [40.1, 41.0, 39.5]) + seeds(WIDE, "bn", [48.2, 47.5, 49.0])))
    assert c.verdict == "not supported" and c.interval[1] < 0 and not c.needs


def test_overlapping_seeds_are_undecided_and_ask_for_more_seeds():
    c = budget_comparison(evidence(seeds(DEEP, "bn", [50.0, 60.0, 45.0]) + seeds(WIDE, "bn", [48.2, 55.0, 44.0])))
    assert c.verdict == "undecided" and c.interval[0] < 0 < c.interval[1] and "covers 0" in c.reason
    assert c.needs == {(DEEP, "bn"): 5, (WIDE, "bn"): 5}


def test_one_seed_per_cell_is_indicative_only():
    ev = evidence([record(DEEP, "bn", 0, 70.0), record(WIDE, "bn", 0, 48.0)])
    c = budget_comparison(ev)
    assert c.verdict == "undecided" and "one seed per cell: indicative only" in c.reason and c.diff == 22.0
    claim = next(x for x in claims.evaluate(ev, "cifar10", 10.0) if x["claim"] == 1)
    missing = {(m["arch"], m["mode"]): m["seeds"] for m in claims_report.missing_runs(claim, ev.cells)}
    assert missing == {(DEEP, "bn"): [1, 2], (WIDE, "bn"): [1, 2]}


def test_a_missing_partner_is_undecided_and_listed():
    ev = evidence(seeds("cifar_resnet_14", "bn", [48.0, 49.0, 47.0]))
    c = budget_comparison(ev)  # no wide net run: the claims grid's pair
    assert (c.a[0], c.b[0]) == (DEEP, WIDE)
    assert c.verdict == "undecided" and c.reason == f"no runs of {DEEP} mode=bn and {WIDE} mode=bn"
    assert c.needs == {(DEEP, "bn"): 3, (WIDE, "bn"): 3}


def test_claim_1_is_decided_by_the_equal_budget_not_by_depth_or_width_alone():
    """Deeper beats wider at an equal BN budget: supported, though ResNet-110 trails ResNet-14 (a depth step
    that is context) and WRN-14-8 ties ResNet-14 (a width step): neither enters the verdict or asks for runs."""
    ev = evidence(seeds(DEEP, "bn", [70.1, 71.0, 69.5]) + seeds(WIDE, "bn", [64.2, 63.5, 65.0])
                  + seeds("cifar_resnet_14", "bn", [74.0, 75.0, 73.5]))
    comparisons = claims.depth_and_width(ev, "cifar10")
    depth = next(c for c in comparisons if c.what.startswith("depth"))
    assert depth.context and depth.verdict == "not supported" and not depth.needs
    assert claims.verdict(comparisons) == "supported"


def test_unequal_trainable_counts_are_refused_as_evidence_for_claim_2():
    ev = evidence(seeds("cifar_resnet_14", "bn", [48.0, 49.0, 47.0])
                  + seeds("cifar_resnet_14", "random_per_channel", [20.0, 21.0, 19.0], trainable=1_200)
                  + seeds("cifar_resnet_14", "output", [30.0, 31.0, 29.0], trainable=650))
    by_pair = {(c.a[1], c.b[1]): c for c in claims.bn_against_random(ev, "cifar10")}
    refused = by_pair[("bn", "random_per_channel")]
    assert refused.verdict == "undecided" and refused.reason.startswith("refused as evidence") and not refused.needs
    assert by_pair[("bn", "output")].verdict == "supported"
    assert by_pair[("random_per_channel", "output")].verdict == "not supported"
    equal = evidence(seeds("cifar_resnet_14", "bn", [48.0, 49.0, 47.0])
                     + seeds("cifar_resnet_14", "random_per_channel", [20.0, 21.0, 19.0]))
    assert next(c for c in claims.bn_against_random(equal, "cifar10") if c.b[1] == "random_per_channel").verdict \
        == "supported"


def test_claim_2_is_decided_by_bn_above_random_per_channel_alone():
    """The paper: BN beats as many random parameters elsewhere. random_per_channel below output is context: it
    neither makes the claim "not supported" nor asks for runs; without output runs nothing is missing."""
    ev = evidence(seeds("cifar_resnet_14", "bn", [48.0, 49.0, 47.0])
                  + seeds("cifar_resnet_14", "random_per_channel", [34.0, 36.5, 35.0])
                  + seeds("cifar_resnet_14", "output", [40.0, 41.0, 39.5]))
    comparisons = claims.bn_against_random(ev, "cifar10")
    by_pair = {(c.a[1], c.b[1]): c for c in comparisons}
    assert not by_pair[("bn", "random_per_channel")].context
    assert by_pair[("random_per_channel", "output")].context and by_pair[("bn", "output")].context
    assert by_pair[("random_per_channel", "output")].verdict == "not supported"
    assert claims.verdict(comparisons) == "supported"
    alone = evidence(seeds("cifar_resnet_14", "bn", [48.0, 49.0, 47.0])
                     + seeds("cifar_resnet_14", "random_per_channel", [34.0, 36.5, 35.0]))
    claim = next(x for x in claims.evaluate(alone, "cifar10", 10.0) if x["claim"] == 2)
    assert claim["verdict"] == "supported" and claim["wanted"] == {}


def gamma_seeds(arch, mode, fractions):
    out = seeds(arch, mode, [50.0] * len(fractions))
    for r, fraction in zip(out, fractions):
        r.last_eval = {"gamma_small_frac": fraction / 100}  # as training logged it, at |gamma| < 0.01
    return out


def test_claim_3_tests_the_papers_quarter_to_a_third_too():
    """1.8 % against 1.3 %: the direction may stay undecided, the magnitude is far below a quarter: not supported."""
    few = evidence(gamma_seeds("cifar_resnet_14", "bn", [1.8, 2.6, 1.0]) + gamma_seeds("cifar_resnet_14", "all", [1.3, 0.4, 2.2]))
    comparisons = claims.switched_off(few, "cifar10")
    direction, size = comparisons[0], comparisons[1]
    assert direction.verdict == "undecided" and not direction.context
    assert size.target == claims.PAPER_RANGE and size.verdict == "not supported" and not size.context
    assert "outside the paper's 25–33.3" in size.reason and size.interval[1] < 25
    claim = next(x for x in claims.evaluate(few, "cifar10", 10.0) if x["claim"] == 3)
    assert claim["verdict"] == "not supported"
    paper_like = evidence(gamma_seeds("cifar_resnet_14", "bn", [27.0, 28.5, 29.0])
                          + gamma_seeds("cifar_resnet_14", "all", [9.0, 8.5, 10.0]))
    assert [c.verdict for c in claims.switched_off(paper_like, "cifar10")] == ["supported", "supported"]
    across = evidence(gamma_seeds("cifar_resnet_14", "bn", [20.0, 30.0, 26.0]))  # the interval crosses 25
    assert claims.magnitude(across, "cifar_resnet_14").verdict == "undecided"
    other = claims.Evidence(paper_like.cells, {}, 0.05)  # another cut-off: the paper's range says nothing of it
    assert claims.magnitude(other, "cifar_resnet_14").verdict == "undecided" and "--threshold 0.01" in claims.magnitude(
        other, "cifar_resnet_14").reason


def test_ordering_and_chance():
    modes = {"all": 90, "bn_shortcut_output": 63, "bn_output": 55, "bn": 48, "output": 30, "none": 10}
    ev = evidence([r for mode, top1 in modes.items() for r in seeds("cifar_resnet_14", mode, [top1 - 0.4, top1, top1 + 0.5])])
    comparisons = claims.ordering(ev, "cifar10", 10.0)
    assert [c.verdict for c in comparisons] == ["supported"] * 6
    assert claims.verdict(comparisons) == "supported"
    deeper = evidence([r for mode, top1 in modes.items() for r in seeds("cifar_resnet_14", mode, [top1, top1 + 1])]
                      + seeds("cifar_resnet_110", "bn", [70.0, 71.0]) + seeds("cifar_resnet_110", "all", [93.0, 93.5]))
    assert {c.a[0] for c in claims.ordering(deeper, "cifar10", 10.0)} == {"cifar_resnet_14"}  # where it was run
    off = evidence(seeds("cifar_resnet_14", "none", [30.0, 31.0, 29.5]))
    assert claims.ordering(off, "cifar10", 10.0)[-1].verdict == "not supported"


def test_claim_verdict_is_the_worst_of_its_comparisons():
    win, loss, open_ = (claims.Comparison(1, "", ("a", "bn"), ("b", "bn"), "", [], [], verdict=v)
                        for v in ("supported", "not supported", "undecided"))
    assert claims.verdict([win, win]) == "supported"
    assert claims.verdict([win, open_]) == "undecided"
    assert claims.verdict([win, open_, loss]) == "not supported"
    assert claims.verdict([]) == "undecided"


def test_runs_that_differ_in_more_than_the_seed_are_never_pooled(caplog):
    short = seeds("cifar_resnet_20", "bn", [80.0, 81.0], run_dir=None)
    long_ = [record("cifar_resnet_20", "bn", 0, 10.0, "optim.epochs=2")]
    copy = record("cifar_resnet_20", "bn", 0, 80.0, run_dir="/elsewhere/copy_of_seed0")
    copy.summary["fingerprint"] = short[0].summary["fingerprint"]
    with caplog.at_level(logging.WARNING):
        grouped = cells.group(short + long_ + [copy])
    assert sorted(len(c.records) for c in grouped) == [1, 2]
    assert sorted(c.setting for c in grouped) == ["optim.epochs=160", "optim.epochs=2"]
    kept = next(c for c in grouped if len(c.records) == 2)
    assert len(kept.duplicates) == 1 and "counted once" in caplog.text
    rows = tables.rows(grouped, {}, 0.01)
    assert sorted((r["runs"], r["top1"]) for r in rows) == [
        (1, (10.0, None, 1)), (2, (80.5, pytest.approx(0.7071, abs=1e-4), 2))]
    # and the claims compare only within a setting: a depth pair split across settings is no evidence
    deep = record("cifar_resnet_110", "bn", 0, 70.0, "optim.epochs=2")
    split = cells.group(short + [deep])
    assert len({c.setting_key for c in split}) == 2  # so no Evidence ever holds both cells


def test_table_rows_name_the_keys_that_set_runs_apart(tmp_path):
    grouped = cells.group(seeds("cifar_resnet_20", "bn", [80.0, 81.0]) + [record("cifar_resnet_20", "bn", 0, 10.0,
                                                                                "optim.epochs=2")])
    md, _ = tables.write(tables.rows(grouped, {}, 0.01), tmp_path, 0.01)
    text = md.read_text()
    assert "| cifar_resnet_20 (optim.epochs=160) | bn | 1,120 | 2 | 80.50 ± 0.71 |" in text
    # one seed: its value and n=1, no spread of 0.00 that was never measured
    assert "| cifar_resnet_20 (optim.epochs=2) | bn | 1,120 | 1 | 10.00 (n=1) |" in text and "± 0.00" not in text


def test_quotes_are_docs_paper_md_verbatim():
    page = re.sub(r"\s+", " ", Path("docs/paper.md").read_text().replace("\n- ", "\n"))
    for quotes in claims.QUOTES.values():
        for quote in quotes:
            assert quote in page


def test_welch_interval_and_t_quantiles():
    assert [round(stats.t_quantile(0.975, df), 3) for df in (1, 2, 4, 30)] == [12.706, 4.303, 2.776, 2.042]
    d = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.5])  # by hand: se = sqrt(1/3 + 1.5833/3), df = 3.806
    assert d.diff == pytest.approx(-19 / 6) and d.df == pytest.approx(3.806, abs=1e-3)
    assert d.high == pytest.approx(-19 / 6 + stats.t_quantile(0.975, d.df) * (1 / 3 + 1.58333 / 3) ** 0.5, abs=1e-3)
    assert stats.welch([1.0], [2.0, 3.0]).low is None


def test_missing_runs_become_a_sweep_of_exactly_those_points(tmp_path):
    run_dir = tmp_path / "ref"
    run_dir.mkdir()
    ref = record("cifar_resnet_14", "bn", 0, 48.0, f"runs_root={tmp_path / 'runs'}", run_dir=run_dir)
    config.save(ref.cfg, run_dir / "config.yaml")
    missing = [{"arch": "cifar_resnet_14", "mode": "bn", "seeds": [1, 2]},
               {"arch": "cifar_resnet_110", "mode": "bn", "seeds": [0, 1, 2]},
               {"arch": "cifar_resnet_110", "mode": "output", "seeds": [0, 1, 2]}]
    path = claims_report.write_sweep(tmp_path, "", ref, missing)
    points = sweep.load(path).points
    got = sorted((p.cfg.model.arch, p.cfg.mode, p.cfg.seed) for p in points)
    assert got == sorted((m["arch"], m["mode"], s) for m in missing for s in m["seeds"])
    for p in points:  # the same setting as the reference run
        assert cells.setting_of(runs.RunRecord(p.run_dir, p.cfg, {}, {})) == cells.setting_of(ref)


def test_sweep_grid_may_be_a_list_of_grids(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {Path('configs/cifar10_resnet14.yaml').resolve()}\n"
                    "grid:\n  - {model.arch: [cifar_resnet_14, cifar_resnet_20], mode: [bn], seed: [0]}\n"
                    "  - {model.arch: [cifar_resnet_14], mode: [all, none], seed: [0, 1]}\n"
                    f"overrides: {{runs_root: {tmp_path}}}\n")
    assert len(sweep.load(spec).points) == 2 + 4
    spec.write_text(spec.read_text().replace("mode: [all, none]", "mode: [bn]"))
    with pytest.raises(config.ConfigError, match="the same point twice"):
        sweep.load(spec)


def test_unread_runs_say_what_is_true(tmp_path, caplog):
    (tmp_path / "started").mkdir()
    with caplog.at_level(logging.WARNING):
        assert runs.read(tmp_path / "never") is None
        assert runs.read(tmp_path / "started") is None
    assert "never launched (no run directory yet)" in caplog.text
    assert "no Slurm job recorded" in caplog.text and "may still be running" not in caplog.text


def test_a_sweep_never_launched_is_said_so_once(tmp_path, caplog):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {Path('configs/cifar10_resnet14.yaml').resolve()}\n"
                    f"grid: {{mode: [bn, all], seed: [0, 1]}}\noverrides: {{runs_root: {tmp_path / 'runs'}}}\n")
    with caplog.at_level(logging.WARNING):
        assert runs.collect([spec]) == []
    assert caplog.text.count("never launched") == 1 and "skipping 4 of 4 points" in caplog.text
    assert "still be running" not in caplog.text


def test_claims_need_cifar10_runs_and_say_so_before_writing(tmp_path, monkeypatch):
    from bnonly_dist import analysis
    from bnonly_dist.data.layout import DataError
    synthetic = record("cifar_resnet_14", "bn", 0, 50.0)
    synthetic.cfg = synthetic.cfg.model_copy(update={"data": synthetic.cfg.data.model_copy(update={"name": "synthetic"})})
    monkeypatch.setattr(runs, "collect", lambda paths: [synthetic])
    with pytest.raises(DataError, match="no finished CIFAR-10 runs"):
        analysis.run(["x"], tmp_path / "out", claims=True)
    assert not (tmp_path / "out").exists()

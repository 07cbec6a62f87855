"""The arguments of every `bnonly` command: names, defaults and the help each --help shows (cli.py runs them)."""
from __future__ import annotations

import argparse
from pathlib import Path

from bnonly_dist.config.catalog import ARCH_FORMS, MODES
from bnonly_dist.launch import restart

TRAIN_EPILOG = f"""modes (mode=...): {", ".join(MODES)}
architectures (model.arch=...): {ARCH_FORMS}
every config key with its meaning: bnonly config --keys; a config resolved: bnonly config CONFIG [key=value ...]
"""


def parser(handlers: dict) -> argparse.ArgumentParser:
    """The parser; handlers: command name -> the function that runs it (args.func)."""
    p = argparse.ArgumentParser(prog="bnonly", description="BatchNorm-only training of random-feature ResNets")
    sub = p.add_subparsers(dest="command", required=True)
    add = _with_description(sub)

    t = add("train", help="train one run (resumes if its run directory has a checkpoint)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    t.add_argument("config", help="YAML config, e.g. configs/cifar10_resnet56.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.2 mode=bn")
    t.add_argument("--run-dir", type=Path, help="run directory (default: runs/<derived from the config>)")
    t.set_defaults(func=handlers["train"])

    e = add("eval", help="evaluate a run's newest checkpoint: top-1, top-5, per-class accuracy "
                       "(written to RUN/eval.jsonl)")
    e.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and checkpoints/)")
    e.add_argument("overrides", nargs="*", help="data.*, train.device and train.precision overrides, "
                   "e.g. data.root=/other/copy/of/cifar10")
    e.add_argument("--other-data", action="store_true", help="evaluate on a data set other than the one the run "
                   "trained on (refused without it; eval.jsonl records which data each evaluation used)")
    e.set_defaults(func=handlers["eval"])

    g = add("config", help="print a config resolved, each key with its value, source and meaning")
    g.add_argument("config", nargs="?", help="YAML config (omit with --keys)")
    g.add_argument("overrides", nargs="*", help="key=value overrides")
    g.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    _world_argument(g)
    g.set_defaults(func=handlers["config"])

    a = add("analyze", help="tables and figures from finished runs (run dirs, folders of runs, sweeps)")
    a.add_argument("paths", nargs="+", help="run directories, folders of runs (runs/) or sweep files")
    a.add_argument("--out", type=Path, default=Path("analysis"), help="output folder (default: analysis/)")
    a.add_argument("--threshold", type=float, default=0.01, help="|gamma| below this counts as switched off")
    a.add_argument("--no-ablation", action="store_true", help="skip re-evaluating with small-gamma channels zeroed")
    a.add_argument("--device", default="cpu", help="device for the ablation's evaluations (cpu, cuda)")
    a.add_argument("--claims", action="store_true", help="also claims.md/.json: the paper's four claims as verdicts "
                   "from these runs, and a sweep file of the runs that would decide the undecided ones")
    a.set_defaults(func=handlers["analyze"])

    r = add("run-dir", help="print the run directory a config trains in (for scripts); with --world, check the "
            "config's BN grouping on that many ranks first")
    r.add_argument("config", help="YAML config, e.g. configs/cifar10_resnet56.yaml")
    r.add_argument("overrides", nargs="*", help="key=value overrides, as for bnonly train")
    _world_argument(r)
    r.set_defaults(func=handlers["run-dir"])

    w = add("sweep-points", help="one line per grid point of a sweep file: config, overrides, run dir")
    w.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/cifar_depth.yaml")
    w.add_argument("overrides", nargs="*", help="key=value overrides for every point (e.g. data.root=...)")
    w.set_defaults(func=handlers["sweep-points"])

    rt = add("retry", help="a script's restart decisions (exit 0: go on, 1: stop), recorded in "
                        "RUN/history.jsonl (see docs/failures.md)")
    rt.add_argument("run_dir", type=Path, help="the run directory of the training that ended")
    when = rt.add_mutually_exclusive_group(required=True)
    when.add_argument("--exit-code", type=int, help="after `bnonly train` failed: its exit status (srun's); "
                      "restart it?")
    when.add_argument("--requeued", type=int, metavar="N", help="at the start of a Slurm job: "
                      "$SLURM_RESTART_COUNT; a requeue the run before did not ask for (a node failed) counts as a "
                      "failure: go on?")
    when.add_argument("--stopped", action="store_true", help="before the script requeues a job stopped with a "
                      "checkpoint (time limit, preemption): record the stop")
    rt.add_argument("--series", required=True, help="what the restarts are counted per, e.g. $SLURM_JOB_ID")
    rt.add_argument("--since", type=float, default=0.0, help="when the failed attempt started (seconds since "
                    "the epoch): failure notes older than this are not its own")
    rt.add_argument("--max-failures", type=int, default=restart.DEFAULT_MAX_FAILURES,
                    help=f"restarts per series (default {restart.DEFAULT_MAX_FAILURES}; 0: never)")
    rt.set_defaults(func=handlers["retry"])

    b = add("bench", help="time training steps on synthetic data, variants in turns: mode=all, "
                       "mode=bn plain and lean")
    b.add_argument("config", help="YAML config, e.g. configs/imagenet_resnet50.yaml")
    b.add_argument("overrides", nargs="*", help="key=value overrides")
    b.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the timed ones (default 3)")
    b.add_argument("--variants", default="all,bn-plain,bn-lean",
                   help="comma-separated, from all, bn-plain, bn-lean, naive (NCHW, plain autograd)")
    b.add_argument("--data", action="store_true", help="also time the configured data pipeline alone (needs data.root)")
    b.add_argument("--max-batch-limit", type=int, default=4096,
                   help="GPU: search the largest batch that fits up to this (0: skip the search)")
    b.add_argument("--max-batch-only", action="store_true", help="only search each variant's largest batch "
                   "(up to --max-batch-limit; also on the CPU), no timing")
    b.add_argument("--json", help="also write the report as JSON here")
    b.set_defaults(func=handlers["bench"])

    bc = add("bench-checkpoint", help="checkpoint size and save/load time, frozen weights out vs in")
    bc.add_argument("config", help="YAML config whose model is checkpointed, e.g. configs/imagenet_resnet200.yaml")
    bc.add_argument("overrides", nargs="*", help="key=value overrides")
    bc.add_argument("--dir", type=Path, default=Path("runs/bench-checkpoint"), help="where to write its "
                    "checkpoints, removed after each timing (put it on the file system your runs use)")
    bc.add_argument("--repeats", type=int, default=3, help="timings per variant (default 3; the median is reported)")
    bc.add_argument("--json", help="also write the report as JSON here")
    bc.set_defaults(func=handlers["bench-checkpoint"])

    m = add("model-info", help="parameter counts of an architecture as JSON")
    m.add_argument("arch", help="e.g. cifar_resnet_110, cifar_resnet_14_64, imagenet_resnet_200")
    m.add_argument("--num-classes", type=int, help="output classes (default: the architecture's data set's: 10 for "
                   "cifar_*, 1000 for imagenet_*)")
    m.set_defaults(func=handlers["model-info"])

    d = add("data", help="write small data sets in the real formats, or check one")
    dsub = d.add_subparsers(dest="data_command", required=True)
    add_data = _with_description(dsub)
    c = add_data("fake-cifar10", help="write DIR/cifar-10-batches-py")
    c.add_argument("dir", help="a scratch folder (never your real data's): data.root for the run")
    c.add_argument("--train-size", type=int, default=2560, help="training images (default 2560)")
    c.add_argument("--test-size", type=int, default=1000, help="test images (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the images (default 0)")
    i = add_data("fake-imagenet", help="write DIR/{train,val}/<class>/*.JPEG")
    i.add_argument("dir", help="a scratch folder (never your real data's): data.root for the run")
    i.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    i.add_argument("--train-per-class", type=int, default=32, help="training images per class (default 32)")
    i.add_argument("--val-per-class", type=int, default=10, help="validation images per class (default 10)")
    i.add_argument("--seed", type=int, default=0, help="seed of the images (default 0)")
    i.add_argument("--min-side", type=int, default=64, help="image sides are drawn from [min, max)")
    i.add_argument("--max-side", type=int, default=160, help="real ImageNet: about 333 to 500 (for decode speed)")
    i.add_argument("--photo-like", action="store_true", help="little pixel noise: files of a photograph's size "
                   "and decode cost (for decode benchmarks)")
    for q in (c, i):
        q.add_argument("--force", action="store_true", help="write over a data set already in DIR (refused "
                       "without it, unless DIR holds this very one)")
    k = add_data("check", help="validate a CIFAR-10 or ImageNet layout")
    k.add_argument("dir", help="data.root of a run: the folder with cifar-10-batches-py/, or with train/ and val/")
    k.add_argument("--decode", action="store_true", help="decode every image to find corrupt ones")
    for q in (d, c, i, k):
        q.set_defaults(func=handlers["data"])
    return p


def _with_description(subparsers):
    """add_parser that shows a command's help line also at the top of its own --help."""
    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        return subparsers.add_parser(name, **kwargs)
    return add


def _world_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, metavar="N", help="the number of ranks (GPUs) it will run on: check that "
                   "data.batch_size and train.bn_batch form the BN groups there")

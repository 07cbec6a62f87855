"""`bnonly train|eval|config|analyze|bench|bench-checkpoint|model-info|run-dir|sweep-points|retry|data`:
the command-line front door. Heavy imports (torch, DALI, DeepSpeed) happen inside the
commands, so every --help answers at once. A Ctrl-C at any moment, from the first import on,
ends the command in one line with exit 130 (a training run notes it: never retried)."""
from __future__ import annotations

import os
import signal
import sys

from bnonly_dist.run import early_signals  # first: a Ctrl-C while the rest imports ends in one line

_GUARDED = early_signals.end_on_ctrl_c()
_ARGS = None  # the command line once parsed: what a Ctrl-C's one line and note need

import argparse  # noqa: E402  (the imports below run under the guard)
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from bnonly_dist.config import ConfigError, load, load_with_sources, parse_args  # noqa: E402
from bnonly_dist.config.catalog import ARCH_FORMS, MODES  # noqa: E402
from bnonly_dist.launch import restart  # noqa: E402
from bnonly_dist.run import history  # noqa: E402
from bnonly_dist.run.history import Kind  # noqa: E402
from bnonly_dist.run.paths import run_dir as run_dir_of  # noqa: E402

if _GUARDED:  # imported: Ctrl-C raises KeyboardInterrupt again (main() decides per command)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _train(args) -> None:
    with early_signals.kept():  # a stop signal during start-up stops the run at its first step, with a checkpoint
        from bnonly_dist import dist
        from bnonly_dist.run import train
        train.run(load(args.config, args.overrides), args.run_dir)
        dist.teardown()


def _eval(args) -> None:
    from bnonly_dist import dist
    from bnonly_dist.run import eval_run
    eval_run.run(args.run_dir, args.overrides)
    dist.teardown()


def _config(args) -> None:
    from bnonly_dist.config import reference as config_reference
    if args.keys or args.config is None:
        print(config_reference.key_list())
        return
    cfg, sources = load_with_sources(args.config, args.overrides)
    print(config_reference.resolved(cfg, sources))


def _analyze(args) -> None:
    from bnonly_dist import analysis
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = analysis.run(args.paths, args.out, args.threshold, not args.no_ablation, args.device, args.claims)
    print(f"{result['runs']} runs in {result['groups']} groups of seeds ({result['gamma_analysed']} with gamma analysis"
          f"{'; ' + str(result['duplicates']) + ' duplicate runs counted once' if result['duplicates'] else ''})")
    print(f"table: {result['table']} and {result['csv']}")
    for figure in result["figures"]:
        print(f"figure: {figure}")
    if "claims" in result:
        claims = result["claims"]
        print(f"claims: {claims['claims_md']} and {claims['claims_json']}: "
              + "; ".join(", ".join(f"{n} {v}" for n, v in s.items()) for s in claims["verdicts"]))
        for sweep in claims["missing_sweeps"]:
            print(f"missing runs: python launchers/sweep.py {sweep}")


def _run_dir(args) -> None:
    cfg = load(args.config, args.overrides)
    print(run_dir_of(cfg).resolve())


def _sweep_points(args) -> None:
    import shlex

    from bnonly_dist.launch import sweep
    spec = sweep.load(args.sweep, args.overrides)
    for point in spec.points:  # shell words: config, overrides, run directory
        print(shlex.join([str(spec.config), *spec.common, *point.overrides, str(point.run_dir)]))


def _bench(args) -> None:
    from bnonly_dist.perf import bench
    report = bench.run(load(args.config, args.overrides), steps=args.steps, warmup=args.warmup,
                       variants=[v for v in args.variants.split(",") if v], with_data=args.data,
                       max_batch_limit=args.max_batch_limit, echo=lambda line: print(line, flush=True),
                       max_batch_only=args.max_batch_only)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"JSON report: {args.json}")


def _bench_checkpoint(args) -> None:
    from bnonly_dist.perf import bench_checkpoint
    report = bench_checkpoint.run(load(args.config, args.overrides), args.dir, args.repeats)
    if os.environ.get("RANK", "0") != "0":
        return
    print(bench_checkpoint.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _model_info(args) -> None:
    from bnonly_dist.models import info
    try:
        print(json.dumps(info(args.arch, args.num_classes)))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _data(args) -> None:
    from bnonly_dist.data import fake, layout
    if args.data_command == "fake-cifar10":
        out = fake.write_cifar10(args.dir, args.train_size, args.test_size, args.seed)
    elif args.data_command == "fake-imagenet":
        if not 8 <= args.min_side < args.max_side:
            raise ConfigError(f"--min-side {args.min_side} --max-side {args.max_side}: need 8 <= min < max")
        out = fake.write_imagenet(args.dir, args.classes, args.train_per_class, args.val_per_class, args.seed,
                                  (args.min_side, args.max_side), photo_like=args.photo_like)
    else:
        print(json.dumps(layout.check(args.dir, decode=args.decode)))
        return
    print(f"wrote {out}")
    if args.data_command == "fake-imagenet":
        print(f"{args.classes * args.train_per_class} training images: an ImageNet config's batch needs lowering for "
              "a trial (README: Trying an ImageNet config)")


TRAIN_EPILOG = f"""modes (mode=...): {", ".join(MODES)}
architectures (model.arch=...): {ARCH_FORMS}
every config key with its meaning: bnonly config --keys; a config resolved: bnonly config CONFIG [key=value ...]
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnonly", description="BatchNorm-only training of random-feature ResNets")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run (resumes if its run directory has a checkpoint)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    t.add_argument("config", help="YAML config, e.g. configs/cifar10_resnet56.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.2 mode=bn")
    t.add_argument("--run-dir", type=Path, help="run directory (default: runs/<derived from the config>)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint: top-1, top-5, per-class accuracy "
                       "(written to RUN/eval.jsonl)")
    e.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and checkpoints/)")
    e.add_argument("overrides", nargs="*", help="data.*, train.device and train.precision overrides, "
                   "e.g. data.root=/other/copy/of/cifar10")
    e.set_defaults(func=_eval)

    g = sub.add_parser("config", help="print a config resolved, each key with its value, source and meaning")
    g.add_argument("config", nargs="?", help="YAML config (omit with --keys)")
    g.add_argument("overrides", nargs="*", help="key=value overrides")
    g.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    g.set_defaults(func=_config)

    a = sub.add_parser("analyze", help="tables and figures from finished runs (run dirs, folders of runs, sweeps)")
    a.add_argument("paths", nargs="+", help="run directories, folders of runs (runs/) or sweep files")
    a.add_argument("--out", type=Path, default=Path("analysis"), help="output folder (default: analysis/)")
    a.add_argument("--threshold", type=float, default=0.01, help="|gamma| below this counts as switched off")
    a.add_argument("--no-ablation", action="store_true", help="skip re-evaluating with small-gamma channels zeroed")
    a.add_argument("--device", default="cpu", help="device for the ablation's evaluations (cpu, cuda)")
    a.add_argument("--claims", action="store_true", help="also claims.md/.json: the paper's four claims as verdicts "
                   "from these runs, and a sweep file of the runs that would decide the undecided ones")
    a.set_defaults(func=_analyze)

    r = sub.add_parser("run-dir", help="print the run directory a config trains in (for scripts)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=_run_dir)

    w = sub.add_parser("sweep-points", help="one line per grid point of a sweep file: config, overrides, run dir")
    w.add_argument("sweep")
    w.add_argument("overrides", nargs="*")
    w.set_defaults(func=_sweep_points)

    rt = sub.add_parser("retry", help="a script's restart decisions (exit 0: go on, 1: stop), recorded in "
                        "RUN/history.jsonl (see docs/failures.md)")
    rt.add_argument("run_dir", type=Path)
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
    rt.set_defaults(func=lambda args: restart.command(args.run_dir, args.exit_code, args.requeued, args.stopped,
                                                      args.series, args.since, args.max_failures))

    b = sub.add_parser("bench", help="time training steps on synthetic data, variants in turns: mode=all, "
                       "mode=bn plain and lean")
    b.add_argument("config")
    b.add_argument("overrides", nargs="*")
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
    b.set_defaults(func=_bench)

    bc = sub.add_parser("bench-checkpoint", help="checkpoint size and save/load time, frozen weights out vs in")
    bc.add_argument("config")
    bc.add_argument("overrides", nargs="*")
    bc.add_argument("--dir", type=Path, default=Path("runs/bench-checkpoint"), help="where to write its "
                    "checkpoints, removed after each timing (put it on the file system your runs use)")
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--json", help="also write the report as JSON here")
    bc.set_defaults(func=_bench_checkpoint)

    m = sub.add_parser("model-info", help="parameter counts of an architecture as JSON")
    m.add_argument("arch", help="e.g. cifar_resnet_110, cifar_resnet_14_64, imagenet_resnet_200")
    m.add_argument("--num-classes", type=int)
    m.set_defaults(func=_model_info)

    d = sub.add_parser("data", help="write small data sets in the real formats, or check one")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("fake-cifar10", help="write DIR/cifar-10-batches-py")
    c.add_argument("dir")
    c.add_argument("--train-size", type=int, default=2560)
    c.add_argument("--test-size", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    i = dsub.add_parser("fake-imagenet", help="write DIR/{train,val}/<class>/*.JPEG")
    i.add_argument("dir")
    i.add_argument("--classes", type=int, default=10)
    i.add_argument("--train-per-class", type=int, default=32)
    i.add_argument("--val-per-class", type=int, default=10)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--min-side", type=int, default=64, help="image sides are drawn from [min, max)")
    i.add_argument("--max-side", type=int, default=160, help="real ImageNet: about 333 to 500 (for decode speed)")
    i.add_argument("--photo-like", action="store_true", help="little pixel noise: files of a photograph's size "
                   "and decode cost (for decode benchmarks)")
    k = dsub.add_parser("check", help="validate a CIFAR-10 or ImageNet layout")
    k.add_argument("dir")
    k.add_argument("--decode", action="store_true", help="decode every image to find corrupt ones")
    for q in (d, c, i, k):
        q.set_defaults(func=_data)
    return p


def _run_errors() -> tuple[type[Exception], ...]:
    """Errors of a run, named in one line (imported only once one is raised: they pull in torch)."""
    from bnonly_dist.data.layout import DataError
    from bnonly_dist.perf.bench_runner import VariantFailed
    from bnonly_dist.run.checkpoint import CheckpointError
    from bnonly_dist.run.train import Diverged
    return DataError, CheckpointError, Diverged, VariantFailed


def _interrupted(args) -> int:
    """Ctrl-C, at any moment after this module loaded: one line, exit 130, and for a training run a failure
    note (never retried). Torch-free: the interrupt may have come while torch was half imported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now would only cut this line short
    hint, run_dir = "", None
    if args is not None and args.func is _train:
        from bnonly_dist.run.checkpoint_files import committed
        hint = "run the same command to resume from the last checkpoint"
        with contextlib.suppress(ConfigError, OSError, ValueError):
            run_dir = args.run_dir or run_dir_of(load(args.config, args.overrides))
            hint = resume_hint(run_dir, committed(Path(run_dir) / "checkpoints"))
    print(f"bnonly: interrupted{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    if run_dir is not None:
        history.note_failure(run_dir, int(os.environ.get("RANK", "0")), history.EXIT_INTERRUPTED, Kind.INTERRUPTED,
                             "interrupted (Ctrl-C)")
    return history.EXIT_INTERRUPTED


def resume_hint(run_dir: Path, checkpoints: list[Path]) -> str:
    """The advice after an abort: resume from the newest checkpoint, or start again if none was saved."""
    if not checkpoints:
        return f"no checkpoint was saved yet in {run_dir}; run the same command to start again"
    return "run the same command to resume from the last checkpoint"


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _failed(args, kind: Kind, line: str, err: BaseException | None = None) -> int:
    """A training process's failure: its exit code (history's one table), and a note in its run directory for
    the restart decision, with the step the loop had reached (train.run leaves it on the error)."""
    code = history.exit_code(kind)
    if args.func is _train:
        with contextlib.suppress(ConfigError, OSError, ValueError):
            run_dir = args.run_dir or run_dir_of(load(args.config, args.overrides))
            history.note_failure(run_dir, int(os.environ.get("RANK", "0")), code, kind, line,
                                 getattr(err, "training_step", None))
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error from user input or the environment becomes one line on stderr."""
    global _ARGS
    try:
        _ARGS = parse_args(parser(), argv)
        if _ARGS.func is _train:
            early_signals.end_on_ctrl_c(lambda: _interrupted(_ARGS))  # its start-up imports torch
        return _run(_ARGS)
    except KeyboardInterrupt:  # any other command, or a second Ctrl-C in the loop
        return _interrupted(_ARGS)


def _run(args) -> int:
    import errno

    import yaml

    from bnonly_dist.run.rundir import RunDirError
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except RunDirError as err:
        print(f"bnonly: error: {err}", file=sys.stderr)
        return history.EXIT_CONFIG
    except ConfigError as err:  # not noted for the restart decision: the run dir may be another run's
        print(f"bnonly: config error: {err}", file=sys.stderr)
        return history.EXIT_CONFIG
    except KeyboardInterrupt:  # main() says it, torch-free (the next clause imports modules that import torch)
        raise
    except _run_errors() as err:  # an except clause's expression runs only when an exception arrives
        print(f"bnonly: error: {err}", file=sys.stderr)
        return _failed(args, history.kind_of(err), f"{type(err).__name__}: {history.one_line(err)}", err)
    except BrokenPipeError:  # the reader went away (`| head`): not an error of this command
        _quiet_stdout()
        return 0
    except UnicodeDecodeError as err:
        print(f"bnonly: error: a file read here is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
              "UTF-8", file=sys.stderr)
        return history.EXIT_CONFIG
    except yaml.YAMLError as err:
        print(f"bnonly: config error: not valid YAML ({str(err).splitlines()[0]}); fix the syntax", file=sys.stderr)
        return history.EXIT_CONFIG
    except RuntimeError as err:
        if history.kind_of(err) not in (Kind.LOST_PEER, Kind.TIMEOUT):
            return _unexpected(args, err)
        message = (f"rank {os.environ.get('RANK', '0')} lost contact with the other ranks "
                   f"({str(err).splitlines()[0]}): one died or hung longer than dist.timeout_s, or the "
                   "master could not be reached; see RUN/logs/rank*.log, then start the same command again "
                   "to resume from the last checkpoint")
        logging.getLogger(__name__).error(message)
        logging.shutdown()
        _failed(args, history.kind_of(err), f"lost contact with the other ranks ({str(err).splitlines()[0]})", err)
        print(f"bnonly: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group cannot be torn down cleanly with a peer gone
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        if not where and getattr(args, "run_dir", None):  # a write to an open file names no file: the run's
            where = f" in {args.run_dir}"
        elif not where and args.func is _train:
            with contextlib.suppress(ConfigError, OSError, ValueError):
                cfg = load(args.config, args.overrides)
                where = f" in {run_dir_of(cfg)}"
        if err.errno == errno.ENOSPC:
            print(f"bnonly: error: disk full writing{where or ' output'}; free space and run again "
                  "(a run resumes from its last complete checkpoint)", file=sys.stderr)
        else:
            print(f"bnonly: error: {err.strerror or err}:{where or ' (no file named)'}; check the path and its "
                  "permissions", file=sys.stderr)
        return _failed(args, Kind.IO, f"OSError: {err.strerror or err}{where}", err)
    except Exception as err:  # noqa: BLE001 - the traceback is printed; a training process notes it too
        return _unexpected(args, err)
    return code or 0


def _unexpected(args, err: Exception) -> int:
    """An error no rule above names (a CUDA error, a bug): its traceback, exit 1, and for training a
    failure note, so that the restart decision sees this rank's own error."""
    import traceback
    traceback.print_exception(err)
    return _failed(args, history.kind_of(err), f"{type(err).__name__}: {history.one_line(err)}", err)


if __name__ == "__main__":
    sys.exit(main())

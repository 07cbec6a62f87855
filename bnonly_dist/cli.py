"""`bnonly train|eval|config|analyze|bench|bench-checkpoint|model-info|run-dir|sweep-points|retry|data`:
the command-line front door. Heavy imports (torch, DALI, DeepSpeed) happen inside the
commands, so every --help answers at once. A Ctrl-C at any moment, from the first import on,
ends the command in one line with exit 130 (a training run notes it: never retried)."""
from __future__ import annotations

import _signal  # built in and loaded with the interpreter: the guard below waits for no import
import os


def _ctrl_c_while_importing(signum, frame):
    """What early_signals.end_on_ctrl_c does, before even `signal` (a few ms of enum set-up) is imported."""
    os.write(2, b"bnonly: interrupted\n")
    os._exit(130)


# Only over Python's default: a launcher that imports the CLI keeps its own handler.
_GUARDED = _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
if _GUARDED:
    _signal.signal(_signal.SIGINT, _ctrl_c_while_importing)

import signal  # noqa: E402  (the imports below run under the guard)
import sys  # noqa: E402

from bnonly_dist.run import early_signals  # noqa: E402
_ARGS = None  # the command line once parsed: what a Ctrl-C's one line and note need

import argparse  # noqa: E402  (the imports below run under the guard)
import atexit  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from bnonly_dist import cli_args  # noqa: E402
from bnonly_dist.config import ConfigError, load, load_with_sources, parse_args  # noqa: E402
from bnonly_dist.launch import restart  # noqa: E402
from bnonly_dist.run import history  # noqa: E402
from bnonly_dist.run.history import Kind  # noqa: E402
from bnonly_dist.run.paths import run_dir as run_dir_of  # noqa: E402

if _GUARDED:  # imported: Ctrl-C raises KeyboardInterrupt again (main() decides per command)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _train(args) -> None:
    # The interpreter's last garbage collections at exit walk the ~300k objects torch leaves only to free
    # memory the exit frees anyway: 1.6 s per rank on a 2-core EPYC (0.25 s without; docs/benchmarks.md),
    # which 16 ranks on 2 cores pay one after another before a stopped job can requeue. Skip them.
    atexit.unregister(gc.freeze)  # once, however many runs one process holds
    atexit.register(gc.freeze)
    with early_signals.kept():  # a stop signal during start-up stops the run at its first step, with a checkpoint
        from bnonly_dist import dist
        from bnonly_dist.run import train
        train.run(load(args.config, args.overrides), args.run_dir)
        dist.teardown()


def _eval(args) -> None:
    from bnonly_dist import dist
    from bnonly_dist.run import eval_run
    eval_run.run(args.run_dir, args.overrides, args.other_data)
    dist.teardown()


def _config(args) -> None:
    from bnonly_dist.config import reference as config_reference
    if args.keys or args.config is None:
        print(config_reference.key_list())
        return
    cfg, sources = load_with_sources(args.config, args.overrides)
    grouping = _bn_grouping(cfg, args.world)
    print(config_reference.resolved(cfg, sources))
    if grouping:
        print(grouping)


def _bn_grouping(cfg, world: int | None) -> str:
    """With --world N: the BN grouping of cfg on N ranks, or the ConfigError naming the values that work."""
    if world is None:
        return ""
    if world < 1:
        raise ConfigError(f"--world {world}: the number of ranks must be 1 or more")
    from bnonly_dist.config.plan import bn_groups, per_rank
    per_rank_batch = per_rank(cfg.data.batch_size, world)
    return (f"on {world} rank{'s' if world > 1 else ''}: {per_rank_batch} images per rank; "
            f"{bn_groups(cfg.train.bn_batch, cfg.data.batch_size, world).describe(per_rank_batch)}")


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
    _bn_grouping(cfg, args.world)  # a refusal here, before a script creates anything for the run
    print(run_dir_of(cfg).resolve())


def _sweep_points(args) -> None:
    import shlex

    from bnonly_dist.launch import sweep
    spec = sweep.load(args.sweep, args.overrides)
    for point in spec.points:  # shell words: config, overrides, run directory
        print(shlex.join([str(spec.config), *spec.common, *point.overrides, str(point.run_dir)]))


def _retry(args) -> int:
    return restart.command(args.run_dir, args.exit_code, args.requeued, args.stopped, args.series, args.since,
                           args.max_failures)


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
        out, written = fake.write_cifar10(args.dir, args.train_size, args.test_size, args.seed, force=args.force)
    elif args.data_command == "fake-imagenet":
        if not 8 <= args.min_side < args.max_side:
            raise ConfigError(f"--min-side {args.min_side} --max-side {args.max_side}: need 8 <= min < max")
        out, written = fake.write_imagenet(args.dir, args.classes, args.train_per_class, args.val_per_class, args.seed,
                                           (args.min_side, args.max_side), photo_like=args.photo_like, force=args.force)
    else:
        print(json.dumps(layout.check(args.dir, decode=args.decode)))
        return
    print(f"wrote {out}" if written else f"{out} already holds this data set (the same files); nothing written")
    if args.data_command == "fake-imagenet":
        print(f"{args.classes * args.train_per_class} training images: an ImageNet config's batch needs lowering for "
              "a trial (README: Trying an ImageNet config)")


def parser() -> argparse.ArgumentParser:
    """The parser, each command's handler looked up now (so a test may replace one)."""
    return cli_args.parser({"train": _train, "eval": _eval, "config": _config, "analyze": _analyze,
                            "run-dir": _run_dir, "sweep-points": _sweep_points, "retry": _retry, "bench": _bench,
                            "bench-checkpoint": _bench_checkpoint, "model-info": _model_info, "data": _data})


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
        from bnonly_dist.run.checkpoint_files import resume_hint
        hint = "run the same command to resume from the last checkpoint"
        with contextlib.suppress(ConfigError, OSError, ValueError):
            run_dir = args.run_dir or run_dir_of(load(args.config, args.overrides))
            hint = resume_hint(run_dir)
    print(f"bnonly: interrupted{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    if run_dir is not None:
        history.note_failure(run_dir, int(os.environ.get("RANK", "0")), history.EXIT_INTERRUPTED, Kind.INTERRUPTED,
                             "interrupted (Ctrl-C)")
    return history.EXIT_INTERRUPTED


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

"""`python -m bnonly_dist.gpu_check --wheels DIR --out DIR`: the GPU path validated and measured
in one run of at most 8 minutes on one GPU node that cannot download anything.

The wheel folder is first checked against this Python's tags (one line naming a mismatch
and the `make gpu-wheels NODE_PYTHON=X.Y` that builds the right one), before the budget's
clock starts. Installs what is missing (pydantic, submitit, DeepSpeed, DALI, pytest) from
the folder (`make gpu-wheels` builds it; offline, into a scratch folder, put first on the
PYTHONPATH of every part), then runs the parts of gpu_parts.py in the order of their value:
the `cuda` tests, `bnonly bench` for ImageNet ResNet-50 and ResNet-200 (bf16, channels_last;
mode=all against the BN-only variants), the DALI pipeline alone on generated ImageNet-size
JPEGs, and the largest batch. Each part runs in a process group of its own under its own
time limit; one that outlives it is killed with every process it started and reported
"timed out" with what it printed so far, and the next part runs.

Everything a person needs lands as at most MAX_OUT_FILES files directly in OUT, so that one
copy brings it back from a node: report.md, report.json, cuda-tests.xml, logs.tar.gz (each
part's log) and the bench JSONs. The installed wheels, the generated JPEGs and the logs
before they are archived live in a scratch folder (under TMPDIR), removed at the end. The
exit code is 0 when the essential parts (cuda tests, ResNet-50 bench, DALI mixed decode)
passed, else 1 (2: bad arguments, refused before anything is written). Imports only the
standard library and torch, so it starts before anything is installed.

`--rehearse` runs every part on the CPU at tiny sizes (gpu_parts.py), installing every wheel
of the folder: the CI's proof that the check itself works. Its limits are the GPU's times
REHEARSAL_SCALE: two shared CPU cores start Python and torch far slower
than a GPU node's 16.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bnonly_dist.perf import gpu_report, wheels
from bnonly_dist.perf.gpu_parts import BUDGET_S, INSTALL_LIMIT_S, MARGIN_S, NEEDED, REHEARSAL_SCALE, Part, parts

REPO = Path(__file__).resolve().parents[2]
KILL_GRACE_S = 5  # SIGTERM to a part's process group, then SIGKILL after this
MAX_OUT_FILES = 8  # what comes back from a node: report.md, report.json, cuda-tests.xml, logs.tar.gz, bench JSONs
LOGS = "logs.tar.gz"


def kill_group(pgid: int, reap=lambda: None) -> None:
    """SIGTERM, then SIGKILL, to every process of a part's group (workers it forked included:
    a bench's Pool worker would otherwise keep its CUDA context and wait forever). reap()
    collects the group's leader, our child, which would otherwise stay in the group as a zombie."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:
            reap()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class Check:
    """Runs the parts one after the other within the budget and records each one."""

    def __init__(self, out: Path, scratch: Path, budget_s: float, limit_scale: float = 1.0):
        self.out, self.limit_scale = out, limit_scale
        self.deadline = time.monotonic() + limit_scale * (budget_s - MARGIN_S)
        self.site, self.logs = scratch / "site", scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), str(REPO),
                                                                  os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.parts: list[dict] = []

    def record(self, name: str, status: str, detail: str = "", seconds: float = 0.0, **extra) -> dict:
        part = {"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail, **extra}
        self.parts.append(part)
        print(f"gpu-check: {name}: {status}{' (' + detail + ')' if detail else ''} [{seconds:.0f} s]", flush=True)
        return part

    def run(self, name: str, cmd: list[str], limit_s: float, skip: str | None = None, env: dict | None = None) -> dict:
        """cmd from the repository root, in a process group of its own, for at most limit_s (less
        if the budget ends first); on time out the whole group is killed and what it printed kept."""
        left = self.deadline - time.monotonic()
        limit = min(self.limit_scale * limit_s, left)
        if skip or left < 5:
            return self.record(name, "skipped", skip or "the 8-minute budget is spent")
        start = time.monotonic()
        log = self.logs / f"{name}.log"
        with open(log, "w") as sink:
            header = f"$ {' '.join(cmd)}\n"
            sink.write(header)
            sink.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=sink,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
            kill_group(proc.pid, proc.poll)  # also after a clean exit: nothing the part started may outlive it
            proc.wait()
        output = log.read_text()[len(header):]
        lines = output.strip().splitlines() or [""]
        seconds = time.monotonic() - start
        if code is None:
            return self.record(name, "timed out",
                               f"killed after {limit:.0f} s with its process group; see {LOGS}: logs/{log.name}",
                               seconds, command=cmd, stdout=output[-6000:], last_lines=lines[-5:])
        status = "passed" if code == 0 else "failed"
        detail = lines[-1] if code == 0 else f"exit {code}: {lines[-1][:200]}; see {LOGS}: logs/{log.name}"
        return self.record(name, status, detail, seconds, command=cmd, stdout=output[-6000:])

    def install(self, folder: Path | None, everything: bool) -> None:
        """Wheels into a fresh scratch folder (site/), offline and without dependency resolution (the folder
        holds the dependencies that are missing; --target alone would ignore the installed
        torch and look for it in the folder): every wheel (a rehearsal) or those whose project
        is not installed at the wheel's version or a newer one (pydantic needs a newer
        typing-extensions than an older torch brings); then each of their modules is imported from there."""
        if folder is None:
            self.record("install", "skipped", "no --wheels folder given")
            return
        shutil.rmtree(self.site, ignore_errors=True)
        files = sorted(p for p in Path(folder).glob("*.whl")
                       if everything or not wheels.installed(wheels.project(p), p.name.split("-")[1]))
        if not files:
            self.record("install", "passed", f"nothing missing among the wheels of {folder}")
            return
        # --no-compile: no .pyc for DALI's and DeepSpeed's thousands of files (seconds of the budget)
        part = self.run("install", [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                                    "--find-links", str(folder), "--target", str(self.site), *map(str, files)],
                        INSTALL_LIMIT_S)
        part["wheels"] = [p.name for p in files]
        if part["status"] == "passed":
            modules = sorted({m for p in files for m in wheels.modules(p)})
            failed = wheels.import_failures(modules, self.env, self.site)
            if failed:
                part.update(status="failed", detail="not importable from the target: " + "; ".join(failed))
            else:
                part["detail"] = f"{len(files)} wheels; imported {len(modules)} modules from {self.site.name}/"

    def importable(self) -> dict[str, bool]:
        """Each needed module imported (not just found: pydantic refuses a mismatched core at import)."""
        failed = wheels.import_failures(list(NEEDED), self.env)
        return {m: not any(f.startswith(m + ":") for f in failed) for m in NEEDED}

    def archive_logs(self) -> None:
        """Every part's log into OUT/logs.tar.gz (logs/<part>.log)."""
        with tarfile.open(self.out / LOGS, "w:gz") as tar:
            tar.add(self.logs, arcname="logs")


def environment() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "gpus": torch.cuda.device_count() if cuda else 0, "cpus": os.cpu_count(),
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def why_skipped(part: Part, have: dict[str, bool]) -> str | None:
    reasons = {"gpu": "no CUDA device visible (--rehearse runs the check on the CPU)",
               "config": "pydantic is missing or broken (put its wheels in the --wheels folder)",
               "pytest": "pytest is missing (put its wheels in the --wheels folder)",
               "dali": "DALI is missing or broken (put its wheels in the --wheels folder)",
               "data": "no generated JPEGs (dali-data did not pass)"}
    return next((reasons[need] for need in part.needs if not have[need]), None)


def out_problem(out: Path) -> str | None:
    """Why --out cannot take the check's files (None: it can): a file, under a file, not writable."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; pass a folder (new, or one of an earlier check's)"
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return f"--out {out} lies under the file {existing}; pass a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable; pass a folder you can write to"
    return None


def wheels_problem(folder: Path | None) -> str | None:
    """Why the wheel folder cannot serve this Python (None: it can), before the clock starts."""
    if folder is None:
        return None
    if not folder.is_dir():
        return f"--wheels {folder} is not a folder; pass the folder `make gpu-wheels` builds"
    wrong = wheels.not_for_this_python(folder)
    if not wrong:
        return None
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = [version for version in wheels.pythons_of(wrong) if version != here]
    return (f"--wheels {folder}: {len(wrong)} wheels do not install on this Python {here} "
            f"({wrong[0]}{' ...' if len(wrong) > 1 else ''}; built for "
            f"{'Python ' + ' and '.join(built) if built else 'another platform'}); build the folder for this node: "
            f"make gpu-wheels WHEELS=DIR NODE_PYTHON={here}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnonly_dist.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, help="folder of wheels to install what is missing from (offline; make gpu-wheels)")
    p.add_argument("--out", type=Path, required=True, help=f"folder for report.md, report.json, {LOGS}, the cuda "
                   f"tests' XML and the bench JSONs (at most {MAX_OUT_FILES} files, no subfolders)")
    p.add_argument("--dry-run", action="store_true", help="install and report, but run nothing on the GPU")
    p.add_argument("--rehearse", action="store_true", help="run every part on the CPU at tiny sizes (CI)")
    p.add_argument("--cuda-tests", metavar="EXPR", help="only the cuda tests pytest -k EXPR selects (default: all)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    args = p.parse_args(argv)
    out = args.out.resolve()  # the parts run from the repository root
    folder = args.wheels.resolve() if args.wheels is not None else None
    problem = ("--rehearse and --dry-run exclude each other; pass one" if args.rehearse and args.dry_run
               else wheels_problem(folder) or out_problem(out))
    if problem:  # before anything is written, and before the budget's clock starts
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"gpu-check: --out {out}: {err.strerror}; pass a folder you can write to", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bnonly-gpu-check-"))
    try:
        return run_check(args, out, folder, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # made by mkdtemp above: the installed wheels, JPEGs, raw logs


def run_check(args, out: Path, folder: Path | None, scratch: Path) -> int:
    check = Check(out, scratch, args.budget_s, REHEARSAL_SCALE if args.rehearse else 1.0)
    env = environment()
    print(f"gpu-check: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}"
          f"{', rehearsal on the CPU' if args.rehearse else ''}", flush=True)
    check.install(folder, everything=args.rehearse)
    modules = check.importable()
    have = {"gpu": args.rehearse or env["cuda_available"], "config": modules["pydantic"],
            "pytest": modules["pytest"], "dali": modules["nvidia.dali"], "data": False}
    results, dali = {}, {}
    for part in parts(out, scratch, args.rehearse, env["gpus"], args.cuda_tests):
        skip = "--dry-run" if args.dry_run else why_skipped(part, have)
        done = check.run(part.name, part.cmd, part.limit_s, skip=skip, env=part.env)
        done["essential"] = part.essential
        if part.note:
            done["detail"] += f"; {part.note}"
            print(f"gpu-check: {part.name}: {part.note}", flush=True)
        if part.name == "dali-data":
            have["data"] = done["status"] == "passed"
        if part.json is not None:
            results[part.name] = gpu_report.bench_result(done, part.json)
        if part.name.startswith("dali-") and part.name != "dali-data":
            dali[part.name[5:]] = gpu_report.result_line(done)
    report = {"environment": env, "rehearsal": args.rehearse, "budget_s": args.budget_s, "margin_s": MARGIN_S,
              "modules": modules, "missing": [m for m, ok in modules.items() if not ok], "parts": check.parts,
              "bench": results, "dali": dali}
    report["essential_passed"] = all(p["status"] == "passed" for p in check.parts if p.get("essential"))
    check.archive_logs()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(gpu_report.markdown(report))
    print(f"gpu-check: {out}: report.md, report.json, {LOGS} and the measurements; essential parts "
          f"{'passed' if report['essential_passed'] else 'did NOT all pass'}")
    return 0 if report["essential_passed"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())

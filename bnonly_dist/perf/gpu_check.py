"""`python -m bnonly_dist.gpu_check --wheels DIR --out DIR`: the GPU path validated and measured
in one run of at most 8 minutes on one GPU node that cannot download anything.

Installs what is missing (pydantic, submitit, DeepSpeed, DALI, pytest) from a folder of wheels
(`make gpu-wheels` builds it; offline, into OUT/site, put first on the PYTHONPATH of every
part), then runs the parts of gpu_parts.py in the order of their value: the `cuda` tests,
`bnonly bench` for ImageNet ResNet-50 and ResNet-200 (bf16, channels_last; mode=all against
the BN-only variants), the DALI pipeline alone on generated ImageNet-size JPEGs, and the
largest batch. Each part runs in a process group of its own under its own time limit; one
that outlives it is killed with every process it started and reported "timed out" with what
it printed so far, and the next part runs. Writes OUT/report.md and OUT/report.json. The
exit code is 0 when the essential parts (cuda tests, ResNet-50 bench, DALI mixed decode)
passed, else 1 (2: bad arguments). Imports only the standard library and torch, so it starts
before anything is installed.

`--rehearse` runs every part on the CPU at tiny sizes (gpu_parts.py), installing every wheel
of the folder into a fresh OUT/site: the CI's proof that the check itself works. Its limits
are the GPU's times REHEARSAL_SCALE: two shared CPU cores start Python and torch far slower
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
import time
from pathlib import Path

from bnonly_dist.perf import gpu_report, wheels
from bnonly_dist.perf.gpu_parts import BUDGET_S, INSTALL_LIMIT_S, MARGIN_S, NEEDED, REHEARSAL_SCALE, Part, parts

REPO = Path(__file__).resolve().parents[2]
KILL_GRACE_S = 5  # SIGTERM to a part's process group, then SIGKILL after this


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

    def __init__(self, out: Path, budget_s: float, limit_scale: float = 1.0):
        self.out, self.limit_scale = out, limit_scale
        self.deadline = time.monotonic() + limit_scale * (budget_s - MARGIN_S)
        self.site = out / "site"
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
        log = self.out / f"{name}.log"
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
            return self.record(name, "timed out", f"killed after {limit:.0f} s with its process group; see {log.name}",
                               seconds, command=cmd, stdout=output[-6000:], last_lines=lines[-5:])
        status = "passed" if code == 0 else "failed"
        detail = lines[-1] if code == 0 else f"exit {code}; see {log.name}"
        return self.record(name, status, detail, seconds, command=cmd, stdout=output[-6000:])

    def install(self, folder: Path | None, everything: bool) -> None:
        """Wheels into a fresh OUT/site, offline and without dependency resolution (the folder
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
        part = self.run("install", [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnonly_dist.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, help="folder of wheels to install what is missing from (offline; make gpu-wheels)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the logs")
    p.add_argument("--dry-run", action="store_true", help="install and report, but run nothing on the GPU")
    p.add_argument("--rehearse", action="store_true", help="run every part on the CPU at tiny sizes (CI)")
    p.add_argument("--cuda-tests", metavar="EXPR", help="only the cuda tests pytest -k EXPR selects (default: all)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    args = p.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"gpu-check: --wheels {args.wheels} is not a folder; pass the folder `make gpu-wheels` builds", file=sys.stderr)
        return 2
    if args.rehearse and args.dry_run:
        print("gpu-check: --rehearse and --dry-run exclude each other; pass one", file=sys.stderr)
        return 2
    out = args.out.resolve()  # the parts run from the repository root
    folder = args.wheels.resolve() if args.wheels is not None else None
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s, REHEARSAL_SCALE if args.rehearse else 1.0)
    env = environment()
    print(f"gpu-check: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}"
          f"{', rehearsal on the CPU' if args.rehearse else ''}", flush=True)
    check.install(folder, everything=args.rehearse)
    modules = check.importable()
    have = {"gpu": args.rehearse or env["cuda_available"], "config": modules["pydantic"],
            "pytest": modules["pytest"], "dali": modules["nvidia.dali"], "data": False}
    results, dali = {}, {}
    for part in parts(out, args.rehearse, env["gpus"], args.cuda_tests):
        skip = "--dry-run" if args.dry_run else why_skipped(part, have)
        done = check.run(part.name, part.cmd, part.limit_s, skip=skip, env=part.env)
        done["essential"] = part.essential
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
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(gpu_report.markdown(report))
    print(f"gpu-check: report {out / 'report.md'} and {out / 'report.json'}; essential parts "
          f"{'passed' if report['essential_passed'] else 'did NOT all pass'}")
    return 0 if report["essential_passed"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())

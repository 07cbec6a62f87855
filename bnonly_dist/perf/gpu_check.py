"""`python -m bnonly_dist.gpu_check --wheels DIR --out DIR`: the GPU path validated and measured
in one run of at most 8 minutes on one GPU node that cannot download anything.

Installs what is missing (pydantic, submitit, DeepSpeed, DALI, pytest) from a folder of wheels
(offline, into OUT/site, put first on the PYTHONPATH of every part), then runs the `cuda`
tests, `bnonly bench` for CIFAR ResNet-110 and ImageNet ResNet-50 (batch 256, bf16,
channels_last; all / bn-plain / bn-lean), the DALI pipeline alone on generated
ImageNet-size JPEGs, and the largest-batch search for ResNet-50 with the time left. Each
part has its own time limit and a part that cannot run is skipped with a line saying why.
Writes OUT/report.md and OUT/report.json. Imports only the standard library and torch, so
it starts before anything is installed. docs/gpu.md says how to prepare the wheel folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole run, installation included
NEEDED = ("pydantic", "submitit", "deepspeed", "nvidia.dali", "pytest")  # modules a GPU node may lack
BENCH = ["data.batch_size=256", "train.precision=bf16", "train.channels_last=true", "train.device=cuda"]
DALI_RATE = """
import json, sys, torch
from bnonly_dist import config
from bnonly_dist.perf import bench
cfg = config.load("configs/imagenet_resnet50.yaml", sys.argv[1:])
print("RESULT " + json.dumps(bench.pipeline_rate(cfg, torch.device("cuda", 0), steps=7, warmup=2)))
"""


def wheel_project(path: Path) -> str:
    """The distribution name of a wheel file, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def installed(project: str) -> bool:
    try:
        metadata.distribution(project)
        return True
    except metadata.PackageNotFoundError:
        return False


class Check:
    """Runs the parts one after the other within the budget and records each one."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.site = out / "site"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), str(REPO),
                                                                  os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.parts: list[dict] = []

    def record(self, name: str, status: str, detail: str = "", seconds: float = 0.0, **extra) -> dict:
        part = {"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail, **extra}
        self.parts.append(part)
        print(f"gpu-check: {name}: {status}{' (' + detail + ')' if detail else ''} [{seconds:.0f} s]", flush=True)
        return part

    def run(self, name: str, cmd: list[str], limit_s: float, skip: str | None = None) -> dict:
        """Run cmd from the repository root for at most limit_s (less if the budget ends first)."""
        limit = min(limit_s, self.deadline - time.monotonic())
        if skip or limit < 15:
            return self.record(name, "skipped", skip or "the 8-minute budget is spent")
        start = time.monotonic()
        log = self.out / f"{name}.log"
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as err:
            log.write_text(f"$ {' '.join(cmd)}\n{err.stdout or ''}{err.stderr or ''}")
            return self.record(name, "timeout", f"stopped after {limit:.0f} s; see {log.name}", time.monotonic() - start,
                               command=cmd)
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        status = "passed" if proc.returncode == 0 else "failed"
        detail = last if proc.returncode == 0 else f"exit {proc.returncode}; see {log.name}"
        return self.record(name, status, detail, time.monotonic() - start, command=cmd, stdout=proc.stdout[-6000:])

    def install(self, wheels: Path | None) -> None:
        """Every wheel of the folder whose project is not installed, into OUT/site, offline and
        without dependency resolution (the folder holds the dependencies that are missing;
        --target alone would ignore the installed torch and look for it in the folder)."""
        if wheels is None:
            self.record("install", "skipped", "no --wheels folder given")
            return
        files = sorted(p for p in Path(wheels).glob("*.whl") if not installed(wheel_project(p)))
        if not files:
            self.record("install", "passed", f"nothing missing among the wheels of {wheels}")
            return
        self.run("install", [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                             "--find-links", str(wheels), "--target", str(self.site), *map(str, files)], 240)
        self.parts[-1]["wheels"] = [p.name for p in files]

    def importable(self) -> dict[str, bool]:
        code = "import importlib.util, json, sys; print(json.dumps({m: importlib.util.find_spec(m) is not None " \
               "for m in sys.argv[1:]}))"
        proc = subprocess.run([sys.executable, "-c", code, *NEEDED], env=self.env, capture_output=True, text=True)
        return json.loads(proc.stdout) if proc.returncode == 0 else {m: False for m in NEEDED}


def environment() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def bench_json(part: dict, path: Path) -> dict | None:
    return json.loads(path.read_text()) if part["status"] == "passed" and path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnonly_dist.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, help="folder of wheels to install what is missing from (offline)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the logs")
    p.add_argument("--dry-run", action="store_true", help="install and report, but run nothing on the GPU")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole run (default 480)")
    args = p.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"gpu-check: --wheels {args.wheels} is not a folder; pass the folder docs/gpu.md prepares", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s, args.dry_run)
    env = environment()
    print(f"gpu-check: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}", flush=True)
    check.install(args.wheels)
    modules = check.importable()
    missing = [m for m, ok in modules.items() if not ok]
    no_gpu = "--dry-run" if args.dry_run else (None if env["cuda_available"] else "no CUDA device visible")
    no_config = "pydantic is missing (put its wheels in the --wheels folder)" if not modules["pydantic"] else None
    no_dali = "DALI is not installed" if not modules["nvidia.dali"] else None
    no_pytest = "pytest is missing (put its wheels in the --wheels folder)" if not modules["pytest"] else None
    py = sys.executable

    check.run("cuda-tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                             f"--junitxml={args.out / 'cuda-tests.xml'}"], 150,
              skip="--dry-run" if args.dry_run else no_config or no_pytest)
    results = {}
    for name, conf, limit, variants, timeout in (
            ("bench-cifar-resnet110", "configs/cifar10_resnet110.yaml", 4096, "all,bn-plain,bn-lean", 90),
            ("bench-imagenet-resnet50", "configs/imagenet_resnet50.yaml", 0, "all,naive,bn-plain,bn-lean", 120)):
        path = args.out / f"{name}.json"
        part = check.run(name, [py, "-m", "bnonly_dist.cli", "bench", conf, *BENCH, "--variants", variants, "--steps",
                                "10", "--warmup", "3", "--max-batch-limit", str(limit), "--json", str(path)], timeout,
                         skip=no_gpu or no_config)
        results[name] = bench_json(part, path)
    data = args.out / "fake-imagenet"
    gen = check.run("dali-data", [py, "-m", "bnonly_dist.cli", "data", "fake-imagenet", str(data), "--classes", "8",
                                  "--train-per-class", "160", "--val-per-class", "1", "--min-side", "333",
                                  "--max-side", "500"], 60, skip=no_gpu or no_config or no_dali)
    dali = {}
    for decode in ("mixed", "cpu"):
        part = check.run(f"dali-{decode}", [py, "-c", DALI_RATE, f"data.root={data}", "data.batch_size=128",
                                            f"data.decode={decode}", f"data.num_threads={os.cpu_count() or 4}",
                                            "train.device=cuda"], 40,
                         skip=no_gpu or no_config or no_dali or (gen["status"] != "passed" and "no generated data"))
        found = [line[7:] for line in part.get("stdout", "").splitlines() if line.startswith("RESULT ")]
        dali[decode] = json.loads(found[0]) if found else None
    path = args.out / "bench-imagenet-resnet50-max-batch.json"
    part = check.run("bench-imagenet-resnet50-max-batch",
                     [py, "-m", "bnonly_dist.cli", "bench", "configs/imagenet_resnet50.yaml", *BENCH, "--steps", "3",
                      "--warmup", "1", "--max-batch-limit", "4096", "--json", str(path)], 600, skip=no_gpu or no_config)
    results["bench-imagenet-resnet50-max-batch"] = bench_json(part, path)

    report = {"environment": env, "budget_s": args.budget_s, "modules": modules, "missing": missing,
              "parts": check.parts, "bench": results, "dali": dali}
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "report.md").write_text(markdown(report))
    print(f"gpu-check: report {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 1 if any(p["status"] in ("failed", "timeout") for p in check.parts) else 0


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {env['date']}", "",
             f"{env['device']} on {env['host']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}.",
             "Modules: " + ", ".join(f"{m} {'yes' if ok else 'MISSING'}" for m, ok in report["modules"].items()), "",
             "| part | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p['detail'].replace('|', '/')} |" for p in report["parts"]]
    for part in report["parts"]:
        if part["name"].startswith("bench") and part["status"] == "passed":
            lines += ["", f"## {part['name']}", "", "`" + " ".join(part["command"][1:]) + "`", "", "```",
                      part["stdout"].strip(), "```"]
    for decode, rate in report["dali"].items():
        if rate and "images_per_s" in rate:
            lines.append(f"\nDALI {decode} decode alone: {rate['images_per_s']:.0f} img/s "
                         f"({rate['threads']} threads, batch 128, 333-500 px JPEGs)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

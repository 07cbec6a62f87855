"""The GPU check (bnonly_dist/perf/gpu_check.py) and its wheel folder, on the CPU: the parts'
process groups and limits, the report, the wheel-folder builder's checks, and the CPU
rehearsal of the whole check (`--rehearse`), which must pass here before the check meets a GPU."""
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bnonly_dist.perf import bench_runner, gpu_check, gpu_parts, gpu_report, wheels

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def write_wheel(folder: Path, project: str, module: str, version: str = "0.1", requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel of one module."""
    info = f"{project}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{module}.py": "VALUE = 7\n", f"{info}/METADATA": meta,
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = folder / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_part_that_outlives_its_limit_is_killed_with_its_group_and_keeps_what_it_measured(tmp_path):
    # a bench that found one largest batch, then hangs with a worker (the Pool(1) of the search)
    hang = textwrap.dedent("""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"worker {worker.pid}", flush=True)
        print("all: largest batch that fits 512", flush=True)
        time.sleep(600)
    """)
    check = gpu_check.Check(tmp_path / "out", tmp_path / "scratch", budget_s=600)
    part = check.run("bench-imagenet-resnet50-max-batch", [sys.executable, "-c", hang], limit_s=3)
    worker = int(part["stdout"].split()[1])
    assert part["status"] == "timed out" and "killed after 3 s" in part["detail"]
    assert not alive(worker)  # the worker went with the group, not just the part's own process
    assert gpu_report.bench_result(part, tmp_path / "none.json") == {"partial": True, "max_batch": {"all": 512}}
    after = check.run("next", [sys.executable, "-c", "print('ran')"], limit_s=30)
    assert after["status"] == "passed" and after["detail"] == "ran"  # the next part still runs


def test_the_parts_fit_the_budget_with_the_margin_and_the_essential_come_first(tmp_path):
    parts = gpu_parts.parts(tmp_path, tmp_path, rehearse=False, gpus=1)
    assert gpu_parts.INSTALL_LIMIT_S + sum(p.limit_s for p in parts) + gpu_parts.MARGIN_S <= gpu_parts.BUDGET_S
    names = [p.name for p in parts]
    assert set(gpu_parts.ESSENTIAL) <= set(names[:4])  # by value: the essential ones run first
    assert [p.name for p in gpu_parts.parts(tmp_path, tmp_path, rehearse=True, gpus=0)] == names  # the same parts rehearsed


def test_wheel_folder_check_finds_a_core_that_does_not_match(tmp_path):
    write_wheel(tmp_path, "probe_pydantic", "probe_pydantic", "2.14.4", ("probe-pydantic-core==2.50.5", "torch>=2"))
    write_wheel(tmp_path, "probe_pydantic_core", "probe_pydantic_core", "2.41.0")
    write_wheel(tmp_path, "probe_extra", "probe_extra", "1.0", ('probe-missing; extra == "docs"',))
    problems = wheels.unmet(tmp_path, "3.11")
    assert problems == ["probe_pydantic-2.14.4-py3-none-any.whl needs probe-pydantic-core==2.50.5, the folder has "
                        "probe-pydantic-core 2.41.0"]  # torch is the node's; an extra nobody asks for is not needed


def test_wheel_folder_installs_offline_imports_and_splits_into_parts_that_join(tmp_path, capsys):
    folder = tmp_path / "wheels"
    folder.mkdir()
    write_wheel(folder, "probe_core", "probe_core", "1.0")
    write_wheel(folder, "probe_app", "probe_app", "2.0", ("probe-core==1.0",))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert wheels.main([str(folder), "--check-only"]) == 0
    assert f"2 wheels, 0 MiB, for Python {version} (a node with another Python needs NODE_PYTHON=X.Y)" in capsys.readouterr().out
    assert wheels.pythons_of(["a-1-cp312-cp312-manylinux_2_28_x86_64.whl", "b-1-cp39-abi3-linux_x86_64.whl"]) == ["3.12"]
    (folder / "junk-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    assert any("offline install failed" in p for p in wheels.check(folder, version))
    (folder / "junk-0.1-py3-none-any.whl").unlink()
    parts, join = wheels.split(folder, 1)
    assert parts and all(p.stat().st_size <= 2**20 for p in parts)
    node = tmp_path / "node"
    node.mkdir()
    for part in parts:
        part.rename(node / part.name)
    subprocess.run(["bash", "-c", join], cwd=node, check=True, capture_output=True)
    assert sorted(p.name for p in (node / "wheels").iterdir()) == sorted(p.name for p in folder.iterdir())


def test_wheel_builder_refuses_a_bad_python_version_and_a_folder_in_use(tmp_path):
    (tmp_path / "x").write_text("")
    for args, words in ((["--python-version", "311"], "give major.minor"), ([], "is not empty")):
        proc = subprocess.run([sys.executable, "-m", "bnonly_dist.perf.wheels", str(tmp_path), *args], env=ENV,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == ["x"]


def out_files(out: Path) -> set[str]:
    """What comes back from a node: plain files directly under out, at most 8 (asserted)."""
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries) and len(entries) <= gpu_check.MAX_OUT_FILES, entries
    return {p.name for p in entries}


def test_gpu_check_installs_offline_skips_the_gpu_parts_and_reports(tmp_path):
    wheels_dir, out = tmp_path / "wheels", tmp_path / "out"
    wheels_dir.mkdir()
    write_wheel(wheels_dir, "bnonly_probe", "bnonly_probe")
    write_wheel(wheels_dir, "pytest", "not_pytest")  # installed already, in a newer version: left alone
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.gpu_check", "--wheels", str(wheels_dir), "--out", str(out),
                           "--dry-run"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["install"]["status"] == "passed" and parts["install"]["wheels"] == ["bnonly_probe-0.1-py3-none-any.whl"]
    assert "imported 1 modules from site/" in parts["install"]["detail"]  # from the scratch target, not from out
    assert out_files(out) == {"report.md", "report.json", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert logs.getnames() == ["logs", "logs/install.log"] and b"--no-compile" in logs.extractfile("logs/install.log").read()
    gpu_parts_run = [n for n in parts if n != "install"]
    assert len(gpu_parts_run) == 7 and all(parts[n]["status"] == "skipped" and parts[n]["detail"] for n in gpu_parts_run)
    assert report["modules"]["pydantic"] and set(report["modules"]) == set(gpu_parts.NEEDED)
    markdown = (out / "report.md").read_text()
    assert "| cuda-tests * | skipped |" in markdown and "| install | passed |" in markdown
    assert "gpu-check: bench-imagenet-resnet50: skipped (--dry-run)" in proc.stdout


def refusal(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.gpu_check", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_gpu_check_names_a_missing_wheel_folder(tmp_path):
    proc = refusal(["--wheels", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], tmp_path)
    assert "is not a folder" in proc.stderr and not (tmp_path / "out").exists()


def test_a_wheel_folder_for_another_python_is_refused_before_anything_runs(tmp_path):
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    write_wheel(wheels_dir, "bnonly_probe", "bnonly_probe")  # pure Python: fits any
    other = f"3.{sys.version_info.minor - 1}"
    (wheels_dir / f"probe_core-1.0-cp3{other[2:]}-cp3{other[2:]}-manylinux_2_17_x86_64.whl").write_bytes(b"")
    proc = refusal(["--rehearse", "--wheels", "wheels", "--out", "out"], tmp_path)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"1 wheels do not install on this Python {here}" in proc.stderr and f"built for Python {other})" in proc.stderr
    assert f"make gpu-wheels WHEELS=DIR NODE_PYTHON={here}" in proc.stderr and not (tmp_path / "out").exists()


def test_an_out_that_cannot_take_the_files_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    assert "is a file" in refusal(["--rehearse", "--out", "file"], tmp_path).stderr
    assert "lies under the file" in refusal(["--rehearse", "--out", "file/out"], tmp_path).stderr
    assert (tmp_path / "file").read_text() == "mine"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder (root may write anywhere)
    assert gpu_check.main(["--rehearse", "--out", str(tmp_path / "new")]) == 2
    assert "is not writable" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_the_cuda_tests_are_a_list_and_one_not_in_the_checkout_is_left_out_with_a_line(tmp_path):
    assert "tests/test_gpu.py" in gpu_parts.CUDA_TESTS  # the ZeRO-1 bf16 frozen-weights test is one of its tests
    assert gpu_parts.present("tests/test_gpu.py::test_deepspeed_single_gpu_computes_in_bf16", REPO)
    synchronised = "tests/test_bn_groups.py::test_on_the_gpu_a_synchronised_group_of_one_rank_equals_native_batchnorm"
    assert synchronised in gpu_parts.CUDA_TESTS and all(gpu_parts.present(t, REPO) for t in gpu_parts.CUDA_TESTS)
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_gpu.py").write_text("def test_x():\n    pass\n")
    (repo / "tests" / "test_bn_groups.py").write_text(
        "def test_on_the_gpu_ghost_groups_equal_native_batchnorm_per_group(): pass\n")
    tests = gpu_parts.parts(tmp_path, tmp_path, rehearse=False, gpus=1, repo=repo)[0]
    assert tests.name == "cuda-tests" and tests.env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] == "1" and "--durations=0" in tests.cmd
    assert [a for a in tests.cmd if a.startswith("tests/")] == list(gpu_parts.CUDA_TESTS[:2])
    assert tests.note == f"not in this checkout, left out (gpu_parts.CUDA_TESTS): {synchronised}"


@pytest.mark.parametrize("rehearse", [False, True])
def test_the_fake_imagenet_holds_an_epoch_of_the_dali_rate_in_few_files(rehearse, tmp_path):
    dali_data = next(p for p in gpu_parts.parts(tmp_path, tmp_path / "scratch", rehearse, 1) if p.name == "dali-data")
    root, classes, distinct, per_class, low, high = dali_data.cmd[3:]
    batch = int(next(a for a in gpu_parts.parts(tmp_path, tmp_path, rehearse, 1)[3].cmd if a.startswith("data.batch_size="))
                .split("=")[1])
    assert int(classes) * int(per_class) // batch >= gpu_parts.DALI_WARMUP + gpu_parts.DALI_TIMED + 1
    assert int(classes) * int(distinct) <= 400 and Path(root).parent == tmp_path / "scratch"
    # written small here: 3 distinct JPEGs per class, 10 files per class
    subprocess.run([sys.executable, "-c", gpu_parts.FAKE_IMAGENET, str(tmp_path / "data"), "2", "3", "10", "16", "24"],
                   env=ENV, check=True, capture_output=True, timeout=120)
    files = sorted((tmp_path / "data" / "train").glob("*/*.JPEG"))
    assert len(files) == 20 and len({p.stat().st_ino for p in files}) == 6


def test_the_dali_rate_refuses_an_epoch_shorter_than_its_batches(source_of):
    from bnonly_dist import config
    from bnonly_dist.perf import bench
    source_of(9)  # 9 batches an epoch, 2 of them prefetched
    cfg = config.load("configs/cifar10_resnet14.yaml", ["train.device=cpu", "data.batch_size=4", "train.bn_batch=4"])
    assert bench.pipeline_rate(cfg, torch.device("cpu"), steps=5, warmup=3)["batches"] == 3  # 9 = 3 + 5 + 1
    short = bench.pipeline_rate(cfg, torch.device("cpu"), steps=6, warmup=3)
    assert short["skipped"] == "an epoch has 9 batches of 4, fewer than the 10 the rate needs (3 warm-up + 6 timed + 1)"


def test_each_bench_variant_steps_once_untimed_before_its_turns(monkeypatch):
    calls = []

    class Built:
        def __init__(self, cfg, variant, batch):
            self.images = self.labels = self.plan = SimpleNamespace(autocast=None)
            self.engine = SimpleNamespace(train_step=lambda *a: calls.append("untimed"))
            self.device = torch.device("cpu")

        def step(self):
            calls.append("timed")
            return 0.1

        def extras(self):
            return {}

    monkeypatch.setattr(bench_runner, "Runner", Built)
    conductor, variant = multiprocessing.Pipe()
    for command in ("step", "finish"):
        conductor.send(command)
    bench_runner.serve(variant, None, "all", 8)
    assert [conductor.recv()[0] for _ in range(3)] == ["ready", "step", "done"] and calls == ["untimed", "timed"]


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_part_of_the_check_and_reports_its_numbers(tmp_path):
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    write_wheel(wheels_dir, "bnonly_probe", "bnonly_probe")
    write_wheel(wheels_dir, "bnonly_probe_app", "bnonly_probe_app", "1.0", ("bnonly-probe==0.1",))
    # from outside the repository with a relative --out, as a user may start it; a selection of
    # the cuda tests (FSDP over gloo, with its plan assertion) keeps this test short
    proc = subprocess.run([sys.executable, "-m", "bnonly_dist.gpu_check", "--rehearse", "--wheels", "wheels", "--out",
                           "out", "--cuda-tests", "fsdp"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=1800)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    statuses = {p["name"]: p["status"] for p in report["parts"]}
    assert proc.returncode == 0 and set(statuses.values()) == {"passed"}, (statuses, proc.stdout[-3000:])
    assert list(statuses) == ["install", *(p.name for p in gpu_parts.parts(tmp_path, tmp_path, True, 0))]
    assert out_files(tmp_path / "out") == {"report.md", "report.json", "cuda-tests.xml", "logs.tar.gz",
                                           *(f"{p}.json" for p in report["bench"])}  # 7 files, no subfolder
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as logs:
        assert sorted(logs.getnames()) == sorted(["logs", *(f"logs/{name}.log" for name in statuses)])
    install = report["parts"][0]
    assert "imported 2 modules from site/" in install["detail"]
    tests = next(p for p in report["parts"] if p["name"] == "cuda-tests")
    assert "1 passed" in tests["detail"] and "slowest durations" in tests["stdout"]  # --durations=0
    for name in ("bench-imagenet-resnet50", "bench-imagenet-resnet200"):
        results = report["bench"][name]["results"]
        assert results and all(r["images_per_s"] > 0 and r["step_time_s"] > 0 for r in results)
    searched = report["bench"]["bench-imagenet-resnet50-max-batch"]["results"]
    assert {r["variant"]: r["max_batch"] for r in searched} == {"all": 32, "bn-lean": 32}  # the CPU never runs out
    assert all(report["dali"][d]["images_per_s"] > 0 and report["dali"][d]["not_counted"] == 2
               and report["dali"][d]["batches"] == gpu_parts.DALI_TIMED - 2 for d in ("mixed", "cpu"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## bench-imagenet-resnet50" in markdown and "bn-lean" in markdown and "DALI cpu decode alone" in markdown
    assert report["essential_passed"] and report["rehearsal"]

"""A sweep's preflight names every refusal in one go, each once, before anything is created."""
from __future__ import annotations

from test_launch import REPO, fake_slurm, launch, no_slurm  # noqa: F401  (fixtures)


def test_a_sweep_names_every_refusal_once(fake_slurm, tmp_path):  # noqa: F811
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"config: {REPO / 'configs/cifar10_resnet14.yaml'}\ngrid: {{seed: [0, 1, 2]}}\n"
                    f"overrides: {{runs_root: {tmp_path / 'runs'}}}\n")
    out = launch("sweep.py", spec, env=fake_slurm())
    errors = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(errors) == 2, out.stdout + out.stderr
    assert errors[0] == "sweep: error: data.root is not set for data.name=cifar10; pass data.root=/path/to/cifar10"
    assert errors[1].startswith("sweep: error: --gpus-per-node is not set")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sbatch-called").exists()

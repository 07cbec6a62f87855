"""A training run as a submitit job: what Slurm (or the local executor) runs on every task.

Each task exports torch.distributed's variables from submitit's view of the job (rank =
SLURM_PROCID, master = first node, port from the job id) and calls train.run. On
SIGUSR2 (time limit coming, or preemption) the loop saves on all ranks together and then
hands the signal to submitit, whose handler calls checkpoint() below and requeues the job;
the requeued job resumes from the newest complete checkpoint in the same run directory.
"""
from __future__ import annotations

import os
from pathlib import Path


class TrainJob:
    """Picklable: the resolved config (a dict) and the run directory, nothing else."""

    def __init__(self, config: dict, run_dir: str | Path):
        self.config, self.run_dir = config, str(run_dir)

    def __call__(self) -> dict:
        import submitit

        from bnonly_dist import config, dist
        from bnonly_dist.run import train
        # Our port rule (see dist.master_port) rather than submitit's, which may pick an ephemeral port.
        os.environ.setdefault("MASTER_PORT", str(dist.master_port(submitit.JobEnvironment().job_id)))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return train.run(config.from_dict(self.config), Path(self.run_dir))

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2 after our own save: the same job again, which resumes."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.run_dir))

"""The launchers' shared wait without Slurm (launch/submission.wait_here): resubmission when a restart is pending,
the decision's line when none is; and --wait under Slurm (wait_slurm) ending in that line; with fake jobs (no
training)."""
from pathlib import Path

import pytest

from bnonly_dist.launch import restart, submission
from bnonly_dist.run import history
from bnonly_dist.run.history import Kind


class Job:
    """A local job that has already ended: its summary, or the failure its task decided on."""

    def __init__(self, job_id: str, summary: dict | None):
        self.job_id, self.summary = job_id, summary

    def done(self) -> bool:
        return True

    def results(self) -> list[dict]:
        if self.summary is None:
            raise RuntimeError(f"job {self.job_id} failed")  # as submitit re-raises a task's TrainingFailed
        return [self.summary]


class Executor:
    """Runs each submitted TrainJob at once as its task would: take up a pending retry (restart.announce_restart),
    then fail (the task decides, restart.record) while `failures` lasts, else end with a summary."""

    def __init__(self, failures: int):
        self.failures, self.submitted = failures, []

    def submit(self, train_job):
        job_id = f"{len(self.submitted) + 1}"
        self.submitted.append(job_id)
        run_dir = Path(train_job.run_dir)
        restart.announce_restart(run_dir, train_job.series, job_id)
        if self.failures:
            self.failures -= 1
            with history.locked(run_dir):
                restart.record(run_dir, restart.Outcome(train_job.series, 0, Kind.ERROR, "rank 0: RuntimeError: boom",
                                                        1, train_job.max_failures), job_id)
            return Job(job_id, None)
        return Job(job_id, {"step": 6})


def _wait(tmp_path, prog: str, max_failures: int, failures: int, points: int = 1):
    runs = [submission.Run(None, tmp_path / f"run{i}", f"seed={i}" if prog == "sweep" else "") for i in range(points)]
    for run in runs:
        run.run_dir.mkdir()
    launch = submission.Launch(prog, runs, {}, tmp_path / "jobs", "test", [r.run_dir for r in runs])
    train_jobs = [submission.TrainJob({}, r.run_dir, max_failures, f"local-{i}") for i, r in enumerate(runs)]
    executor = Executor(failures)
    first = executor.submit(train_jobs[0])
    return submission.wait_here(launch, train_jobs, executor, [first], 1), executor


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(submission, "POLL_S", 0)


def test_a_failure_with_a_restart_pending_is_submitted_again_once(tmp_path, capsys):
    code, executor = _wait(tmp_path, "submit", max_failures=3, failures=1)
    out, err = capsys.readouterr()
    assert code == 0 and executor.submitted == ["1", "2"], out + err
    assert out.splitlines() == [f"job failed, restarting as job 2 (history: {tmp_path / 'run0' / 'history.jsonl'})",
                                f"job 2 done: {tmp_path / 'run0' / 'summary.json'}"]
    assert [row.event for row in history.read(tmp_path / "run0").of("local-0")] == ["failure", "restart"]
    assert err == ""


def test_a_failure_not_retried_ends_in_the_decision_and_is_not_resubmitted(tmp_path, capsys):
    code, executor = _wait(tmp_path, "submit", max_failures=0, failures=1)
    out, err = capsys.readouterr()
    assert code == 1 and executor.submitted == ["1"] and out == "", out + err
    assert err.splitlines() == [
        "bnonly: attempt 1 failed at step 0 (rank 0: RuntimeError: boom); not retried: retrying is off "
        f"(--max-failures 0); see {tmp_path / 'run0' / 'history.jsonl'}"]


def test_a_sweep_goes_on_after_a_point_that_failed_and_counts_it(tmp_path, capsys):
    """Point 0 fails for good, point 1 (started after it, parallel 1) is done: exit 1, one line each."""
    code, executor = _wait(tmp_path, "sweep", max_failures=0, failures=1, points=2)
    out, err = capsys.readouterr()
    assert code == 1 and executor.submitted == ["1", "2"], out + err
    assert err.splitlines() == [
        "(seed=0) bnonly: attempt 1 failed at step 0 (rank 0: RuntimeError: boom); not retried: retrying is off "
        f"(--max-failures 0); see {tmp_path / 'run0' / 'history.jsonl'}"]
    assert out.splitlines() == ["1 of 2 points done"]
    assert (tmp_path / "run1" / "slurm" / "job_id").read_text().strip() == "2"  # recorded when it started


def test_slurm_wait_ends_a_failure_in_the_decision_after_the_log(tmp_path, capsys, monkeypatch):
    """Under Slurm the series is the job's id: its decision not to restart is the console's last line."""
    run = submission.Run(None, tmp_path / "run0")
    run.run_dir.mkdir()
    with history.locked(run.run_dir):
        restart.record(run.run_dir, restart.Outcome("77", 0, Kind.CONFIG, "rank 0: DataError: no CIFAR-10", 1, 3), "77")
    monkeypatch.setattr(submission.cluster, "failure_report", lambda job, err: f"job {job.job_id} failed; its log")
    launch = submission.Launch("submit", [run], {}, tmp_path / "jobs", "test", [run.run_dir])
    assert submission.wait_slurm(launch, [Job("77", None)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "job 77 failed; its log",
        "bnonly: attempt 1 failed at step 0 (rank 0: DataError: no CIFAR-10); not retried: never retried: a config, "
        f"command-line, run-directory or data-set error (exit 2); see {run.run_dir / 'history.jsonl'}"]


class Interrupting(Job):
    """A job whose first look at its result is cut by a second Ctrl-C (the handler raises there), then failed."""

    def __init__(self, job_id: str):
        super().__init__(job_id, None)
        self.looks = 0

    def results(self) -> list[dict]:
        self.looks += 1
        if self.looks == 1:
            raise KeyboardInterrupt
        return super().results()


def test_a_second_ctrl_c_while_a_failed_job_is_being_looked_at_is_an_interruption(tmp_path, capsys):
    run = submission.Run(None, tmp_path / "run0")
    run.run_dir.mkdir()
    launch = submission.Launch("submit", [run], {}, tmp_path / "jobs", "test", [run.run_dir])
    train_jobs = [submission.TrainJob({}, run.run_dir, 3, "local-0")]
    code = submission.wait_here(launch, train_jobs, Executor(0), [Interrupting("1")], 1)
    assert code == 130
    assert capsys.readouterr().err.startswith("submit: interrupted; ")


class Config:
    def to_dict(self) -> dict:
        return {}


def test_without_slurm_only_the_first_run_is_submitted_before_the_wait(tmp_path, monkeypatch):
    """The rest start inside wait_here, under its Ctrl-C handling: a failed submission can only take back run
    directories nothing has started in."""
    executor = Executor(0)
    monkeypatch.setattr(submission.cluster, "executor", lambda *a: executor)
    monkeypatch.setattr(submission.rundir, "prepare_all", lambda runs: None)
    monkeypatch.setattr(submission.jobs, "hold_stops", lambda: None)
    runs = [submission.Run(Config(), tmp_path / f"run{i}", f"seed={i}") for i in range(3)]
    for run in runs:
        run.run_dir.mkdir()
    launch = submission.Launch("sweep", runs, {"max_failures": 3}, tmp_path / "jobs", "test", [r.run_dir for r in runs],
                               parallel=3)
    started, train_jobs, _ = submission.submit(launch, type("Target", (), {"slurm": False})())
    assert [job is not None for job in started] == [True, False, False] and executor.submitted == ["1"]
    assert len(train_jobs) == 3

"""When the loop speaks: metric rows on the log_every grid (the same steps on every rank), a
console line for the first step and whenever nothing was printed for 30 s, evaluations at epoch ends."""
from bnonly_dist import config
from bnonly_dist.run import train


def test_rows_follow_the_grid_and_the_console_is_never_silent_for_30_s(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    cfg = config.load("configs/cifar10_resnet20.yaml", ["train.log_every=50", "train.eval_every=2"])
    cadence = train.Cadence(cfg, steps_per_epoch=10, end=95)
    assert [s for s in range(1, 96) if cadence.log_due(s)] == [50, 95]  # the grid and the last step
    assert cadence.console_due(first=True)  # the first step always speaks
    now[0] += 29.9
    assert not cadence.console_due(first=False)
    now[0] += 0.2
    assert cadence.console_due(first=False)
    cadence.printed()
    assert not cadence.console_due(first=False)
    assert [s for s in range(1, 96) if cadence.eval_due(s)] == [20, 40, 60, 80]

"""Text logs: the console on rank 0 and one file per rank in RUN/logs/."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from bnonly_dist.logsafe import SafeFileHandler, SafeStreamHandler
from bnonly_dist.run.paths import RunPaths


def setup_logging(run_dir: Path, rank: int) -> None:
    """Console on rank 0, and a text log per rank in RUN/logs/."""
    paths = RunPaths(run_dir)
    paths.logs.mkdir(parents=True, exist_ok=True)
    # Safe handlers: a full disk gives one warning line, not a traceback per log record.
    handlers: list[logging.Handler] = [SafeFileHandler(paths.rank_log(rank))]
    if rank == 0:
        handlers.append(SafeStreamHandler(sys.stdout))
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)

"""One training run and its pieces.

In: a Config, the process context (dist) and a run directory. Out: the run directory's
files: config.yaml, metrics.jsonl, tb/, checkpoints/, logs/, summary.json.
train is the loop; checkpoint (+ checkpoint_files) saves and resumes it; rundir and paths
own the directory and its lock; finished says when a run is finished; stop turns signals
into an agreed stop; metrics and meter log the global batch's numbers; evaluate and
eval_run measure accuracy; bn_stats reads gamma and beta; history is the ledger of
failures, restarts and stops (RUN/history.jsonl) and the one table of exceptions, exit
codes and cause kinds.
"""

"""What submits and shapes jobs; nothing here trains.

In: a Config (or a sweep file of them) and the request (nodes, GPUs, time). Out: Slurm
jobs through submitit (cluster, jobs), or local process groups without Slurm, after
preflight has checked config, data, run directory and capacity; sweep expands a grid
into points with one run directory each; submission is the launchers' one flow (check,
submit, record, wait, and without Slurm resubmit).
"""

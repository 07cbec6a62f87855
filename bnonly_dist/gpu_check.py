"""`python -m bnonly_dist.gpu_check`: the documented entry point of the GPU check (bnonly_dist/perf/gpu_check.py)."""
from bnonly_dist.perf.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())

"""What measures: speed, memory and the GPU check; nothing here writes a run.

In: a Config and the variants to compare. Out: tables and JSON (images/s, step times,
peak memory, the largest batch that fits, checkpoint save/load times). bench times
variants in turns through bench_runner; bench_checkpoint times saves (models.memory
estimates saved activations on the meta device); gpu_check runs the
whole one-call check of a GPU node.
"""

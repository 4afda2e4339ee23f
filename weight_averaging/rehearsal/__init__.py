"""The rehearsal: every workload's real model through the unchanged official runner, on CPU.

`cells` (no algoperf, no jax): what one cell is, its result file, skip reasons, the memory
guard and comparison, the table. `launch` runs one subprocess per workload from the
AlgoPerf checkout; `driver` is that subprocess (it imports algoperf, lazily, and drives
``submission_runner.train_once`` for the reference NadamW and our submissions).
``scripts/rehearse.py`` is the command line.
"""

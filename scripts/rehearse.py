"""Every workload's real model, each submission, through the unchanged official runner, on CPU.

  ALGOPERF_DIR=/path/to/algoperf /path/to/algoperf/.venv/bin/python scripts/rehearse.py \
      --workloads ogbg mnist --output_dir=/tmp/rehearsal
  # --submissions reference_nadamw nadamw_lawa  --steps 6  --batch_size 8  --overwrite

For each workload (one subprocess: one workload init) and each submission, algoperf's own
reference NadamW side by side, ``submission_runner.train_once`` runs a few steps on fake
batches of the workload's shapes with evals (``prepare_for_eval`` + eval) and checkpoints;
it checks that training after an eval went on from the live params and that a run saved,
restored by the runner and continued equals the uninterrupted one. Each cell's result is a
JSON file under --output_dir, reused unless --overwrite, so the table can be built in
pieces; the table of all results asked for is printed at the end. What each column means:
``weight_averaging/rehearsal/cells.py``.
"""

import argparse
import os
import sys

try:
  import weight_averaging  # pylint: disable=unused-import
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from weight_averaging.rehearsal import cells, launch


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", nargs="+", default=list(cells.WORKLOADS),
                 choices=cells.WORKLOADS)
  p.add_argument("--submissions", nargs="+", default=list(cells.SUBMISSIONS),
                 choices=cells.SUBMISSIONS)
  p.add_argument("--output_dir", default="/tmp/rehearsal")
  p.add_argument("--steps", type=int, default=6, help="training steps per run (at least 2)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="global batch size for every workload given (default: cells.BATCH_SIZES)")
  p.add_argument("--overwrite", action="store_true", help="rerun cells that have a result")
  p.add_argument("--memory_limit_gb", type=float, default=12.0,
                 help="what one workload's process may use; a cell predicted above it is skipped")
  p.add_argument("--algoperf_dir", default=None, help="the AlgoPerf checkout ($ALGOPERF_DIR)")
  p.add_argument("--timeout_s", type=float, default=None, help="per workload process")
  p.add_argument("--process_per_cell", action="store_true",
                 help="a fresh process per cell, the reference first: the memory guard then "
                      "sees only that cell (one workload init each); ratios are to the "
                      "reference's saved step time")
  p.add_argument("--no_twin", action="store_true", help="skip the eval-continuation run")
  p.add_argument("--no_restore", action="store_true", help="skip the restore check")
  p.add_argument("--keep_runs", action="store_true", help="keep each run's experiment dir")
  args = p.parse_args(argv)
  results = launch.rehearse(
      args.workloads, args.submissions, args.output_dir, args.steps, args.batch_size,
      overwrite=args.overwrite, memory_limit=int(args.memory_limit_gb * cells.GIB),
      algoperf_dir=args.algoperf_dir, timeout_s=args.timeout_s, no_twin=args.no_twin,
      no_restore=args.no_restore, keep_runs=args.keep_runs,
      process_per_cell=args.process_per_cell)
  print(cells.table(results))
  print()
  print(cells.grid(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

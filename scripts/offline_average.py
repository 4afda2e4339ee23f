"""Replays EMA and LAWA over a grid from a run's params snapshots and evaluates each.

  python scripts/offline_average.py --snapshot_dir=DIR --every=10,20,40 \
      --lawa_k=5,10,20 --ema_beta=0.8,0.9,0.95 --output_json=offline.json

``DIR`` was written by a submission run with the hyperparameter ``snapshot_every``
(nu0); every ``--every`` must be a multiple of it. The results file (format in
``weight_averaging/studies/offline.py``) is what ``scripts/plot.py --offline``
draws as the paper's Figures 10-11 heatmaps and the window-vs-speed-up figure.
"""

import os
import sys

from absl import app, flags

try:
  from weight_averaging.studies import offline
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from weight_averaging.studies import offline

flags.DEFINE_string("snapshot_dir", None, "Snapshot directory written by a run.")
flags.DEFINE_string("workload", "teacher_student",
                    "Workload to evaluate on: embedded, or AlgoPerf's registry name.")
flags.DEFINE_enum("api", "jit", ["jit", "pmap"],
                  "'pmap' if the workload's eval_model wants a leading device axis.")
flags.DEFINE_list("every", None, "Sampling intervals nu (multiples of the snapshots' nu0).")
flags.DEFINE_list("lawa_k", [], "LAWA queue lengths k.")
flags.DEFINE_list("ema_beta", [], "EMA decays beta in [0, 1).")
flags.DEFINE_integer("start_step", 0, "The averagers' start_step (burn-in).")
flags.DEFINE_integer("eval_every", None, "Evaluate at multiples of this many steps "
                     "(default: the workload's eval interval).")
flags.DEFINE_list("eval_steps", None, "Evaluate exactly at these steps instead.")
flags.DEFINE_string("submission", "", "Label of the run, stored in the results.")
flags.DEFINE_string("data_dir", None, "Data directory (AlgoPerf workloads).")
flags.DEFINE_string("output_json", None, "Where to write the results.")
flags.mark_flags_as_required(["snapshot_dir", "every", "output_json"])
FLAGS = flags.FLAGS


def _numbers(name, values, kind):
  try:
    return [kind(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{name} must be a list of {kind.__name__}s, got "
                         f"{','.join(values)}") from e


def main(argv):
  del argv
  try:
    nu0 = offline.snapshots_lib.read_manifest(FLAGS.snapshot_dir).snapshot_every
    grid = offline.make_grid(_numbers("every", FLAGS.every, int),
                             _numbers("lawa_k", FLAGS.lawa_k, int),
                             _numbers("ema_beta", FLAGS.ema_beta, float), nu0)
    eval_steps = (_numbers("eval_steps", FLAGS.eval_steps, int)
                  if FLAGS.eval_steps else None)
    results = offline.run_offline(
        FLAGS.snapshot_dir, grid, workload_name=FLAGS.workload, api=FLAGS.api,
        eval_every=FLAGS.eval_every, eval_steps=eval_steps, start_step=FLAGS.start_step,
        submission=FLAGS.submission, data_dir=FLAGS.data_dir, progress=print)
  except ValueError as e:   # a bad flag value or a damaged snapshot: the message names it
    sys.exit(f"offline_average.py: error: {e}")
  offline.write_results(results, FLAGS.output_json)
  base = results["baseline"]["steps_to_target"]
  print(f"baseline (no averaging): steps to target {base}; "
        f"{len(results['grid'])} grid points; results in {FLAGS.output_json}")


if __name__ == "__main__":
  app.run(main)

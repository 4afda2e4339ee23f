"""``python -m weight_averaging.runner``: the embedded runner's command line.

The flags are the official ``submission_runner.py``'s names where they exist, plus
the embedded runner's own (``--api``, ``--eval_every_steps``, ``--num_devices``, the
multi-process settings). This module is the only place that defines them:
importing `weight_averaging.runner` defines no flag.
"""

import os
import sys

from absl import app, flags

from weight_averaging.runner import distributed
from weight_averaging.runner.branch import Branch
from weight_averaging.runner.experiment import run_experiment

flags.DEFINE_string("workload", "teacher_student", "Embedded workload to run.")
flags.DEFINE_string("framework", "jax", "Only 'jax' (accepted for compatibility).")
flags.DEFINE_string("submission_path", None, "Path to a submission.py file.")
flags.DEFINE_string("tuning_search_space", None, "Search-space JSON (list or dict form).")
flags.DEFINE_enum("tuning_ruleset", "external", ["external", "self"], "'external': "
                  "trials from --tuning_search_space; 'self': one trial with "
                  "hyperparameters=None and 1.5x the runtime budget, as the official runner.")
flags.DEFINE_integer("num_tuning_trials", 1, "Number of hyperparameter points to run.")
flags.DEFINE_string("experiment_dir", None, "Root directory of the experiment logs.")
flags.DEFINE_string("experiment_name", None, "Name of this experiment under experiment_dir.")
flags.DEFINE_integer("rng_seed", 0, "Seed of the run (data order, init, dropout).")
flags.DEFINE_integer("max_global_steps", None, "Stop after this many steps "
                     "(default: the workload's step_hint).")
flags.DEFINE_boolean("overwrite", False, "Delete an existing experiment and start anew.")
flags.DEFINE_boolean("resume_last_run", False, "Continue an existing experiment.")
flags.DEFINE_enum("api", "jit", ["jit", "pmap"], "The AlgoPerf JAX API the submission "
                  "implements: 'jit' (algoperf 2c90454f) or 'pmap' (fb2f492a).")
flags.DEFINE_integer("eval_every_steps", None, "Eval-eligible every this many steps "
                     "(default: the workload's).")
flags.DEFINE_boolean("save_checkpoints", True, "Checkpoint at every eval.")
flags.DEFINE_boolean("stop_at_target", True, "Stop once validation and test targets are met.")
flags.DEFINE_integer("num_devices", None, "Simulated CPU devices (sets XLA_FLAGS; CPU only).")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                     "JAX_NUM_PROCESSES, else 1).")
flags.DEFINE_integer("process_id", None, "This process's index (default: JAX_PROCESS_ID).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                    "(default: JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("hparam_start_index", None, "Run the trials from this index (from 0) "
                     "of the search space on, as the official runner.")
flags.DEFINE_integer("hparam_end_index", None, "Run the trials before this index (from 0), "
                     "as the official runner.")
flags.DEFINE_list("checkpoint_steps", [], "Keep the checkpoints of these steps for good "
                  "(a trunk's branch points; written between evals too).")
flags.DEFINE_string("branch_from", None, "Start each trial from the checkpoint at "
                    "--branch_step of this trial directory (the trunk): a cooldown branch.")
flags.DEFINE_integer("branch_step", None, "The trunk's step to branch from (with "
                     "--branch_from).")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for the coordinator "
                     "and the other processes before failing.")

FLAGS = flags.FLAGS

_REQUIRED = ("submission_path", "experiment_dir", "experiment_name")


def _start_jax() -> None:
  """Simulated devices and `jax.distributed`, before JAX starts its backend."""
  try:
    distributed.simulate_devices(FLAGS.num_devices)
    distributed.initialize(
        distributed.config_from(FLAGS.coordinator_address, FLAGS.num_processes,
                                FLAGS.process_id),
        timeout_s=FLAGS.initialization_timeout)
  except (ConnectionError, ValueError) as e:
    print(f"weight_averaging.runner: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv):
  del argv
  if FLAGS.framework != "jax":
    raise app.UsageError(f"--framework must be 'jax', got {FLAGS.framework!r}")
  for name in _REQUIRED:
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  if (FLAGS.tuning_ruleset == "external") != bool(FLAGS.tuning_search_space):
    raise app.UsageError(
        "--tuning_search_space is required with --tuning_ruleset=external"
        if FLAGS.tuning_ruleset == "external" else
        "--tuning_search_space cannot be given with --tuning_ruleset=self: the "
        "submission tunes itself (it gets hyperparameters=None)")
  try:
    checkpoint_steps = tuple(int(s) for s in FLAGS.checkpoint_steps)
  except ValueError:
    raise app.UsageError(f"--checkpoint_steps must be integers, got "
                         f"{','.join(FLAGS.checkpoint_steps)}") from None
  if (FLAGS.branch_from is None) != (FLAGS.branch_step is None):
    raise app.UsageError("--branch_from and --branch_step go together: give both or neither")
  branch = (None if FLAGS.branch_from is None
            else Branch(os.path.abspath(FLAGS.branch_from), FLAGS.branch_step))
  _start_jax()
  with distributed.exit_at_once_on_failure():
    results = run_experiment(
        workload_name=FLAGS.workload, submission_path=FLAGS.submission_path,
        tuning_search_space=FLAGS.tuning_search_space,
        tuning_ruleset=FLAGS.tuning_ruleset, experiment_dir=FLAGS.experiment_dir,
        experiment_name=FLAGS.experiment_name, num_tuning_trials=FLAGS.num_tuning_trials,
        rng_seed=FLAGS.rng_seed, api=FLAGS.api, max_global_steps=FLAGS.max_global_steps,
        eval_every_steps=FLAGS.eval_every_steps, overwrite=FLAGS.overwrite,
        resume_last_run=FLAGS.resume_last_run, save_checkpoints=FLAGS.save_checkpoints,
        stop_at_target=FLAGS.stop_at_target, progress=FLAGS.progress,
        flag_values=FLAGS.flag_values_dict(), hparam_start_index=FLAGS.hparam_start_index,
        hparam_end_index=FLAGS.hparam_end_index, checkpoint_steps=checkpoint_steps,
        branch=branch)
  if not distributed.is_primary():
    return
  for r in results:
    reached = (f"reached the validation target at step {r.reached_target_step} "
               f"({r.reached_target_time:.1f}s)" if r.reached_target_step else
               "did not reach the validation target")
    print(f"{os.path.basename(r.log_dir)}: {r.global_step} steps; {reached}; logs in {r.log_dir}")


if __name__ == "__main__":
  app.run(main)

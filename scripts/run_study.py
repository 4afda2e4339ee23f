"""Runs a study grid: submissions x workloads x studies x trials, in AlgoPerf's layout.

The seven AlgoPerf workloads of the paper through the official runner (from an algoperf
checkout at the API's commit), the embedded workload through ``weight_averaging.runner``::

  python scripts/run_study.py --experiment_dir=$HOME/study --algoperf_dir=$HOME/algoperf \\
      --data_root=$HOME/data --python=$HOME/algoperf/.venv/bin/python --api=jit
  python scripts/run_study.py --experiment_dir=study --workloads=teacher_student \\
      --submissions=nadamw,nadamw_ema,nadamw_lawa

``--preset=lr_sweep|schedules|annealing`` runs one of the paper's Section 6 grids instead of
the search space (top learning rate x averaging; shorter schedules, optionally as cooldowns
branched from one constant trunk, against the averaged full run; annealing to 0, to half or
not at all, x averaging) over the families of ``--submissions`` (NadamW by default):
`weight_averaging.studies.presets` documents each grid and its flags::

  python scripts/run_study.py --experiment_dir=why --workloads=teacher_student \\
      --preset=schedules --cooldown_branches --num_studies=2

Finished trials are skipped, so the same command resumes a grid; ``--dry_run`` prints the
commands and runs nothing. The exit status is 1 when a run failed (each is listed with its log),
2 when the grid cannot start (a bad flag or config, or another run_study holding DIR: its pid is
named), 128 + N on signal N (SIGTERM, SIGINT), after the running trial's processes are stopped.
Details (the layout, what "finished" means, the runners' flags): `weight_averaging.studies.grid`.
"""

import contextlib
import os
import sys

from absl import app, flags

try:
  from weight_averaging.studies import grid
except ImportError:  # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from weight_averaging.studies import grid
from weight_averaging import processes
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import configs, presets, workload_facts

flags.DEFINE_list("submissions", list(catalog.NAMES), "Submissions to run.")
flags.DEFINE_list("workloads", list(workload_facts.PAPER_WORKLOADS),
                  "Workloads to run: names of workloads_config/*.json (the embedded one is "
                  "teacher_student).")
flags.DEFINE_integer("num_studies", 3, "Studies per submission and workload (study_0, ...).")
flags.DEFINE_enum("api", "jit", list(configs.APIS), "The AlgoPerf JAX API: submissions/<api>/ and "
                  "the algoperf checkout's commit (jit: 2c90454f, pmap: fb2f492a).")
flags.DEFINE_enum("search_space", "paper", list(configs.SEARCH_SPACES),
                  "'paper': one trial, the paper's point per workload; 'all': the optimizer's "
                  "five published points (AlgoPerf's external tuning), with the workload's "
                  "averaging settings.")
flags.DEFINE_string("experiment_dir", None, "Root of the logs: DIR/<submission>/study_<i>/...")
flags.DEFINE_string("data_root", None, "Root of the datasets, as algoperf's dataset_setup.py "
                    "lays them out (DATA_ROOT/wmt, DATA_ROOT/imagenet/jax, ...).")
flags.DEFINE_string("algoperf_dir", None, "An algoperf checkout with submission_runner.py "
                    "(needed for AlgoPerf workloads).")
flags.DEFINE_string("python", sys.executable, "Interpreter of the official runner (the one "
                    "with algoperf's dependencies and this package installed).")
flags.DEFINE_integer("max_global_steps", None, "Stop every trial after this many steps "
                     "(both runners take it).")
flags.DEFINE_integer("num_devices", None, "Simulated CPU devices (embedded runner only).")
flags.DEFINE_integer("rng_seed", 1, "Seed of study_0; study i uses rng_seed + i.")
flags.DEFINE_boolean("save_checkpoints", False, "Let the official runner checkpoint (its "
                     "restore is broken upstream; the embedded runner always checkpoints).")
flags.DEFINE_enum("preset", None, list(presets.PRESETS), "A Section 6 grid of the paper "
                  "instead of --search_space (weight_averaging.studies.presets): lr_sweep, "
                  "schedules or annealing, over the families of --submissions (default "
                  "nadamw).")
flags.DEFINE_list("lr_factors", None, "lr_sweep: top learning rates as multiples of the "
                  f"config's (default {','.join(map(str, presets.DEFAULT_LR_FACTORS))}).")
flags.DEFINE_list("schedule_fractions", None, "schedules: the shorter schedules' fractions "
                  "of the step hint, in (0, 1] (default "
                  f"{','.join(map(str, presets.DEFAULT_SCHEDULE_FRACTIONS))}).")
flags.DEFINE_list("end_factors", None, "annealing: lr_end_factor values in [0, 1] (default "
                  f"{','.join(map(str, presets.DEFAULT_END_FACTORS))}); a constant run is "
                  "always added.")
flags.DEFINE_boolean("cooldown_branches", False, "schedules, embedded runner: the shorter "
                     "schedules as WSD cooldowns branched from one constant trunk.")
flags.DEFINE_float("cooldown_fraction", None, "schedules with --cooldown_branches: the "
                   "cooldown's length as a fraction of the step hint, in (0, 1] (default "
                   f"{presets.DEFAULT_COOLDOWN_FRACTION}).")
flags.DEFINE_boolean("overwrite", False, "Run finished trials again, from scratch.")
flags.DEFINE_boolean("dry_run", False, "Print the commands; run nothing.")

FLAGS = flags.FLAGS


def _report(line: str) -> None:
  print(line, flush=True)


def _numbers(flag: str):
  """A list flag's values as floats (None when not given); `ValueError` naming the flag."""
  values = getattr(FLAGS, flag)
  if values is None:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"--{flag} must list numbers, got {','.join(values)}") from None


def _preset():
  """The preset's options (None without --preset); `ValueError` for a conflicting flag."""
  own = ("lr_factors", "schedule_fractions", "end_factors", "cooldown_branches",
         "cooldown_fraction")
  if FLAGS.preset is None:
    given = [f for f in own if FLAGS[f].present]
    if given:
      raise ValueError(f"--{given[0]} belongs to a --preset; none is given")
    return None
  if FLAGS["search_space"].present:
    raise ValueError(f"--search_space={FLAGS.search_space} conflicts with --preset="
                     f"{FLAGS.preset}: a preset writes its own search space; drop one")
  return presets.PresetOptions(
      FLAGS.preset, lr_factors=_numbers("lr_factors"),
      schedule_fractions=_numbers("schedule_fractions"), end_factors=_numbers("end_factors"),
      cooldown_branches=FLAGS.cooldown_branches, cooldown_fraction=FLAGS.cooldown_fraction)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.experiment_dir:
    raise app.UsageError("--experiment_dir is required")
  try:
    preset = _preset()
  except ValueError as e:
    print(f"run_study: {e}", file=sys.stderr)
    return 2
  # A preset runs NadamW's family unless --submissions names another optimizer.
  submissions = (("nadamw",) if preset and not FLAGS["submissions"].present
                 else tuple(FLAGS.submissions))
  options = grid.GridOptions(
      experiment_dir=FLAGS.experiment_dir, submissions=submissions, preset=preset,
      workloads=tuple(FLAGS.workloads), num_studies=FLAGS.num_studies, api=FLAGS.api,
      search_space=FLAGS.search_space, data_root=FLAGS.data_root,
      algoperf_dir=FLAGS.algoperf_dir, python=FLAGS.python,
      max_global_steps=FLAGS.max_global_steps, num_devices=FLAGS.num_devices,
      rng_seed=FLAGS.rng_seed, save_checkpoints=FLAGS.save_checkpoints)
  try:
    runs = grid.plan(options)
    grid.check_checkout(runs, options, dry_run=FLAGS.dry_run, report=_report)
    for path in grid.write_description(options, runs):
      _report(f"--preset={preset.name} on {', '.join(grid.submissions_of(options))}: "
              f"its trials are described in {path}")
  except ValueError as e:
    print(f"run_study: {e}", file=sys.stderr)
    return 2
  # A dry run changes no trial, so it may look at a grid that another run_study runs.
  lock = (contextlib.nullcontext() if FLAGS.dry_run else processes.exclusive(
      grid.run_study_path(FLAGS.experiment_dir, "lock"),
      f"experiment directory {FLAGS.experiment_dir} (run_study)"))
  try:
    with lock, processes.signals_raise():
      result = grid.run_grid(runs, dry_run=FLAGS.dry_run, overwrite=FLAGS.overwrite,
                             report=_report)
  except processes.Busy as e:
    print(f"run_study: {e}", file=sys.stderr)
    return 2
  except processes.Terminated as e:
    print(f"run_study: {e}; the running trial's processes were stopped", file=sys.stderr)
    return e.exit_status
  _report(grid.summary(result))
  return 0 if result.ok else 1


if __name__ == "__main__":
  app.run(main)

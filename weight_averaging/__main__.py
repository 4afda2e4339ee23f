"""Command line: ``python -m weight_averaging demo [--output_dir DIR] [--seeds N]
[--submissions nadamw nadamw_ema ...] [--overwrite]``.

The main job: NadamW, NadamW+EMA and NadamW+LAWA (the jit-API submissions of this
package, unchanged; ``--submissions`` adds ``shampoo``, ``shampoo_ema`` and
``shampoo_lawa``) train on the embedded workload through the embedded runner, a
few seeds each, one study per seed in AlgoPerf's experiment layout under ``DIR``
(``DIR/<submission>/study_<seed>/teacher_student_jax/trial_1/``). The runs are then
scored by `weight_averaging.studies.scoring`, as ``scripts/score.py`` scores a
study: the printed table is the scored one (median over seeds of the steps and
submission time to the workload's validation target, by the workload's own rule,
and their fraction of NadamW's and of the submission's optimizer without
averaging). It writes ``DIR/scores.json``, a ``DIR/summary.json`` of the table, and
the figures of `weight_averaging.studies.plots` the runs allow, as PNG and PDF:
validation curves, steps to target against NadamW, and against Shampoo.

``DIR`` (default ``demo_output``) must be new, empty, or a directory an earlier demo wrote
(it holds `MARKER`, or a demo's ``summary.json``): the demo then replaces its runs, so it can
be run again. Any other
directory with something in it (a study grid's runs, say) is refused without ``--overwrite``,
as the runner refuses an existing experiment; with it, the demo deletes the directory's
submission runs (``DIR/<submission>/`` for every submission of the catalog) and writes its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from weight_averaging import layout
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import plots  # matplotlib is imported only to draw
from weight_averaging.studies import scores_file, scoring, workload_facts

SUBMISSIONS = ("nadamw", "nadamw_ema", "nadamw_lawa")  # the demo's default
REFERENCE = "nadamw"  # the reference of every ratio; it always runs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".weight_averaging_demo"  # marks an output dir as the demo's own


def _demo_wrote(output_dir: str) -> bool:
  """Whether `output_dir` is an earlier demo's: its marker, or (written before the marker
  was) a summary.json with the demo's keys."""
  if os.path.exists(os.path.join(output_dir, MARKER)):
    return True
  try:
    with open(os.path.join(output_dir, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(summary, dict) and {"workload", "seeds", "runs", "median"} <= set(summary)


def prepare_output_dir(output_dir: str, overwrite: bool = False) -> None:
  """Makes `output_dir` the demo's (see the module docstring), or raises `ValueError` naming
  what it holds. Every submission's runs in it are removed: scoring reads everything under
  it, so an earlier demo's other seeds or submissions would be scored too."""
  if os.path.isdir(output_dir) and not overwrite and not _demo_wrote(output_dir):
    held = sorted(n for n in os.listdir(output_dir) if not n.startswith("."))
    if held:
      raise ValueError(
          f"--output_dir {output_dir} is not empty and no earlier demo wrote it (it holds "
          f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); the demo would replace "
          "the runs in it. Choose a new --output_dir, or pass --overwrite to replace them.")
  for name in catalog.NAMES:
    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, MARKER), "w") as f:
    f.write("Written by python -m weight_averaging demo: a later demo replaces the runs here.\n")


def _train(output_dir, workload_name, name, seed, progress) -> str:
  """One seed of submission `name`, study ``study_<seed>``; returns the trial's log dir."""
  from weight_averaging import runner  # pylint: disable=g-import-not-at-top
  [result] = runner.run_experiment(
      workload_name=workload_name,
      submission_path=os.path.join(REPO, "submissions", "jit", name, "submission.py"),
      tuning_search_space=os.path.join(REPO, "tuning_search_spaces", "embedded",
                                       f"{name}.json"),
      experiment_dir=os.path.join(output_dir, name),
      experiment_name=layout.study_dir_name(seed), rng_seed=seed, progress=progress,
      save_checkpoints=False)
  return result.log_dir


def _ratio_to_base(name, result):
  """The fraction of the base's steps; a base against itself is 1 when it hits."""
  base = catalog.base_of(name)
  if base != name:
    return result["fraction_of_baseline_steps"].get(base)
  steps = result["median_steps_to_target"]
  return None if steps is None else scoring.ratio(steps, steps)


def summarize(scores, workload_name, seeds, log_dirs) -> dict:
  """The demo's summary: per submission the scored medians and ratios, per seed its study."""
  spec = scores["workloads"][workload_name]
  summary = {"workload": workload_name,
             "target": {"metric": spec["metric"], "value": spec["target"]},
             "step_hint": spec["step_hint"], "seeds": seeds, "runs": {}, "median": {}}
  for name, dirs in log_dirs.items():
    result = scores["results"][workload_name][name]
    studies = result["studies"]
    summary["runs"][name] = {seed: {
        "steps_to_target": studies[layout.study_dir_name(seed)]["steps_to_target"],
        "submission_time_to_target": studies[layout.study_dir_name(seed)]["time_to_target"],
        "log_dir": log_dir} for seed, log_dir in dirs.items()}
    summary["median"][name] = {
        "steps_to_target": result["median_steps_to_target"],
        "submission_time_to_target": result["median_time_to_target"],
        "ratio_to_nadamw": result["fraction_of_baseline_steps"].get(REFERENCE),
        "ratio_to_base": _ratio_to_base(name, result),
        "reached": result["num_studies_hit"]}
  return summary


def print_table(summary, spec, out) -> None:
  """The scored table: medians over seeds, ratios, and each seed's steps ('—': missed)."""
  op = workload_facts.comparison(spec["minimize"], spec.get("strict", True))
  print(f"\n{summary['workload']}: steps and submission time to {spec['metric']} {op} "
        f"{spec['target']} (step_hint {summary['step_hint']}), median over "
        f"{summary['seeds']} seeds", file=out)
  print(f"{'submission':<16}{'steps':>8}{'time s':>9}{'/ NadamW':>10}"
        f"{'/ no avg':>10}   per seed", file=out)
  fmt = lambda v, f: "—" if v is None else format(v, f)
  for name, med in summary["median"].items():
    steps = [run["steps_to_target"] for run in summary["runs"][name].values()]
    print(f"{plots.LABELS[name]:<16}{fmt(med['steps_to_target'], '>8.0f')}"
          f"{fmt(med['submission_time_to_target'], '>9.1f')}"
          f"{fmt(med['ratio_to_nadamw'], '>10.2f')}{fmt(med['ratio_to_base'], '>10.2f')}"
          f"   {['—' if s is None else s for s in steps]}", file=out)


def run_demo(output_dir: str, seeds: int, overwrite: bool = False,
             progress: bool = True, out=None, submissions=SUBMISSIONS) -> dict:
  """Trains `submissions` for `seeds` seeds each, scores them; returns the summary dict.

  `output_dir` is checked by `prepare_output_dir` before anything runs."""
  out = out or sys.stdout
  submissions = tuple(submissions)
  unknown = [n for n in submissions if n not in catalog.NAMES]
  if unknown or not submissions:
    raise ValueError(f"submissions must be some of {catalog.NAMES}, got {submissions}")
  if REFERENCE not in submissions:
    submissions = (REFERENCE,) + submissions
  from weight_averaging import workloads  # pylint: disable=g-import-not-at-top
  workload_name = workloads.DEFAULT
  prepare_output_dir(output_dir, overwrite)
  start = time.time()
  log_dirs = {name: {} for name in submissions}
  for seed in range(seeds):
    for name in submissions:
      log_dirs[name][seed] = _train(output_dir, workload_name, name, seed, progress)
  scores = scoring.score_experiment(output_dir, baseline=REFERENCE, use_algoperf="no")
  scores_file.write(scores, os.path.join(output_dir, "scores.json"))
  summary = summarize(scores, workload_name, seeds, log_dirs)
  print_table(summary, scores["workloads"][workload_name], out)
  summary["wall_time_s"] = time.time() - start
  with open(os.path.join(output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  figures, not_drawn = [], []
  for figure in (plots.validation_curves, plots.steps_to_target, plots.shampoo):
    paths, why = plots.attempt(figure, scores, output_dir)
    figures += [os.path.basename(p) for p in paths if p.endswith(".png")]
    not_drawn += [f"{figure.__name__} ({why})"] if why else []
  print(f"\nRuns, scores.json, summary.json and figures ({', '.join(figures) or 'none'}) in "
        f"{output_dir}; {summary['wall_time_s']:.0f}s in all.", file=out)
  if not_drawn:
    print(f"Not drawn: {'; '.join(not_drawn)}.", file=out)
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m weight_averaging")
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="NadamW vs +EMA vs +LAWA on the embedded workload")
  demo.add_argument("--output_dir", default="demo_output")
  demo.add_argument("--seeds", type=int, default=3)
  demo.add_argument("--no_progress", action="store_true", help="hide the progress bars")
  demo.add_argument("--overwrite", action="store_true",
                    help="replace the runs in an --output_dir that an earlier demo did not "
                         "write (a new or empty one, or an earlier demo's, needs no flag)")
  demo.add_argument("--submissions", nargs="+", default=list(SUBMISSIONS),
                    choices=catalog.NAMES, metavar="NAME",
                    help=f"jit submissions to train, some of {', '.join(catalog.NAMES)}; "
                         "NadamW always runs (the reference of the ratios)")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and jax log at INFO
  try:
    prepare_output_dir(args.output_dir, args.overwrite)
  except ValueError as e:
    print(f"{parser.prog} demo: error: {e}", file=sys.stderr)
    return 2
  run_demo(args.output_dir, args.seeds, progress=not args.no_progress,
           submissions=args.submissions)
  return 0


if __name__ == "__main__":
  sys.exit(main())

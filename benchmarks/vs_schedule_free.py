"""Our self-tuning entries against schedule-free AdamW, the self-tuning board's leader.

One study on the embedded workload through the embedded runner under the self-tuning
ruleset (``tuning_ruleset='self'``: ``hyperparameters=None``, one trial, 1.5x the
runtime budget): this package's six jit submissions
(``submissions/jit/<name>/submission.py``, each at its documented self-tuning point)
and schedule-free AdamW from optax at the working group's point
(``benchmarks/schedule_free/submission.py``), with the same seeds, one study per
seed (``DIR/<submission>/study_<seed>/teacher_student_jax/trial_1/``). The order of
the submissions rotates from seed to seed, so that no submission always runs first
or last on a shared machine.

The runs are scored by `weight_averaging.studies.scoring` (its own backend), so the
table is the scored one: per submission the median over seeds of the steps and of
the submission time to the validation target, each seed's values, and their fraction
of schedule-free AdamW's; then the performance-profile score of the group (time and
steps), computed over the workloads present: here one, where a submission's score
is about ``(4 - r) / 3`` for ``r`` its time over the best one's (0 beyond 4x or on a
miss). Steps are exact; times depend on the machine and its load.

Writes ``DIR/scores.json`` (`scores_file`) and ``DIR/summary.json`` (the table).
``DIR`` must be new or empty, or be given with ``--overwrite``, which deletes the
runs of the submissions compared (and only those) before running.

  .venvs/latest/bin/python benchmarks/vs_schedule_free.py --seeds 3

Needs optax >= 0.2.3 (``.venvs/latest``); see the comparison submission.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Optional, Sequence

from weight_averaging import layout, workloads
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import plots, scores_file, scoring, workload_facts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE_FREE = "schedule_free_adamw"
SCHEDULE_FREE_PATH = os.path.join(REPO, "benchmarks", "schedule_free", "submission.py")
LABELS = dict(plots.LABELS, **{SCHEDULE_FREE: "Schedule-free AdamW"})


def submission_path(name: str) -> str:
  """The submission file of `name`: ours under ``submissions/jit``, or the comparison."""
  if name == SCHEDULE_FREE:
    return SCHEDULE_FREE_PATH
  return os.path.join(REPO, "submissions", "jit", catalog.get(name).name, "submission.py")


def prepare_output_dir(output_dir: str, names: Sequence[str], overwrite: bool) -> None:
  """Refuses a non-empty `output_dir` without `overwrite`; with it, deletes the runs of
  `names` and the files this script writes there."""
  held = sorted(n for n in os.listdir(output_dir)) if os.path.isdir(output_dir) else []
  if held and not overwrite:
    raise ValueError(f"--output_dir {output_dir} is not empty (it holds "
                     f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}): choose a "
                     "new one, or pass --overwrite to replace the runs of the submissions "
                     "compared")
  for name in names:
    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
  for name in ("scores.json", "summary.json"):
    if os.path.exists(os.path.join(output_dir, name)):
      os.remove(os.path.join(output_dir, name))
  os.makedirs(output_dir, exist_ok=True)


def train(output_dir: str, name: str, seed: int, max_global_steps: Optional[int],
          progress: bool) -> str:
  """One self-tuning study of `name` with `seed`; returns its trial's log dir."""
  from weight_averaging import runner  # pylint: disable=g-import-not-at-top
  [result] = runner.run_experiment(
      workload_name=workloads.DEFAULT, submission_path=submission_path(name),
      tuning_ruleset="self", experiment_dir=os.path.join(output_dir, name),
      experiment_name=layout.study_dir_name(seed), rng_seed=seed,
      max_global_steps=max_global_steps, save_checkpoints=False, progress=progress)
  return result.log_dir


def summarize(scores: dict, names: Sequence[str], seeds: Sequence[int]) -> dict:
  """Per submission: the scored medians, each seed's values, the fraction of
  schedule-free AdamW's; and the group's performance-profile scores."""
  workload = workloads.DEFAULT
  spec = scores["workloads"][workload]
  out = {"workload": workload, "target": {"metric": spec["metric"], "value": spec["target"],
                                          "minimize": spec["minimize"],
                                          "strict": spec["strict"]},
         "step_hint": spec["step_hint"], "seeds": list(seeds), "reference": SCHEDULE_FREE,
         "submissions": {}}
  for name in names:
    r = scores["results"][workload][name]
    studies = r["studies"]
    out["submissions"][name] = {
        "median_steps_to_target": r["median_steps_to_target"],
        "median_time_to_target": r["median_time_to_target"],
        "steps_to_target_per_seed": {
            seed: studies[layout.study_dir_name(seed)]["steps_to_target"] for seed in seeds},
        "time_to_target_per_seed": {
            seed: studies[layout.study_dir_name(seed)]["time_to_target"] for seed in seeds},
        "seeds_reached": r["num_studies_hit"],
        "steps_fraction_of_schedule_free": r["fraction_of_baseline_steps"].get(SCHEDULE_FREE),
        "time_fraction_of_schedule_free": r["fraction_of_baseline_time"].get(SCHEDULE_FREE)}
  profile = scores["performance_profile"]
  out["performance_profile"] = {
      "workloads": profile["time"]["workloads"],
      "time": profile["time"]["score"], "steps": profile["steps"]["score"]}
  return out


def _fmt(value, spec: str) -> str:
  """`value` formatted by `spec`; a miss (None) as '—', right-aligned to its width."""
  if value is None:
    width = spec.lstrip(">").split(".")[0].rstrip("dfg")
    return "—".rjust(int(width) if width else 1)
  return format(value, spec)


def print_table(summary: dict, out) -> None:
  """The scored table ('—': missed the target), then the profile scores."""
  target = summary["target"]
  op = workload_facts.comparison(target["minimize"], target["strict"])
  print(f"\n{summary['workload']}, self-tuning ruleset: steps and submission time to "
        f"{target['metric']} {op} {target['value']} (step_hint {summary['step_hint']}), "
        f"median over seeds {summary['seeds']}", file=out)
  print(f"{'submission':<21}{'steps':>7}{'time s':>8}{'steps/SF':>10}{'time/SF':>9}"
        f"{'score t':>9}{'score s':>9}   per seed: steps; time s", file=out)
  profile = summary["performance_profile"]
  for name, s in summary["submissions"].items():
    steps = [_fmt(v, "d") for v in s["steps_to_target_per_seed"].values()]
    times = [_fmt(v, ".1f") for v in s["time_to_target_per_seed"].values()]
    print(f"{LABELS.get(name, name):<21}{_fmt(s['median_steps_to_target'], '>7.0f')}"
          f"{_fmt(s['median_time_to_target'], '>8.1f')}"
          f"{_fmt(s['steps_fraction_of_schedule_free'], '>10.2f')}"
          f"{_fmt(s['time_fraction_of_schedule_free'], '>9.2f')}"
          f"{profile['time'][name]:>9.3f}{profile['steps'][name]:>9.3f}   "
          f"{', '.join(steps)}; {', '.join(times)}", file=out)
  print(f"score t, score s: the group's performance-profile score on submission time "
        f"(the leaderboard's) and on steps, over {', '.join(profile['workloads'])} only: "
        "one workload, not AlgoPerf's eight.", file=out)


def check_arguments(seeds: int, names: Sequence[str],
                    max_global_steps: Optional[int]) -> tuple:
  """The submissions to run (`names`, then schedule-free AdamW); `ValueError` naming a
  bad argument."""
  unknown = [n for n in names if n not in catalog.NAMES]
  if unknown or not names:
    raise ValueError(f"--submissions must be some of {', '.join(catalog.NAMES)}, got "
                     f"{list(names)}")
  if seeds < 1:
    raise ValueError(f"--seeds must be at least 1, got {seeds}")
  if max_global_steps is not None and max_global_steps < 1:
    raise ValueError(f"--max_global_steps must be at least 1, got {max_global_steps} "
                     "(leave it unset for the step hint)")
  return tuple(dict.fromkeys(names)) + (SCHEDULE_FREE,)


def run(output_dir: str, seeds: int, names: Sequence[str] = catalog.NAMES,
        overwrite: bool = False, max_global_steps: Optional[int] = None,
        progress: bool = True, out=None) -> dict:
  """Trains every submission of `names` and schedule-free AdamW for `seeds` seeds, scores
  them, prints the table; returns the summary (also written to ``DIR/summary.json``)."""
  out = out or sys.stdout
  names = check_arguments(seeds, names, max_global_steps)
  prepare_output_dir(output_dir, names, overwrite)
  start = time.time()
  seed_list = list(range(seeds))
  for seed in seed_list:
    turn = seed % len(names)
    for name in names[turn:] + names[:turn]:
      train(output_dir, name, seed, max_global_steps, progress)
  scores = scoring.score_experiment(output_dir, baseline=SCHEDULE_FREE, use_algoperf="no")
  scores_file.write(scores, os.path.join(output_dir, "scores.json"))
  summary = summarize(scores, names, seed_list)
  summary["max_global_steps"] = max_global_steps
  summary["wall_time_s"] = time.time() - start
  print_table(summary, out)
  with open(os.path.join(output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"Runs, scores.json and summary.json in {output_dir}; "
        f"{summary['wall_time_s']:.0f}s in all.", file=out)
  return summary


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", default=os.path.join(REPO, "experiments",
                                                           "vs_schedule_free"))
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
  parser.add_argument("--submissions", nargs="+", default=list(catalog.NAMES),
                      choices=catalog.NAMES, metavar="NAME",
                      help="our submissions to compare (default: all six); "
                           "schedule-free AdamW always runs")
  parser.add_argument("--max_global_steps", type=int, default=None,
                      help="step budget of every run (default: the step hint)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the runs of the submissions compared in --output_dir")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and jax log at INFO
  try:  # bad arguments or an occupied --output_dir: named before anything runs
    prepare_output_dir(args.output_dir, check_arguments(
        args.seeds, args.submissions, args.max_global_steps), args.overwrite)
  except ValueError as e:
    parser.error(str(e))
  # Checked and prepared above: the directory now holds none of the runs.
  run(args.output_dir, args.seeds, args.submissions, overwrite=True,
      max_global_steps=args.max_global_steps, progress=not args.no_progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Command line: ``python -m weight_averaging demo [--output_dir DIR] [--seeds N]
[--submissions nadamw nadamw_ema ...]``.

The main job: NadamW, NadamW+EMA and NadamW+LAWA (the jit-API submissions of this
package, unchanged; ``--submissions`` adds ``shampoo``, ``shampoo_ema`` and
``shampoo_lawa``) train on the embedded workload through the embedded runner, a
few seeds each. It prints the steps and submission time each needs to reach the
workload's validation target, with the ratio to NadamW (the paper's headline
measure) and to the submission's own optimizer without averaging, writes every run in AlgoPerf's experiment layout under ``DIR``
(``DIR/<submission>/study_<seed>/teacher_student_jax/trial_1/``), a
``DIR/summary.json``, and the paper's first two figures as PNG: validation curves
and steps-to-target bars.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from weight_averaging.studies import plots  # matplotlib is imported only to draw

SUBMISSIONS = ("nadamw", "nadamw_ema", "nadamw_lawa")
ALL_SUBMISSIONS = SUBMISSIONS + ("shampoo", "shampoo_ema", "shampoo_lawa")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def _base(name: str) -> str:
  """The submission without averaging: ``shampoo_ema`` -> ``shampoo``."""
  return plots.base_of(name) or name


def run_demo(output_dir: str, seeds: int, overwrite: bool = True,
             progress: bool = True, out=None, submissions=SUBMISSIONS) -> dict:
  """Trains `submissions` for `seeds` seeds each; returns the summary dict."""
  out = out or sys.stdout
  submissions = tuple(submissions)
  unknown = [n for n in submissions if n not in ALL_SUBMISSIONS]
  if unknown or not submissions:
    raise ValueError(f"submissions must be some of {ALL_SUBMISSIONS}, got {submissions}")
  if "nadamw" not in submissions:
    submissions = ("nadamw",) + submissions  # the reference of every ratio
  from weight_averaging import runner, workloads  # pylint: disable=g-import-not-at-top

  workload = workloads.get_workload(workloads.DEFAULT, api="jit")
  runs = {name: {} for name in submissions}
  curves = {name: {} for name in submissions}
  start = time.time()
  for seed in range(seeds):
    for name in submissions:
      [result] = runner.run_experiment(
          workload_name=workload.name,
          submission_path=os.path.join(REPO, "submissions", "jit", name, "submission.py"),
          tuning_search_space=os.path.join(REPO, "tuning_search_spaces", "embedded",
                                           f"{name}.json"),
          experiment_dir=os.path.join(output_dir, name), experiment_name=f"study_{seed}",
          rng_seed=seed, overwrite=overwrite, progress=progress, save_checkpoints=False)
      runs[name][seed] = {"steps_to_target": result.reached_target_step,
                          "submission_time_to_target": result.reached_target_time,
                          "log_dir": result.log_dir}
      curves[name][seed] = [(r["global_step"], r["validation/loss"])
                            for r in result.eval_results]

  def steps_of(name):
    return [runs[name][s]["steps_to_target"] for s in range(seeds)]

  def ratios(name, base):
    if base not in runs:
      return []
    return [a / b if a and b else None for a, b in zip(steps_of(name), steps_of(base))]

  summary = {"workload": workload.name, "target": {
      "metric": "validation/" + workload.target_metric_name,
      "value": workload.validation_target_value}, "step_hint": workload.step_hint,
      "seeds": seeds, "runs": runs, "median": {}}
  print(f"\n{workload.name}: steps and submission time to validation "
        f"{workload.target_metric_name} < {workload.validation_target_value} "
        f"(step_hint {workload.step_hint}), median over {seeds} seeds", file=out)
  print(f"{'submission':<16}{'steps':>8}{'time s':>9}{'/ NadamW':>10}"
        f"{'/ no avg':>10}   per seed", file=out)
  for name in submissions:
    steps = steps_of(name)
    times = [runs[name][s]["submission_time_to_target"] for s in range(seeds)]
    med = {"steps_to_target": _median(steps), "submission_time_to_target": _median(times),
           "ratio_to_nadamw": _median(ratios(name, "nadamw")),
           "ratio_to_base": _median(ratios(name, _base(name))),
           "reached": sum(s is not None for s in steps)}
    summary["median"][name] = med
    fmt = lambda v, f: "—" if v is None else format(v, f)
    print(f"{plots.LABELS[name]:<16}{fmt(med['steps_to_target'], '>8.0f')}"
          f"{fmt(med['submission_time_to_target'], '>9.1f')}"
          f"{fmt(med['ratio_to_nadamw'], '>10.2f')}{fmt(med['ratio_to_base'], '>10.2f')}"
          f"   {['—' if s is None else s for s in steps]}", file=out)
  summary["wall_time_s"] = time.time() - start
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  figures = _plot(output_dir, curves, runs, workload, seeds, submissions)
  print(f"\nRuns, summary.json and figures ({', '.join(figures)}) in {output_dir}; "
        f"{summary['wall_time_s']:.0f}s in all.", file=out)
  return summary


def _plot(output_dir, curves, runs, workload, seeds, submissions):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors = plots.COLORS
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in submissions:
    for seed, curve in curves[name].items():
      steps, values = zip(*curve)
      ax.plot(steps, values, color=colors[name], alpha=0.8, lw=1.2,
              label=plots.LABELS[name] if seed == 0 else None)
  ax.axhline(workload.validation_target_value, color="k", ls=":", lw=1, label="target")
  ax.set(xlabel="step", ylabel="validation loss", title=f"{workload.name}: validation curves",
         ylim=(workload.validation_target_value - 0.05, workload.validation_target_value + 0.25))
  ax.legend()
  fig.tight_layout()
  curves_png = os.path.join(output_dir, "validation_curves.png")
  fig.savefig(curves_png, dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(1.7 * len(submissions), 4))
  for i, name in enumerate(submissions):
    steps = [runs[name][s]["steps_to_target"] for s in range(seeds)]
    reached = [s for s in steps if s is not None]
    if reached:
      ax.bar(i, statistics.median(reached), color=colors[name], alpha=0.8)
      ax.scatter([i] * len(reached), reached, color="k", s=12, zorder=3)
  ax.axhline(workload.step_hint, color="k", ls=":", lw=1, label="step_hint")
  ax.set_xticks(range(len(submissions)), [plots.LABELS[n] for n in submissions])
  ax.set(ylabel="steps to validation target", title="steps to target (median, seeds)")
  ax.legend()
  fig.tight_layout()
  bars_png = os.path.join(output_dir, "steps_to_target.png")
  fig.savefig(bars_png, dpi=120)
  plt.close(fig)
  return [os.path.basename(curves_png), os.path.basename(bars_png)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m weight_averaging")
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="NadamW vs +EMA vs +LAWA on the embedded workload")
  demo.add_argument("--output_dir", default="demo_output")
  demo.add_argument("--seeds", type=int, default=3)
  demo.add_argument("--no_progress", action="store_true", help="hide the progress bars")
  demo.add_argument("--submissions", nargs="+", default=list(SUBMISSIONS),
                    choices=ALL_SUBMISSIONS, metavar="NAME",
                    help=f"jit submissions to train, some of {', '.join(ALL_SUBMISSIONS)}; "
                         "NadamW always runs (the reference of the ratios)")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and jax log at INFO
  run_demo(args.output_dir, args.seeds, progress=not args.no_progress,
           submissions=args.submissions)
  return 0


if __name__ == "__main__":
  sys.exit(main())

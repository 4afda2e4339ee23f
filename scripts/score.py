"""Scores AlgoPerf experiment logs: steps and time to target, fraction of a baseline, GPU-hours,
best validation metrics and the performance-profile score; prints tables, writes JSON and CSV.

  python scripts/score.py --experiment_dir=DIR [--output_json=FILE] [--output_csv=FILE] \
      [--baseline=nadamw] [--use_algoperf=auto|yes|no] [--num_devices=1]

DIR holds ``<submission>/<study>/<workload>_<framework>/trial_<n>/eval_measurements.csv``. The
definitions are in ``weight_averaging/studies/scoring.py``, the JSON structure in
``weight_averaging/studies/scores_file.py``. Trials that are not scored (no eval file, a
damaged one, or a run that did not finish) are listed on stderr and in the scores file.

Table 2 (best validation metric per workload and submission, and per variant where the
trials' ``hparams.json`` vary a setting within a study: mean +- std over studies; see
``weight_averaging/studies/sweeps.py``) is printed as markdown and written as CSV next to the
scores CSV, ``<scores CSV stem>_table2.csv``.
"""

import os
import sys

from absl import app, flags

try:
  import weight_averaging  # pylint: disable=unused-import
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from weight_averaging.studies import scores_file, scoring, sweeps, workload_facts

flags.DEFINE_string("experiment_dir", None, "Directory of <submission>/<study>/... logs.")
flags.DEFINE_string("output_json", None, "Scores JSON (default: DIR/scores.json).")
flags.DEFINE_string("output_csv", None, "Scores CSV (default: DIR/scores.csv).")
flags.DEFINE_string("baseline", None, "Submission whose steps the others are divided by: one "
                    f"of those in DIR (default: {scoring.DEFAULT_BASELINE}, where present).")
flags.DEFINE_enum("use_algoperf", "auto", ["auto", "yes", "no"],
                  "Use AlgoPerf's own scoring code: where it imports, always, or never.")
flags.DEFINE_integer("num_devices", 1, "Accelerators per run, for the GPU-hours.",
                     lower_bound=1)
flags.mark_flag_as_required("experiment_dir")
FLAGS = flags.FLAGS


def fmt(value, spec="{:.4g}") -> str:
  """A number for a table; '-' for None (a miss or undefined)."""
  return "-" if value is None else spec.format(value)


def table(header, rows) -> str:
  """Left-aligned first column, right-aligned others."""
  cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def target_tables(scores) -> str:
  out = []
  for w, by_sub in scores["results"].items():
    spec = scores["workloads"][w]
    sign = workload_facts.comparison(spec["minimize"], spec.get("strict", True))
    bases = sorted({b for r in by_sub.values() for b in r["fraction_of_baseline_steps"]})
    header = (["submission", "studies hit", "steps to target", "time to target (s)"]
              + [f"steps / {b}" for b in bases] + ["steps per study"])
    rows = [[s, f"{r['num_studies_hit']}/{r['num_studies']}", fmt(r["median_steps_to_target"],
                                                                  "{:.0f}"),
             fmt(r["median_time_to_target"], "{:.1f}")]
            + [fmt(r["fraction_of_baseline_steps"].get(b), "{:.3f}") for b in bases]
            + [", ".join("inf" if v is None else str(v) for v in r["steps_to_target_per_study"])]
            for s, r in by_sub.items()]
    out.append(f"{w}: steps and submission time to {spec['metric']} {sign} {spec['target']:g} "
               f"(median over studies of the fastest trial; '-' = missed)\n" + table(header, rows))
  means = [[s, b, fmt(m["mean"], "{:.3f}"), ", ".join(m["workloads"])]
           for s, per in scores["mean_fraction_of_baseline_steps"].items() for b, m in per.items()]
  if means:
    out.append("Mean fraction of the baseline's steps over the workloads both reach\n"
               + table(["submission", "baseline", "mean steps / baseline", "workloads"], means))
  return "\n\n".join(out)


def gpu_table(scores) -> str:
  rows = [[s, f"{g['total']:.4g}", ", ".join(f"{w}: {p['seconds']:.4g}s ({p['source']})"
                                              for w, p in g["per_workload"].items())]
          for s, g in scores["gpu_hours"].items()]
  return (f"GPU-hours of one run of the suite ({scores['num_devices']} device(s) per run; time to "
          "target, or the budget for a miss)\n" + table(["submission", "GPU-hours", "per workload"],
                                                       rows))


def table2_path(csv_path: str) -> str:
  """Where Table 2's CSV goes: next to the scores CSV, ``<its stem>_table2.csv``."""
  return os.path.splitext(csv_path)[0] + "_table2.csv"


def best_table(rows) -> str:
  """Table 2 (`sweeps.table2` rows) as markdown, with its heading."""
  return ("Best validation metric, Table 2 (mean +- std over studies of each study's best "
          "eval; '-' = no value)\n" + sweeps.table2_markdown(rows))


def profile_table(scores) -> str:
  out = []
  for basis, p in scores["performance_profile"].items():
    note = ("all 8 AlgoPerf base workloads" if p["suite_complete"] else
            f"INCOMPLETE suite: scored over {len(p['workloads'])} workload(s) present "
            f"({', '.join(p['workloads'])}); AlgoPerf's score is over its 8 base workloads")
    rows = [[s, f"{v:.4f}"] for s, v in p["score"].items()]
    out.append(f"Performance-profile score on {basis} to target ({p['backend']}; {note})\n"
               + table(["submission", "score"], rows))
  return "\n\n".join(out)


def main(argv):
  del argv
  try:
    scores = scoring.score_experiment(FLAGS.experiment_dir, baseline=FLAGS.baseline,
                                      use_algoperf=FLAGS.use_algoperf,
                                      num_devices=FLAGS.num_devices)
    table2 = sweeps.table2(sweeps.read_sweep(FLAGS.experiment_dir))
  except ValueError as e:
    sys.exit(f"score.py: error: {e}")
  print(f"Scored {FLAGS.experiment_dir} with {scores['backend']} scoring; baseline "
        f"{scores['baseline']!r}")
  for d in scores["algoperf_disagreements"]:
    print(f"warning: ours and algoperf's differ on {d}", file=sys.stderr)
  for s in scores["skipped_trials"]:
    print(f"warning: not scored, trial {s['trial']}: {s['reason']}", file=sys.stderr)
  for u in scores["unfinished_trials"]:
    print(f"warning: not scored, unfinished trial {u['trial']}: {u['reason']}",
          file=sys.stderr)
  print("\n\n".join(["", target_tables(scores), gpu_table(scores), best_table(table2),
                     profile_table(scores), ""]))
  json_path = FLAGS.output_json or os.path.join(FLAGS.experiment_dir, "scores.json")
  csv_path = FLAGS.output_csv or os.path.join(FLAGS.experiment_dir, "scores.csv")
  scores_file.write(scores, json_path)
  scores_file.write_csv(scores, csv_path)
  sweeps.write_table2_csv(table2, table2_path(csv_path))
  print(f"Wrote {json_path}, {csv_path} and {table2_path(csv_path)}")


if __name__ == "__main__":
  app.run(main)

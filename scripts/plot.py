"""Draws the paper's figures from scored studies and offline-averaging grids, as PNG and PDF.

  python scripts/plot.py --scores=DIR/scores.json [--offline=a.json,b.json] \
      [--experiment_dir=DIR] --output_dir=FIGS

``--scores`` is what ``scripts/score.py`` writes; ``--offline`` what
``scripts/offline_average.py`` writes. The figures and their definitions are in
``weight_averaging/studies/plots.py``; the Section 6 figures (steps to target and best score
against the top learning rate, shorter schedules, decay x averaging) in
``weight_averaging/studies/why_plots.py``, drawn from the trials and their ``hparams.json``
under ``--experiment_dir`` (by default the scored experiment, where it still is). A figure
the results cannot support (no Shampoo runs, no offline grid, no curve, no hit, no learning
rate or schedule that varies) is skipped and the reason printed. A file that cannot be read
is an error naming it and what is missing.
"""

import json
import os
import sys

from absl import app, flags

try:
  from weight_averaging.studies import plots, scores_file, sweeps, why_plots
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from weight_averaging.studies import plots, scores_file, sweeps, why_plots

flags.DEFINE_string("scores", None, "Scores JSON written by scripts/score.py.")
flags.DEFINE_list("offline", [], "Offline-averaging results JSON files.")
flags.DEFINE_string("experiment_dir", None, "Experiment whose trials' hparams.json the "
                    "Section 6 figures read (default: the one --scores was scored from).")
flags.DEFINE_string("output_dir", None, "Directory for the figures.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


GRID_POINT_KEYS = ("scheme", "every", "k", "beta", "window", "steps_to_target")


def _load_offline(path):
  """An offline results file; `ValueError` naming `path` and what is missing."""
  try:
    with open(path) as f:
      result = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"offline results not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"offline results {path} are not valid JSON ({e}): a damaged or "
                     "cut-short file; write it again with scripts/offline_average.py") from None
  if not isinstance(result, dict) or not isinstance(result.get("grid"), list):
    raise ValueError(f"{path} is not an offline-averaging results file (no 'grid' list)")
  for i, point in enumerate(result["grid"]):
    missing = [k for k in GRID_POINT_KEYS if not isinstance(point, dict) or k not in point]
    if missing:
      raise ValueError(f"{path}: grid point {i} lacks {missing}: a damaged offline results "
                       "file; write it again with scripts/offline_average.py")
  return result


def _sweep(scores):
  """``(sweep or None, why there is none)``: the trials under --experiment_dir (unreadable:
  `ValueError`), else under the scored experiment where it can still be read."""
  if FLAGS.experiment_dir:
    return sweeps.read_sweep(FLAGS.experiment_dir), None
  scored = (scores or {}).get("experiment_dir")
  if not scored:
    return None, "no experiment to read trials from: give --experiment_dir or --scores"
  if not os.path.isdir(scored):
    return None, f"the scored experiment {scored} is not on this machine: give --experiment_dir"
  try:
    return sweeps.read_sweep(scored), None
  except ValueError as e:
    return None, f"the scored experiment cannot be read: {e}"


def main(argv):
  del argv
  if not FLAGS.scores and not FLAGS.offline and not FLAGS.experiment_dir:
    raise app.UsageError("give --scores, --offline and/or --experiment_dir")
  try:
    scores = scores_file.load(FLAGS.scores) if FLAGS.scores else None
    offline = [_load_offline(p) for p in FLAGS.offline]
    sweep, why_not = _sweep(scores)
  except FileNotFoundError as e:
    sys.exit(f"plot.py: error: no such file: {e.filename}")
  except ValueError as e:
    sys.exit(f"plot.py: error: {e}")
  skipped = {}
  figures = plots.all_figures(scores, offline, FLAGS.output_dir, skipped) if (
      scores is not None or offline) else {}
  try:
    figures.update(why_plots.all_figures(sweep, FLAGS.output_dir, skipped, why_not))
  except ValueError as e:
    sys.exit(f"plot.py: error: {e}")
  for name, paths in figures.items():
    if paths:
      print(f"{name}: {', '.join(paths)}")
    else:
      print(f"{name}: skipped, not drawn: {skipped[name]}")


if __name__ == "__main__":
  app.run(main)

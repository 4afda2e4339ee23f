"""Draws the paper's figures from scored studies and offline-averaging grids, as PNG and PDF.

  python scripts/plot.py --scores=DIR/scores.json [--offline=a.json,b.json] --output_dir=FIGS

``--scores`` is what ``scripts/score.py`` writes; ``--offline`` what
``scripts/offline_average.py`` writes. The figures and their definitions are in
``weight_averaging/studies/plots.py``; a figure the results cannot support (no Shampoo runs,
no offline grid) is skipped and said so.
"""

import json
import os
import sys

from absl import app, flags

try:
  from weight_averaging.studies import plots, scoring
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from weight_averaging.studies import plots, scoring

flags.DEFINE_string("scores", None, "Scores JSON written by scripts/score.py.")
flags.DEFINE_list("offline", [], "Offline-averaging results JSON files.")
flags.DEFINE_string("output_dir", None, "Directory for the figures.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def _load_offline(path):
  try:
    with open(path) as f:
      result = json.load(f)
  except FileNotFoundError as e:
    raise app.UsageError(f"offline results not found: {path}") from e
  except json.JSONDecodeError as e:
    raise app.UsageError(f"offline results {path} are not valid JSON: {e}") from e
  if not isinstance(result, dict) or "grid" not in result:
    raise app.UsageError(f"{path} is not an offline-averaging results file (no 'grid')")
  return result


def main(argv):
  del argv
  if not FLAGS.scores and not FLAGS.offline:
    raise app.UsageError("give --scores and/or --offline")
  scores = None
  if FLAGS.scores:
    try:
      scores = scoring.load_scores(FLAGS.scores)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(str(e)) from e
  offline = [_load_offline(p) for p in FLAGS.offline]
  figures = plots.all_figures(scores, offline, FLAGS.output_dir)
  for name, paths in figures.items():
    if paths:
      print(f"{name}: {', '.join(paths)}")
    else:
      print(f"{name}: skipped (nothing to draw from these results)")


if __name__ == "__main__":
  app.run(main)

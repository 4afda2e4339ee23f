"""Draws the paper's figures from scored studies and offline-averaging grids, as PNG and PDF.

  python scripts/plot.py --scores=DIR/scores.json [--offline=a.json,b.json] --output_dir=FIGS

``--scores`` is what ``scripts/score.py`` writes; ``--offline`` what
``scripts/offline_average.py`` writes. The figures and their definitions are in
``weight_averaging/studies/plots.py``; a figure the results cannot support (no Shampoo runs,
no offline grid, no curve, no hit) is skipped and the reason printed. A file that cannot be
read is an error naming it and what is missing.
"""

import json
import os
import sys

from absl import app, flags

try:
  from weight_averaging.studies import plots, scores_file
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from weight_averaging.studies import plots, scores_file

flags.DEFINE_string("scores", None, "Scores JSON written by scripts/score.py.")
flags.DEFINE_list("offline", [], "Offline-averaging results JSON files.")
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


def main(argv):
  del argv
  if not FLAGS.scores and not FLAGS.offline:
    raise app.UsageError("give --scores and/or --offline")
  try:
    scores = scores_file.load(FLAGS.scores) if FLAGS.scores else None
    offline = [_load_offline(p) for p in FLAGS.offline]
  except FileNotFoundError as e:
    sys.exit(f"plot.py: error: no such file: {e.filename}")
  except ValueError as e:
    sys.exit(f"plot.py: error: {e}")
  skipped = {}
  figures = plots.all_figures(scores, offline, FLAGS.output_dir, skipped)
  for name, paths in figures.items():
    if paths:
      print(f"{name}: {', '.join(paths)}")
    else:
      print(f"{name}: skipped, not drawn: {skipped[name]}")


if __name__ == "__main__":
  app.run(main)

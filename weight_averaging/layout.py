"""AlgoPerf's experiment layout and its eval log, stated once.

The official runner (and the embedded one) writes one directory per trial::

  <experiment_dir>/<experiment_name>/<workload>_<framework>/trial_<n>/
      hparams.json            the trial's hyperparameters
      meta_data_0.json        what ran (workload, api, seed, versions, devices)
      flags_0.json            the runner's flags
      eval_measurements.csv   one row per eval: `CSV_COLUMNS`, then the metrics
                              (``train/<m>``, ``validation/<m>``, ``test/<m>``)

A study grid (the paper's design, AlgoPerf's scoring layout) puts one experiment
per submission and study: ``<dir>/<submission>/study_<i>/<workload>_jax/trial_<n>/``.

Everything that names these files, directories or columns uses this module.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Dict, List, Optional, Sequence

FRAMEWORK = "jax"
EVAL_FILE = "eval_measurements.csv"
HPARAMS_FILE = "hparams.json"
META_FILE = "meta_data_0.json"
FLAGS_FILE = "flags_0.json"
# The official runner's own per-step log (its last row marks the end of a run).
MEASUREMENTS_FILE = "measurements.csv"

STEP_COLUMN = "global_step"
TIME_COLUMN = "accumulated_submission_time"
# The bookkeeping columns of every eval row, in the official runner's order; the
# metric columns follow, sorted.
CSV_COLUMNS = ("accumulated_eval_time", "accumulated_logging_time", TIME_COLUMN,
               STEP_COLUMN, "preemption_count", "score", "total_duration")

WORKLOAD_DIR = re.compile(r"^(?P<workload>.+)_(?P<framework>jax|pytorch)$")
TRIAL_DIR = re.compile(r"^trial_(?P<n>\d+)$")
STUDY_DIR = re.compile(r"^study_(?P<i>\d+)$")


def workload_dir_name(workload: str, framework: str = FRAMEWORK) -> str:
  """``<workload>_jax``."""
  return f"{workload}_{framework}"


def trial_dir_name(trial: int) -> str:
  """``trial_<n>``, numbered from 1."""
  return f"trial_{trial}"


def study_dir_name(study: int) -> str:
  """``study_<i>``, numbered from 0."""
  return f"study_{study}"


def experiment_log_dir(experiment_dir: str, experiment_name: str, workload: str) -> str:
  """``<experiment_dir>/<experiment_name>/<workload>_jax``: a runner's log root."""
  return os.path.join(os.path.abspath(experiment_dir), experiment_name,
                      workload_dir_name(workload))


def trial_dir(log_root: str, trial: int) -> str:
  """``<log_root>/trial_<n>``."""
  return os.path.join(log_root, trial_dir_name(trial))


def study_trial_dir(experiment_dir: str, submission: str, study: int, workload: str,
                    trial: int) -> str:
  """``<dir>/<submission>/study_<i>/<workload>_jax/trial_<n>``: a study grid's trial."""
  return trial_dir(experiment_log_dir(os.path.join(experiment_dir, submission),
                                      study_dir_name(study), workload), trial)


def eval_file(trial_directory: str) -> str:
  """The trial's ``eval_measurements.csv``."""
  return os.path.join(trial_directory, EVAL_FILE)


def write_eval_measurements(path: str, rows: Sequence[Dict[str, Any]]) -> None:
  """Writes every eval row so far, atomically: `CSV_COLUMNS`, then the sorted metrics."""
  metrics = sorted({k for r in rows for k in r if k not in CSV_COLUMNS})
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS) + metrics)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def read_rows(path: str) -> Optional[List[Dict[str, str]]]:
  """The rows of a CSV log as dicts of strings, or None when it is missing or unreadable."""
  try:
    with open(path, newline="") as f:
      return list(csv.DictReader(f))
  except (OSError, csv.Error):
    return None

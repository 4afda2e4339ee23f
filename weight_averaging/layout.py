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

`read_experiment` walks such a grid into `Trial` records (one metric column each), as
scoring reads it. Everything that names these files, directories or columns uses this module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

FRAMEWORK = "jax"
EVAL_FILE = "eval_measurements.csv"
HPARAMS_FILE = "hparams.json"
META_FILE = "meta_data_0.json"
FLAGS_FILE = "flags_0.json"
# The official runner writes flags_<preemption count>.json on each start.
FLAGS_FILE_NAME = re.compile(r"^flags_(?P<n>\d+)\.json$")
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


# ----------------------------------------------------------------------------
# Reading a study grid back: the trial and experiment records.


class DamagedFile(ValueError):
  """A log file that cannot be what a runner wrote (cut short, rows of the wrong length):
  ``str`` is ``"<path>: <problem>"``."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path, self.problem = path, problem


class Trial(NamedTuple):
  """One trial's evals: parallel arrays sorted by step (`metric` is one column); `directory`
  is the trial's directory."""
  name: str
  global_step: np.ndarray
  time: np.ndarray   # accumulated_submission_time
  metric: np.ndarray
  directory: str = ""


class Skipped(NamedTuple):
  """A trial dir that was not read, and why."""
  trial: str
  reason: str


class Experiment(NamedTuple):
  """`trials[workload][submission][study]` is a list of `Trial`, sorted by trial number;
  `skipped` the trial dirs that could not be read: without an eval file (a run not started
  or killed early) or with a damaged one."""
  path: str
  trials: Dict[str, Dict[str, Dict[str, List[Trial]]]]
  skipped: List[Skipped]


def natural_key(name: str):
  """Sorts ``study_2`` before ``study_10``."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def subdirs(path: str) -> List[str]:
  """The directories in `path`, in natural order."""
  return sorted((d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))),
                key=natural_key)


def _as_float(text: str) -> float:
  return float(text) if text.strip() else float("nan")


def _check_complete(path: str, text: str, rows: List[Dict[str, Any]]) -> None:
  """`DamagedFile` for a file cut short: a last line without its newline, or a row with
  fewer or more fields than the header (DictReader fills the first with None and puts the
  second under the key None)."""
  if text and not text.endswith(("\n", "\r")):
    raise DamagedFile(path, "its last line is cut short (no line end): a damaged file, e.g. "
                            "an interrupted copy or a full disk")
  for i, row in enumerate(rows, start=2):
    if None in row or None in row.values():
      raise DamagedFile(path, f"line {i} has {'more' if None in row else 'fewer'} fields "
                              "than the header: a damaged file")


def read_trial(path: str, metric: str, name: str = "") -> Trial:
  """The evals of one `EVAL_FILE`: global step, submission time and the column `metric`,
  sorted by step (stable: rows of one step keep their order).

  A file cut short is a `DamagedFile`; a missing column or an unreadable value a `ValueError`;
  both name the file.
  """
  with open(path, newline="") as f:
    text = f.read()
  reader = csv.DictReader(io.StringIO(text, newline=""))
  columns = reader.fieldnames or []
  if not columns:
    raise DamagedFile(path, "empty, not even a header: a damaged file")
  rows = list(reader)
  _check_complete(path, text, rows)
  missing = [c for c in (STEP_COLUMN, TIME_COLUMN, metric) if c not in columns]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing} (has {columns})")
  try:
    steps = np.array([int(float(r[STEP_COLUMN])) for r in rows], dtype=np.int64)
    times = np.array([_as_float(r[TIME_COLUMN]) for r in rows], dtype=np.float64)
    values = np.array([_as_float(r[metric]) for r in rows], dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: unreadable value ({e})") from e
  # Rows out of step order (logs concatenated by hand) would move the first hit.
  order = np.argsort(steps, kind="stable")
  directory = os.path.dirname(path)
  return Trial(name or os.path.basename(directory), steps[order], times[order], values[order],
               directory)


def read_hparams(trial_directory: str) -> Optional[Dict[str, Any]]:
  """The trial's ``hparams.json`` as a dict; None when absent or ``null`` (self-tuning);
  `DamagedFile` when it is not JSON or not an object."""
  path = os.path.join(trial_directory, HPARAMS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      hparams = json.load(f)
  except ValueError as e:
    raise DamagedFile(path, f"not valid JSON ({e}): a damaged hyperparameters file; run "
                      "the trial again") from None
  if hparams is not None and not isinstance(hparams, dict):
    raise DamagedFile(path, f"not a JSON object of hyperparameters (a "
                      f"{type(hparams).__name__}): a damaged hyperparameters file")
  return hparams


def run_flags(trial_directory: str) -> Optional[Dict[str, Any]]:
  """The runner flags of the trial's latest attempt (``flags_<n>.json`` with the largest n:
  the official runner writes one per preemption, the embedded one rewrites ``flags_0.json``);
  None when there is none; `DamagedFile` when it is not a JSON object."""
  found = [(int(m["n"]), f) for f in os.listdir(trial_directory)
           for m in [FLAGS_FILE_NAME.match(f)] if m]
  if not found:
    return None
  path = os.path.join(trial_directory, max(found)[1])
  try:
    with open(path) as f:
      flags = json.load(f)
  except ValueError as e:
    raise DamagedFile(path, f"not valid JSON ({e}): a damaged file") from None
  if not isinstance(flags, dict):
    raise DamagedFile(path, "not a JSON object of flags: a damaged file")
  return flags


def _workload_dirs(study_path: str) -> Dict[str, str]:
  """``{workload: its <workload>_<framework> dir}`` of one study; a workload twice is an error."""
  found: Dict[str, str] = {}
  for wdir in subdirs(study_path):
    match = WORKLOAD_DIR.match(wdir)
    if not match:
      continue
    if match["workload"] in found:
      raise ValueError(f"{study_path}: workload {match['workload']!r} appears twice "
                       f"({found[match['workload']]} and {wdir})")
    found[match["workload"]] = wdir
  return found


def read_experiment(path: str, metric_of: Callable[[str], str]) -> Experiment:
  """Every trial of the grid under `path`, reading column ``metric_of(workload)`` of each.

  Walks ``<submission>/<study>/<workload>_<framework>/trial_<n>/`` in natural order; anything
  else in `path` is ignored. A trial without an eval file or with a damaged one
  (`DamagedFile`) is listed in ``skipped`` with the reason, and the others are read. Raises
  `ValueError` when `path` is not a directory or holds no readable trial at all.
  """
  if not os.path.isdir(path):
    raise ValueError(f"experiment directory {path!r} does not exist or is not a directory")
  trials: Dict[str, Dict[str, Dict[str, List[Trial]]]] = {}
  skipped: List[Skipped] = []
  for submission in subdirs(path):
    for study in subdirs(os.path.join(path, submission)):
      study_path = os.path.join(path, submission, study)
      for workload, wdir in _workload_dirs(study_path).items():
        for trial in (t for t in subdirs(os.path.join(study_path, wdir)) if TRIAL_DIR.match(t)):
          csv_path = eval_file(os.path.join(study_path, wdir, trial))
          if not os.path.isfile(csv_path):
            skipped.append(Skipped(os.path.dirname(csv_path), f"no {EVAL_FILE}"))
            continue
          try:
            record = read_trial(csv_path, metric_of(workload), trial)
          except DamagedFile as e:
            skipped.append(Skipped(os.path.dirname(csv_path),
                                   f"{os.path.basename(e.path)}: {e.problem}"))
            continue
          trials.setdefault(workload, {}).setdefault(submission, {}).setdefault(
              study, []).append(record)
  if not trials:
    raise ValueError(f"no readable trials under {path!r}: expected "
                     f"<submission>/<study>/<workload>_<jax|pytorch>/trial_<n>/{EVAL_FILE}"
                     + "".join(f"\n  skipped {s.trial}: {s.reason}" for s in skipped[:10]))
  return Experiment(path, trials, skipped)

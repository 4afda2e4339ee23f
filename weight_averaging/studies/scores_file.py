"""The scores file: what `scoring.score_experiment` returns, written as JSON and CSV.

The structure (JSON; ``inf`` and misses as ``null``)::

  {
    "format": "weight_averaging.scores/2",
    "experiment_dir": str, "baseline": str, "num_devices": int,
    "backend": "ours" | "algoperf",          # who computed steps/times to target
    "algoperf_disagreements": [{"workload", "submission", "quantity", "ours", "algoperf"}],
    # trial dirs not scored: without eval_measurements.csv, or with a damaged one
    "skipped_trials": [{"trial": str, "reason": str}],
    # trials that did not finish (killed or still running), left out of every number
    "unfinished_trials": [{"trial": str, "reason": str}],
    "submissions": [str], "workload_names": [str],
    "workloads": {w: {"metric": "validation/<name>", "target": float, "minimize": bool,
                      "strict": bool, "max_allowed_runtime_sec": float | null,
                      "step_hint": int | null, "source": str}},
    "results": {w: {s: {
        "studies": {study_dir: {
            "steps_to_target": int | null, "time_to_target": float | null,
            "fastest_trial": "trial_<n>" | null,
            "best_metric": float | null, "best_metric_trial": str | null,
            "best_metric_step": int | null,
            # validation curve of the fastest trial (of the best-metric trial on a miss):
            "curve": {"trial": str, "global_step": [int], "metric": [float],
                      "accumulated_submission_time": [float]},
            "trials": {trial: {"steps_to_target": int | null, "time_to_target": float | null,
                               "best_metric": float | null, "num_evals": int}}}},
        "num_studies": int, "num_studies_hit": int,
        "steps_to_target_per_study": [int | null], "time_to_target_per_study": [float | null],
        "median_steps_to_target": float | null, "median_time_to_target": float | null,
        "fraction_of_baseline_steps": {baseline: float | null},
        "fraction_of_baseline_time": {baseline: float | null},
        "best_metric": {"mean": float | null, "std": float | null, "median": float | null,
                        "per_study": [float | null]}}}},
    "mean_fraction_of_baseline_steps": {s: {baseline: {"mean": float | null,
                                                        "workloads": [w]}}},
    "gpu_hours": {s: {"total": float, "per_workload": {w: {"seconds": float,
                                                            "source": "time_to_target" |
                                                            "budget" | "longest_run"}}}},
    "performance_profile": {"time" | "steps": {
        "backend": "ours" | "algoperf", "workloads": [w], "suite_complete": bool,
        "missing_base_workloads": [w], "taus": [float], "rho": {s: [float]},
        "score": {s: float}}}
  }

The CSV (`write_csv`): one row per (workload, submission) with the columns `CSV_FIELDS`;
misses are empty cells (``inf`` inside the per-study lists).
"""

from __future__ import annotations

import csv
import json
from typing import Any, Dict, List, Mapping

FORMAT = "weight_averaging.scores/2"
# What `load` checks is there: the keys the tables and figures read.
REQUIRED = ("baseline", "num_devices", "submissions", "workloads", "results", "gpu_hours",
            "performance_profile", "skipped_trials", "unfinished_trials")
WORKLOAD_KEYS = ("metric", "target", "minimize", "step_hint")
RESULT_KEYS = ("studies", "num_studies", "num_studies_hit", "median_steps_to_target",
               "median_time_to_target", "steps_to_target_per_study",
               "fraction_of_baseline_steps", "best_metric")
REMEDY = "write it again with scripts/score.py --experiment_dir=..."


def write(scores: Mapping[str, Any], path: str) -> None:
  """Writes `scores` (from `scoring.score_experiment`) as JSON."""
  with open(path, "w") as f:
    json.dump(scores, f, indent=1, allow_nan=False)


def _missing(scores: Mapping[str, Any]) -> List[str]:
  """The keys of the structure above that `scores` lacks, as paths ('results/ogbg/nadamw')."""
  missing = [k for k in REQUIRED if k not in scores]
  not_objects = [f"{k} (an object)" for k in ("results", "workloads")
                 if k in scores and not isinstance(scores[k], dict)]
  if not_objects or "results" in missing or "workloads" in missing:
    return missing + not_objects
  for w, by_sub in scores["results"].items():
    spec = scores["workloads"].get(w)
    if not isinstance(spec, dict):
      missing.append(f"workloads/{w}")
    else:
      missing += [f"workloads/{w}/{k}" for k in WORKLOAD_KEYS if k not in spec]
    for s, r in (by_sub.items() if isinstance(by_sub, dict) else ()):
      keys = r if isinstance(r, dict) else {}
      missing += [f"results/{w}/{s}/{k}" for k in RESULT_KEYS if k not in keys]
  return missing


def load(path: str) -> Dict[str, Any]:
  """Reads back a scores JSON written by `write` (scripts/score.py).

  `FileNotFoundError` for a missing file; `ValueError` naming `path` for one that is not valid
  JSON, of another format, or without the keys the tables and figures read.
  """
  with open(path) as f:
    try:
      scores = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e}): a damaged or cut-short scores file; "
                       f"{REMEDY}") from None
  if not isinstance(scores, dict) or scores.get("format") != FORMAT:
    found = scores.get("format") if isinstance(scores, dict) else type(scores).__name__
    raise ValueError(f"{path}: not a scores file of format {FORMAT!r} (found {found!r}); "
                     f"{REMEDY}")
  missing = _missing(scores)
  if missing:
    raise ValueError(f"{path}: a damaged scores file, missing {', '.join(missing[:8])}"
                     f"{' ...' if len(missing) > 8 else ''}; {REMEDY}")
  return scores


CSV_FIELDS = ("workload", "submission", "metric", "target", "minimize", "num_studies",
              "num_studies_hit", "median_steps_to_target", "median_time_to_target",
              "steps_to_target_per_study", "time_to_target_per_study", "fraction_of_baseline_steps",
              "fraction_of_baseline_time", "best_metric_mean", "best_metric_std",
              "best_metric_median", "gpu_seconds", "gpu_seconds_source")


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, dict):
    return ";".join(f"{k}={_cell(v)}" for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return ";".join("inf" if v is None else _cell(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)


def csv_rows(scores: Mapping[str, Any]) -> List[Dict[str, str]]:
  """One row per (workload, submission); misses are empty cells (``inf`` inside lists)."""
  rows = []
  for w, by_sub in scores["results"].items():
    spec = scores["workloads"][w]
    for s, r in by_sub.items():
      gpu = scores["gpu_hours"][s]["per_workload"][w]
      rows.append({k: _cell(v) for k, v in {
          "workload": w, "submission": s, "metric": spec["metric"], "target": spec["target"],
          "minimize": spec["minimize"], "num_studies": r["num_studies"],
          "num_studies_hit": r["num_studies_hit"],
          "median_steps_to_target": r["median_steps_to_target"],
          "median_time_to_target": r["median_time_to_target"],
          "steps_to_target_per_study": r["steps_to_target_per_study"],
          "time_to_target_per_study": r["time_to_target_per_study"],
          "fraction_of_baseline_steps": r["fraction_of_baseline_steps"],
          "fraction_of_baseline_time": r["fraction_of_baseline_time"],
          "best_metric_mean": r["best_metric"]["mean"], "best_metric_std": r["best_metric"]["std"],
          "best_metric_median": r["best_metric"]["median"], "gpu_seconds": gpu["seconds"],
          "gpu_seconds_source": gpu["source"]}.items()})
  return rows


def write_csv(scores: Mapping[str, Any], path: str) -> None:
  """Writes `csv_rows(scores)` with the header `CSV_FIELDS`."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
    writer.writeheader()
    writer.writerows(csv_rows(scores))

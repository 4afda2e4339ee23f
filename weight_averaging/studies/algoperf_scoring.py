"""AlgoPerf's own scoring code as a backend of `scoring`, and where the two disagree.

``scoring.score_experiment(use_algoperf="auto")`` (the default) uses AlgoPerf's
``scoring.performance_profile`` of an installed algoperf checkout (it needs pandas) where it
imports, our implementation otherwise; ``"yes"`` requires it, ``"no"`` never uses it. With
algoperf, the per-workload steps and times come from its ``get_workloads_time_to_target`` and,
when all 8 base workloads are present, the profile and score from its
``compute_performance_profiles`` and ``compute_leaderboard_score``; ours is computed as well
and every difference is listed under ``algoperf_disagreements``. The two can differ in two
cases:

* **The trial of a study.** AlgoPerf's code picks the trial that meets the target at the
  *earliest eval index* (the first such trial on a tie) and takes its time, the rules the trial
  with the *smallest time*; they differ only when those are different trials (same eval index
  with different times, or eval schedules that differ between trials).
* **An exact tie with the target.** Scoring counts a target met by the workload's own rule,
  strictly for AlgoPerf's base workloads (``metric < target``); AlgoPerf's scoring code compares
  inclusively (``<=``, ``>=``), so an eval that equals the target is a hit for it only.

Its target lookup (a registry it imports by a relative path) is replaced, for the duration of
a call, by the specs scoring uses, so both score against the same targets.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from typing import Any, Dict, List, Mapping

import numpy as np

from weight_averaging import layout
from weight_averaging.studies import workload_facts


def load():
  """AlgoPerf's `scoring.performance_profile` module, or None where it does not import."""
  try:
    with warnings.catch_warnings():   # its own DeprecationWarnings (escapes, np.trapz)
      warnings.simplefilter("ignore", DeprecationWarning)
      from scoring import performance_profile as pp   # pylint: disable=import-outside-toplevel
  except Exception:   # pylint: disable=broad-except  (missing algoperf, pandas, matplotlib...)
    return None
  return pp


@contextlib.contextmanager
def _targets(pp, specs):
  """Makes AlgoPerf's target lookup use `specs` (scoring's `WorkloadSpec` by workload)."""
  from absl import logging   # pylint: disable=import-outside-toplevel
  utils = pp.scoring_utils
  original, verbosity = utils.get_workload_metrics_and_targets, logging.get_verbosity()

  def lookup(workload, split="validation"):
    spec = specs[layout.WORKLOAD_DIR.match(workload)["workload"]]
    return spec.metric, spec.target

  utils.get_workload_metrics_and_targets = lookup
  logging.set_verbosity(logging.ERROR)   # its count-of-studies/trials warnings
  try:
    yield
  finally:
    utils.get_workload_metrics_and_targets = original
    logging.set_verbosity(verbosity)


def _frames(experiment: layout.Experiment, specs):
  """One pandas DataFrame per submission, a row per trial, as AlgoPerf's scoring reads logs."""
  import pandas as pd   # pylint: disable=import-outside-toplevel
  frames = {}
  for w, by_sub in experiment.trials.items():
    for s, studies in by_sub.items():
      for study, trials in studies.items():
        for t in trials:
          frames.setdefault(s, []).append({
              "workload": layout.workload_dir_name(w), "study": study, "trial": (t.name, s),
              layout.STEP_COLUMN: t.global_step, layout.TIME_COLUMN: t.time,
              specs[w].metric: t.metric})
  return {s: pd.DataFrame.from_records(rows) for s, rows in frames.items()}


def _profile(pp, frames, min_tau, max_tau, num_points):
  with tempfile.TemporaryDirectory() as tmp:
    perf = pp.compute_performance_profiles(
        frames, time_col=layout.TIME_COLUMN, min_tau=min_tau, max_tau=max_tau,
        reference_submission_tag=None, num_points=num_points, scale="linear", verbosity=0,
        output_dir=tmp)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    scores = pp.compute_leaderboard_score(perf, normalize=True)
  return {"taus": [float(x) for x in perf.columns],
          "rho": {s: [float(x) for x in perf.loc[s]] for s in perf.index},
          "score": {s: float(scores.loc[s, "score"]) for s in scores.index}}


def algoperf_scores(pp, experiment: layout.Experiment, specs, min_tau: float, max_tau: float,
                    num_points: int):
  """Per-workload steps and times to target by AlgoPerf's code, and its profile on
  ``linspace(min_tau, max_tau, num_points)`` when all 8 base workloads are present (else None):
  ``(times[s][w], steps[s][w], profile or None)``; a miss is absent."""
  frames = _frames(experiment, specs)
  columns = {}
  with _targets(pp, specs):
    for col in (layout.TIME_COLUMN, layout.STEP_COLUMN):
      columns[col] = {}
      for s, df in frames.items():
        pivot = pp.get_workloads_time_to_target(df, s, col, verbosity=0)
        columns[col][s] = {w: float(v) for w, v in pivot.loc[s].items() if not np.isnan(v)}
    profile = None
    if set(workload_facts.BASE_WORKLOADS) <= set(experiment.trials):
      profile = _profile(pp, frames, min_tau, max_tau, num_points)
  return columns[layout.TIME_COLUMN], columns[layout.STEP_COLUMN], profile


def _finite(x: float):
  return float(x) if math.isfinite(x) else None


def adopt(results, a_times, a_steps) -> List[Dict[str, Any]]:
  """Replaces scoring's medians in `results` by AlgoPerf's, listing every value on which the
  two differ as ``{"workload", "submission", "quantity", "ours", "algoperf"}``."""
  out = []
  for w, by_sub in results.items():
    for s, r in by_sub.items():
      for key, theirs in (("median_time_to_target", a_times), ("median_steps_to_target", a_steps)):
        ours = math.inf if r[key] is None else float(r[key])
        value = theirs.get(s, {}).get(w, math.inf)
        same = (ours == value) or (math.isfinite(ours) and math.isfinite(value)
                                   and math.isclose(ours, value, rel_tol=1e-12))
        if not same:
          out.append({"workload": w, "submission": s, "quantity": key,
                      "ours": _finite(ours), "algoperf": _finite(value)})
        r[key] = _finite(value)
  return out


def score_disagreements(ours: Mapping[str, float], theirs: Mapping[str, float]
                        ) -> List[Dict[str, Any]]:
  """The submissions whose performance-profile scores differ, in the same form as `adopt`."""
  return [{"workload": None, "submission": s, "quantity": "score", "ours": ours[s],
           "algoperf": v}
          for s, v in theirs.items()
          if not math.isclose(v, ours[s], rel_tol=1e-9, abs_tol=1e-12)]

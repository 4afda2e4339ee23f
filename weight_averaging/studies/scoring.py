"""Scoring of AlgoPerf experiment logs: time to target, fraction of a baseline, GPU-hours, metrics.

Reads experiment directories in AlgoPerf's official scoring layout::

  DIR/<submission>/<study_dir>/<workload>_<framework>/trial_<n>/eval_measurements.csv

(the official runner's ``--experiment_dir=DIR/<submission> --experiment_name=study_<i>``; the
embedded runner writes the same), and computes, per workload ``w`` and submission ``s``:

* **Which trials are scored.** A trial dir without an eval file, or with a damaged one (cut
  short, `layout.DamagedFile`), is skipped and listed in ``skipped_trials`` with the reason;
  the rest are scored. A trial that did not finish (killed, or still running) is excluded and
  listed in ``unfinished_trials`` (`finished` decides, by the study grid's own rule): its evals
  would otherwise count as a miss. Each trial's evals are sorted by step as read.
* **Time to target of a trial.** The first eval ``e`` of the trial whose validation metric meets
  the target gives ``steps = global_step[e]`` and ``time = accumulated_submission_time[e]``
  (untimed evaluation excluded). A trial that never meets it has ``inf``. "Meets" is the
  workload's own rule, the one its runner stops on (``has_reached_validation_target``): strictly,
  ``metric < target`` for a lower-is-better metric and ``>`` otherwise, on AlgoPerf's base
  workloads and the embedded one (`workload_facts.target_met`; ``WorkloadSpec.strict`` records a
  workload that compares inclusively). AlgoPerf's own scoring code compares inclusively, so on an
  eval exactly at the target the algoperf backend can disagree; ``algoperf_disagreements`` lists it.
* **Per-study and per-workload value (the rules).** A study's value is that of its *fastest*
  trial ``min_i t_ij``: the trial with the smallest submission time to target (ties: fewer steps,
  then the lower trial number); its steps and time are the study's. The workload value is the
  median over studies ``t_{s,w} = median_j t_j`` with ``inf`` for a study that never hits
  (``inf`` takes part in the median, so two misses out of three make the median a miss).
* **Fraction of a baseline's steps** (the paper's Figure 2):
  ``median_steps(s, w) / median_steps(b, w)`` for the baseline ``b`` (a submission scored
  here; by default ``nadamw`` where present, and a baseline given that is absent is an
  error) and, when
  present, the submission's own base, its optimizer without averaging (`catalog.base_of`:
  ``shampoo_ema`` is also compared to ``shampoo``). Undefined (``None``)
  when the baseline misses; ``inf`` is written as ``None`` too, so see ``median_steps_to_target``.
  Its mean over the workloads where both hit is the paper's "82 % of NadamW's steps".
* **GPU-hours of one run of the suite** (Table 1). The paper estimates what one run of the
  benchmark costs with and without averaging. A run stops once it reaches its target, and one that
  never does trains until the runtime budget is spent, so we charge per workload the scored time
  ``t_{s,w}`` when finite and the workload's ``max_allowed_runtime_sec`` for a miss (when the
  budget is unknown, the longest ``accumulated_submission_time`` logged for that workload and
  submission, marked ``"longest_run"``). ``gpu_hours = num_devices * sum_w seconds_w / 3600``.
  Submission time only: untimed evaluation and start-up are not charged, as in the score.
* **Best validation metric** (Table 2). Per study the best value of the validation metric over
  all its trials and evals (``min`` or ``max`` by the metric's direction, NaNs skipped); then the
  mean, population standard deviation and median over studies.
* **Performance-profile score** (AlgoPerf's leaderboard score). With ``t_{s,w}`` the workload
  times in submission seconds, ``r_{s,w} = t_{s,w} / min_s' t_{s',w}``, set to ``inf`` when
  ``t_{s,w}`` is a miss, missing, or more than 4 times the best.
  ``rho_s(tau) = |{w : r_{s,w} <= tau}| / n_workloads`` on ``tau = linspace(1, 4, 100)``, and the
  score is the trapezoid integral of ``rho_s`` divided by ``4 - 1 = 3``, in [0, 1]. AlgoPerf
  defines it over its 8 base workloads; here it is computed over the workloads present and
  ``suite_complete`` says whether those are all 8. It compares the submissions scored together
  (all those in ``DIR``). The same on steps is given as ``performance_profile["steps"]``.

Targets come from the workload (`workload_facts`): the embedded ones from their classes, AlgoPerf's
from ``workload_facts.ALGOPERF_WORKLOADS``, anything else from ``targets=``. ``use_algoperf``
chooses the backend: AlgoPerf's own scoring code where it imports (``"auto"``), always
(``"yes"``) or never (``"no"``); `weight_averaging.studies.algoperf_scoring` says how and where
the two can differ.

The result of `score_experiment` is the scores structure documented in
`weight_averaging.studies.scores_file`, which writes and reads it (JSON and CSV).
Study dirs are listed in natural order (``study_2`` before ``study_10``), so the lists
``*_per_study`` follow ``studies``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from weight_averaging import layout
from weight_averaging.algoperf_api import catalog
from weight_averaging.layout import Experiment, Trial
from weight_averaging.studies import algoperf_scoring
from weight_averaging.studies import finished
from weight_averaging.studies import scores_file
from weight_averaging.studies import workload_facts
from weight_averaging.studies.workload_facts import BASE_WORKLOADS

MIN_TAU, MAX_TAU, NUM_TAUS = 1.0, 4.0, 100
MAX_RATIO = 4.0   # times above this multiple of the best count as misses
DEFAULT_BASELINE = "nadamw"


class WorkloadSpec(NamedTuple):
  """What scoring needs of a workload: `metric` is the CSV column, e.g. 'validation/wer';
  `strict`: the target is met by ``metric < target`` (``>`` when maximizing), else ``<=``;
  `test_target` (None: none, or unknown) decides with `target` whether a run stopped there."""
  name: str
  metric: str
  target: float
  minimize: bool
  max_allowed_runtime_sec: Optional[float] = None
  step_hint: Optional[int] = None
  source: str = ""
  strict: bool = True
  test_target: Optional[float] = None


# ----------------------------------------------------------------------------- targets


def workload_spec(name: str, targets: Optional[Mapping[str, WorkloadSpec]] = None) -> WorkloadSpec:
  """The target of workload `name`: from `targets`, else from `workload_facts.facts`."""
  if targets and name in targets:
    return targets[name]
  try:
    f = workload_facts.facts(name)
  except ValueError as e:
    raise ValueError(f"{e}; pass its target with "
                     f"targets={{{name!r}: WorkloadSpec(...)}}") from None
  return WorkloadSpec(name, f"validation/{f.metric}", float(f.validation_target), f.minimize,
                      float(f.max_allowed_runtime_sec), int(f.step_hint), f.source, f.strict,
                      f.test_target)


def read_experiment(path: str, targets: Optional[Mapping[str, WorkloadSpec]] = None
                    ) -> Tuple[Experiment, Dict[str, WorkloadSpec]]:
  """All trials under `path` (`layout.read_experiment`) and the spec of each workload found.

  Trial dirs without an eval file or with a damaged one are skipped and listed in
  ``Experiment.skipped``; everything else that is malformed, and a workload without a known
  target, is a ValueError.
  """
  specs: Dict[str, WorkloadSpec] = {}

  def metric_of(workload: str) -> str:
    if workload not in specs:
      specs[workload] = workload_spec(workload, targets)
    return specs[workload].metric

  return layout.read_experiment(path, metric_of), specs


# ----------------------------------------------------------------------------- pure scoring


def hit_index(metric: np.ndarray, target: float, minimize: bool,
              strict: bool = True) -> Optional[int]:
  """Index of the first eval meeting the target, ``metric < target`` (``>`` when maximizing;
  ``<=``, ``>=`` when not `strict`); None if none."""
  with np.errstate(invalid="ignore"):
    hits = np.asarray(workload_facts.target_met(metric, target, minimize, strict))
  return int(np.argmax(hits)) if hits.any() else None


def trial_to_target(trial: Trial, spec: WorkloadSpec) -> Tuple[float, float]:
  """(steps, submission seconds) at the first eval meeting the target; (inf, inf) if none."""
  i = hit_index(trial.metric, spec.target, spec.minimize, spec.strict)
  if i is None:
    return math.inf, math.inf
  return float(trial.global_step[i]), float(trial.time[i])


def fastest_trial(trials: Sequence[Trial], spec: WorkloadSpec) -> Optional[int]:
  """Index in `trials` of the fastest trial to the target (smallest time, then fewest steps,
  then first); None when no trial hits."""
  keyed = [(trial_to_target(t, spec)[::-1], i) for i, t in enumerate(trials)]
  (time, _), best = min(keyed)
  return None if math.isinf(time) else best


def best_metric(trial: Trial, minimize: bool) -> Tuple[float, Optional[int]]:
  """(best value, its eval index) over the trial's evals, NaNs skipped; (nan, None) if none."""
  if not np.isfinite(trial.metric).any():
    return math.nan, None
  i = int(np.nanargmin(trial.metric) if minimize else np.nanargmax(trial.metric))
  return float(trial.metric[i]), i


def median(values: Sequence[float]) -> float:
  """The median, with inf taking part (numpy's: the mean of the two middle values if even)."""
  return float(np.median(np.asarray(values, dtype=np.float64)))


def ratio(value: float, reference: float) -> Optional[float]:
  """value / reference; None when the reference is a miss (inf) or 0, inf when only value is."""
  if not math.isfinite(reference) or reference == 0:
    return None
  return value / reference


def baselines_for(submission: str, submissions: Sequence[str], baseline: str) -> List[str]:
  """The baselines `submission` is compared with: `baseline`, and its own base
  (`catalog.base_of`) when that is another submission present; in that order."""
  out = [baseline] if baseline in submissions else []
  if submission in catalog.SUBMISSIONS:
    base = catalog.base_of(submission)
    if base != submission and base in submissions and base not in out:
      out.append(base)
  return out


def performance_profile(times: Mapping[str, Mapping[str, float]], workloads: Sequence[str],
                        min_tau: float = MIN_TAU, max_tau: float = MAX_TAU,
                        num_points: int = NUM_TAUS) -> Dict[str, Any]:
  """AlgoPerf's performance profile and score over `workloads`.

  `times[s][w]` is submission s's time on workload w (inf or absent for a miss). With
  ``best_w = min_s times[s][w]``, ``r[s][w] = times[s][w] / best_w``, inf when times[s][w] is not
  finite or exceeds ``MAX_RATIO * best_w``. ``rho_s(tau) = |{w : r[s][w] <= tau}| / len(workloads)``
  on ``taus = linspace(min_tau, max_tau, num_points)``;
  ``score_s = trapezoid(rho_s, taus) / (max_tau - min_tau)``.
  """
  if not workloads:
    raise ValueError("performance profile over no workloads")
  subs = list(times)
  t = np.array([[times[s].get(w, math.inf) for w in workloads] for s in subs], dtype=np.float64)
  t = np.where(np.isfinite(t), t, np.inf)
  best = t.min(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.where(np.isfinite(t) & (t <= MAX_RATIO * best), t / best, np.inf)
  taus = np.linspace(min_tau, max_tau, num_points)
  rho = (r[:, :, None] <= taus[None, None, :]).sum(axis=1) / len(workloads)
  area = ((rho[:, 1:] + rho[:, :-1]) / 2 * np.diff(taus)).sum(axis=1)
  scores = area / (max_tau - min_tau)
  return {"taus": taus.tolist(), "rho": {s: rho[i].tolist() for i, s in enumerate(subs)},
          "score": {s: float(scores[i]) for i, s in enumerate(subs)}}


# ----------------------------------------------------------------------------- assembling


def _num(x: float) -> Optional[float]:
  return float(x) if x is not None and math.isfinite(x) else None


def _int(x: float) -> Optional[int]:
  return int(x) if x is not None and math.isfinite(x) else None


def score_study(trials: Sequence[Trial], spec: WorkloadSpec) -> Dict[str, Any]:
  """One study: its fastest trial's steps/time to target, best metric, and a curve to plot."""
  per_trial = {}
  for t in trials:
    steps, time = trial_to_target(t, spec)
    value, _ = best_metric(t, spec.minimize)
    per_trial[t.name] = {"steps_to_target": _int(steps), "time_to_target": _num(time),
                         "best_metric": _num(value), "num_evals": int(len(t.global_step))}
  best = [(best_metric(t, spec.minimize), k) for k, t in enumerate(trials)]
  best = [(v, i, k) for (v, i), k in best if i is not None]
  if best:
    sign = 1.0 if spec.minimize else -1.0
    value, at, k_best = min(best, key=lambda b: (sign * b[0], b[2]))
  else:
    value, at, k_best = math.nan, None, 0
  k = fastest_trial(trials, spec)
  steps, time = trial_to_target(trials[k], spec) if k is not None else (math.inf, math.inf)
  curve_trial = trials[k if k is not None else k_best]
  return {
      "steps_to_target": _int(steps), "time_to_target": _num(time),
      "fastest_trial": trials[k].name if k is not None else None,
      "best_metric": _num(value),
      "best_metric_trial": trials[k_best].name if at is not None else None,
      "best_metric_step": int(trials[k_best].global_step[at]) if at is not None else None,
      "curve": {"trial": curve_trial.name, "global_step": curve_trial.global_step.tolist(),
                "metric": [_num(v) for v in curve_trial.metric],
                "accumulated_submission_time": [_num(v) for v in curve_trial.time]},
      "trials": per_trial,
  }


def _inf(x: Optional[float]) -> float:
  return math.inf if x is None else float(x)


def score_workload_submission(studies: Mapping[str, Sequence[Trial]],
                              spec: WorkloadSpec) -> Dict[str, Any]:
  """All studies of one (workload, submission), with the medians over studies."""
  per_study = {name: score_study(trials, spec) for name, trials in studies.items()}
  steps = [_inf(s["steps_to_target"]) for s in per_study.values()]
  times = [_inf(s["time_to_target"]) for s in per_study.values()]
  bests = [s["best_metric"] for s in per_study.values()]
  finite = np.array([b for b in bests if b is not None], dtype=np.float64)
  return {
      "studies": per_study, "num_studies": len(per_study),
      "num_studies_hit": sum(math.isfinite(t) for t in times),
      "steps_to_target_per_study": [_int(s) for s in steps],
      "time_to_target_per_study": [_num(t) for t in times],
      "median_steps_to_target": _num(median(steps)), "median_time_to_target": _num(median(times)),
      "best_metric": {"mean": _num(finite.mean()) if finite.size else None,
                      "std": _num(finite.std()) if finite.size else None,
                      "median": _num(float(np.median(finite))) if finite.size else None,
                      "per_study": bests},
  }


def _workload_times(results, workloads, submissions, key) -> Dict[str, Dict[str, float]]:
  return {s: {w: _inf(results[w][s][key]) for w in workloads if s in results[w]}
          for s in submissions}


def gpu_hours(results, specs, experiment: Experiment, submissions, num_devices: int = 1):
  """Table 1's estimate of one run of the suite per submission (see the module docstring)."""
  out = {}
  for s in submissions:
    per = {}
    for w in sorted(results):
      if s not in results[w]:
        continue
      t = results[w][s]["median_time_to_target"]
      if t is not None:
        per[w] = {"seconds": t, "source": "time_to_target"}
      elif specs[w].max_allowed_runtime_sec is not None:
        per[w] = {"seconds": float(specs[w].max_allowed_runtime_sec), "source": "budget"}
      else:
        longest = max((float(np.nanmax(t.time)) for ts in experiment.trials[w][s].values()
                       for t in ts if t.time.size), default=0.0)
        per[w] = {"seconds": longest, "source": "longest_run"}
    out[s] = {"total": num_devices * sum(p["seconds"] for p in per.values()) / 3600.0,
              "per_workload": per}
  return out


def _profile_section(times, workloads, backend="ours"):
  section = {"backend": backend, "workloads": list(workloads),
             "suite_complete": set(BASE_WORKLOADS) <= set(workloads),
             "missing_base_workloads": [w for w in BASE_WORKLOADS if w not in workloads]}
  section.update(performance_profile(times, workloads))
  return section


def _fractions(results, submissions, baseline):
  """Fills fraction_of_baseline_* in `results`; returns the mean fraction of steps."""
  means = {}
  for s in submissions:
    bases = baselines_for(s, submissions, baseline)
    means[s] = {}
    for b in bases:
      used = []
      for w in sorted(results):
        r = results[w].get(s)
        if r is None:
          continue
        ref = results[w].get(b)
        for key, quantity in (("steps", "median_steps_to_target"),
                              ("time", "median_time_to_target")):
          value = ratio(_inf(r[quantity]), _inf(ref[quantity])) if ref else None
          r.setdefault(f"fraction_of_baseline_{key}", {})[b] = _num(value)
        if r["fraction_of_baseline_steps"][b] is not None:
          used.append(w)
      fracs = [results[w][s]["fraction_of_baseline_steps"][b] for w in used]
      means[s][b] = {"mean": float(np.mean(fracs)) if fracs else None, "workloads": used}
  for w in results:
    for r in results[w].values():
      r.setdefault("fraction_of_baseline_steps", {})
      r.setdefault("fraction_of_baseline_time", {})
  return means


def _check_arguments(use_algoperf: str, num_devices: int) -> None:
  if use_algoperf not in ("auto", "yes", "no"):
    raise ValueError(f"use_algoperf must be 'auto', 'yes' or 'no', not {use_algoperf!r}")
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"num_devices (accelerators per run, for the GPU-hours) must be an "
                     f"integer >= 1, got {num_devices!r}")


def score_experiment(path: str, baseline: Optional[str] = None,
                     targets: Optional[Mapping[str, WorkloadSpec]] = None,
                     use_algoperf: str = "auto", num_devices: int = 1) -> Dict[str, Any]:
  """Scores every workload and submission under `path`; the result is `scores_file`'s structure.

  `baseline` (default `DEFAULT_BASELINE` where present) must be one of the submissions scored.
  """
  _check_arguments(use_algoperf, num_devices)
  experiment, specs = read_experiment(path, targets)
  experiment, unfinished = finished.without_unfinished(experiment, specs)
  workloads = sorted(experiment.trials)
  submissions = sorted({s for w in workloads for s in experiment.trials[w]})
  if baseline is None:
    baseline = DEFAULT_BASELINE
  elif baseline not in submissions:
    raise ValueError(f"baseline {baseline!r} is not among the submissions scored under {path} "
                     f"({', '.join(submissions)}): pass one of them as the baseline")
  results = {w: {s: score_workload_submission(experiment.trials[w][s], specs[w])
                 for s in sorted(experiment.trials[w])} for w in workloads}
  algoperf = None if use_algoperf == "no" else algoperf_scoring.load()
  if use_algoperf == "yes" and algoperf is None:
    raise ValueError("use_algoperf='yes' but AlgoPerf's scoring (scoring.performance_profile, with "
                     "pandas) does not import in this environment")
  disagreements: List[Dict[str, Any]] = []
  profile_times = _workload_times(results, workloads, submissions, "median_time_to_target")
  profile_steps = _workload_times(results, workloads, submissions, "median_steps_to_target")
  profile = {"time": _profile_section(profile_times, workloads),
             "steps": _profile_section(profile_steps, workloads)}
  if algoperf is not None:
    profile, disagreements = _with_algoperf(algoperf, results, experiment, specs, workloads)
  means = _fractions(results, submissions, baseline)
  return {
      "format": scores_file.FORMAT, "experiment_dir": os.path.abspath(path), "baseline": baseline,
      "num_devices": num_devices, "backend": "algoperf" if algoperf is not None else "ours",
      "algoperf_disagreements": disagreements,
      "skipped_trials": [{"trial": t, "reason": r} for t, r in experiment.skipped],
      "unfinished_trials": unfinished,
      "submissions": submissions, "workload_names": workloads,
      "workloads": {w: {"metric": specs[w].metric, "target": specs[w].target,
                        "minimize": specs[w].minimize, "strict": specs[w].strict,
                        "max_allowed_runtime_sec": specs[w].max_allowed_runtime_sec,
                        "step_hint": specs[w].step_hint, "source": specs[w].source}
                    for w in workloads},
      "results": results, "mean_fraction_of_baseline_steps": means,
      "gpu_hours": gpu_hours(results, specs, experiment, submissions, num_devices),
      "performance_profile": profile,
  }


def _with_algoperf(pp, results, experiment, specs, workloads):
  """Adopts AlgoPerf's steps and times (and its profile with all 8 base workloads) into
  `results`; returns the profile section and the disagreements with ours."""
  a_times, a_steps, a_profile = algoperf_scoring.algoperf_scores(
      pp, experiment, specs, MIN_TAU, MAX_TAU, NUM_TAUS)
  disagreements = algoperf_scoring.adopt(results, a_times, a_steps)
  profile = {"time": _profile_section(a_times, workloads, "algoperf"),
             "steps": _profile_section(a_steps, workloads, "algoperf")}
  if a_profile is not None:
    disagreements += algoperf_scoring.score_disagreements(profile["time"]["score"],
                                                          a_profile["score"])
    profile["time"].update(a_profile, backend="algoperf")
  else:
    for section in profile.values():   # algoperf's times, our profile over the present workloads
      section["backend"] = "ours"
  return profile, disagreements

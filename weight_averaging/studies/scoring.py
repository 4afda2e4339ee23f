"""Scoring of AlgoPerf experiment logs: time to target, fraction of a baseline, GPU-hours, metrics.

Reads experiment directories in AlgoPerf's official scoring layout::

  DIR/<submission>/<study_dir>/<workload>_<framework>/trial_<n>/eval_measurements.csv

(the official runner's ``--experiment_dir=DIR/<submission> --experiment_name=study_<i>``; the
embedded runner writes the same), and computes, per workload ``w`` and submission ``s``:

* **Time to target of a trial.** The first eval ``e`` of the trial whose validation metric meets
  the target (``metric <= target`` for a lower-is-better metric, ``>=`` otherwise: AlgoPerf's
  scoring compares inclusively) gives ``steps = global_step[e]`` and
  ``time = accumulated_submission_time[e]`` (untimed evaluation excluded). A trial that never
  meets it has ``inf``.
* **Per-study and per-workload value (the rules).** A study's value is that of its *fastest*
  trial ``min_i t_ij``: the trial with the smallest submission time to target (ties: fewer steps,
  then the lower trial number); its steps and time are the study's. The workload value is the
  median over studies ``t_{s,w} = median_j t_j`` with ``inf`` for a study that never hits
  (``inf`` takes part in the median, so two misses out of three make the median a miss).
* **Fraction of a baseline's steps** (the paper's Figure 2):
  ``median_steps(s, w) / median_steps(b, w)`` for the baseline ``b`` (default ``nadamw``) and, when
  present, the submission's own family base (the longest other submission name ``p`` with ``s``
  starting with ``p + '_'``: ``shampoo_ema`` is also compared to ``shampoo``). Undefined (``None``)
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

Targets come from the workload: the embedded ones from ``weight_averaging.workloads``, AlgoPerf's
8 base workloads from ``ALGOPERF_WORKLOADS`` below, anything else from ``targets=``.

**Backends.** ``use_algoperf="auto"`` (default) uses AlgoPerf's own scoring code
(``scoring.performance_profile`` of an installed algoperf checkout, which needs pandas) where it
imports, our implementation otherwise; ``"yes"`` requires it, ``"no"`` never uses it. With
algoperf, the per-workload steps and times come from its ``get_workloads_time_to_target`` and, when
all 8 base workloads are present, the profile and score from its ``compute_performance_profiles``
and ``compute_leaderboard_score``; ours is computed as well and every difference is listed under
``algoperf_disagreements``. The two agree except in one case: AlgoPerf's code picks the trial
that meets the target at the *earliest eval index* (the first such trial on a tie) and takes its
time, the rules the trial with the *smallest time*; they differ only when those are different
trials (same eval index with different times, or eval schedules that differ between trials).

**The scores file** (``write_scores`` / ``load_scores``; JSON, ``inf`` and misses as ``null``)::

  {
    "format": "weight_averaging.scores/1",
    "experiment_dir": str, "baseline": str, "num_devices": int,
    "backend": "ours" | "algoperf",          # who computed steps/times to target
    "algoperf_disagreements": [{"workload", "submission", "quantity", "ours", "algoperf"}],
    "skipped_trials": [str],                  # trial dirs without eval_measurements.csv
    "submissions": [str], "workload_names": [str],
    "workloads": {w: {"metric": "validation/<name>", "target": float, "minimize": bool,
                      "max_allowed_runtime_sec": float | null, "step_hint": int | null,
                      "source": str}},
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

Study dirs are listed in natural order (``study_2`` before ``study_10``), so the lists
``*_per_study`` follow ``studies``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

FORMAT = "weight_averaging.scores/1"
MIN_TAU, MAX_TAU, NUM_TAUS = 1.0, 4.0, 100
MAX_RATIO = 4.0   # times above this multiple of the best count as misses
EVAL_FILE = "eval_measurements.csv"
STEP_COLUMN = "global_step"
TIME_COLUMN = "accumulated_submission_time"
WORKLOAD_DIR = re.compile(r"^(?P<workload>.+)_(?P<framework>jax|pytorch)$")
TRIAL_DIR = re.compile(r"^trial_(?P<n>\d+)$")

# Metric directions, as AlgoPerf's scoring defines them (lower / higher is better).
MINIMIZED_METRICS = ("ce_loss", "error_rate", "ctc_loss", "wer", "l1_loss", "loss")
MAXIMIZED_METRICS = ("mean_average_precision", "ssim", "accuracy", "bleu")


class WorkloadSpec(NamedTuple):
  """What scoring needs of a workload: `metric` is the CSV column, e.g. 'validation/wer'."""
  name: str
  metric: str
  target: float
  minimize: bool
  max_allowed_runtime_sec: Optional[float] = None
  step_hint: Optional[int] = None
  source: str = ""


def _algoperf_spec(name, metric, target, runtime, step_hint, path):
  return WorkloadSpec(name, f"validation/{metric}", target, metric in MINIMIZED_METRICS,
                      float(runtime), step_hint, f"algoperf 2c90454f {path}")


# AlgoPerf's 8 base workloads: validation targets, metric names, runtime budgets (s) and step hints
# of mlcommons/algorithmic-efficiency main at 2c90454f, from the workload files named in `source`
# (ViT and DeepSpeech inherit the metric of ResNet and Conformer). Targets are unchanged since v0.5.
ALGOPERF_WORKLOADS: Dict[str, WorkloadSpec] = {s.name: s for s in (
    _algoperf_spec("criteo1tb", "loss", 0.123735, 7_703, 10_666,
                   "algoperf/workloads/criteo1tb/workload.py"),
    _algoperf_spec("fastmri", "ssim", 0.723653, 4_430, 18_094,
                   "algoperf/workloads/fastmri/workload.py"),
    _algoperf_spec("imagenet_resnet", "accuracy", 1 - 0.22569, 66_159, 195_999,
                   "algoperf/workloads/imagenet_resnet/workload.py"),
    _algoperf_spec("imagenet_vit", "accuracy", 1 - 0.22691, 69_768, 167_999,
                   "algoperf/workloads/imagenet_vit/workload.py"),
    _algoperf_spec("librispeech_conformer", "wer", 0.085884, 58_015, 76_000,
                   "algoperf/workloads/librispeech_conformer/workload.py"),
    _algoperf_spec("librispeech_deepspeech", "wer", 0.119936, 44_405, 38_400,
                   "algoperf/workloads/librispeech_deepspeech/librispeech_jax/workload.py"),
    _algoperf_spec("ogbg", "mean_average_precision", 0.28098, 12_011, 52_000,
                   "algoperf/workloads/ogbg/workload.py"),
    _algoperf_spec("wmt", "bleu", 30.8491, 43_336, 120_000, "algoperf/workloads/wmt/workload.py"),
)}
BASE_WORKLOADS = tuple(sorted(ALGOPERF_WORKLOADS))


class Trial(NamedTuple):
  """One trial's evals: parallel arrays, in the order of the CSV."""
  name: str
  global_step: np.ndarray
  time: np.ndarray
  metric: np.ndarray


class Experiment(NamedTuple):
  """`trials[workload][submission][study]` is a list of `Trial`, sorted by trial number."""
  path: str
  trials: Dict[str, Dict[str, Dict[str, List[Trial]]]]
  skipped: List[str]


# ----------------------------------------------------------------------------- targets


def metric_minimized(metric: str) -> bool:
  """True for a lower-is-better metric name ('loss', 'validation/wer'), False for higher."""
  name = metric.split("/", 1)[-1]
  if name in MINIMIZED_METRICS:
    return True
  if name in MAXIMIZED_METRICS:
    return False
  raise ValueError(f"unknown direction for metric {metric!r}: known lower-is-better "
                   f"{MINIMIZED_METRICS}, higher-is-better {MAXIMIZED_METRICS}")


def workload_spec(name: str, targets: Optional[Mapping[str, WorkloadSpec]] = None) -> WorkloadSpec:
  """The target of workload `name`: from `targets`, the embedded workloads, or AlgoPerf's table."""
  if targets and name in targets:
    return targets[name]
  from weight_averaging import workloads as embedded   # pylint: disable=import-outside-toplevel
  if name in embedded.WORKLOADS:
    cls = embedded.WORKLOADS[name]
    metric = f"validation/{cls.target_metric_name}"
    return WorkloadSpec(name, metric, float(cls.validation_target_value), metric_minimized(metric),
                        float(cls.max_allowed_runtime_sec), int(cls.step_hint),
                        f"weight_averaging.workloads.{cls.__name__}")
  if name in ALGOPERF_WORKLOADS:
    return ALGOPERF_WORKLOADS[name]
  raise ValueError(f"unknown workload {name!r}: no validation target is known for it (embedded: "
                   f"{sorted(embedded.WORKLOADS)}, AlgoPerf: {list(BASE_WORKLOADS)}); pass its "
                   "target with targets={name: WorkloadSpec(...)}")


# ----------------------------------------------------------------------------- reading logs


def _natural_key(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _subdirs(path: str) -> List[str]:
  return sorted((d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))),
                key=_natural_key)


def _as_float(text: str) -> float:
  return float(text) if text.strip() else float("nan")


def read_eval_measurements(path: str, metric: str, name: str = "") -> Trial:
  """The evals of one `eval_measurements.csv`: global_step, submission time and `metric`."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    missing = [c for c in (STEP_COLUMN, TIME_COLUMN, metric) if c not in columns]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing} (has {columns})")
    rows = list(reader)
  try:
    steps = np.array([int(float(r[STEP_COLUMN])) for r in rows], dtype=np.int64)
    times = np.array([_as_float(r[TIME_COLUMN]) for r in rows], dtype=np.float64)
    values = np.array([_as_float(r[metric]) for r in rows], dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: unreadable value ({e})") from e
  return Trial(name or os.path.basename(os.path.dirname(path)), steps, times, values)


def read_experiment(path: str, targets: Optional[Mapping[str, WorkloadSpec]] = None
                    ) -> Tuple[Experiment, Dict[str, WorkloadSpec]]:
  """All trials under `path` (the official layout) and the spec of each workload found.

  Trial dirs without an ``eval_measurements.csv`` (a run not started or killed early) are skipped
  and listed in ``Experiment.skipped``; everything else that is malformed is a ValueError.
  """
  if not os.path.isdir(path):
    raise ValueError(f"experiment directory {path!r} does not exist or is not a directory")
  trials: Dict[str, Dict[str, Dict[str, List[Trial]]]] = {}
  specs: Dict[str, WorkloadSpec] = {}
  skipped: List[str] = []
  for submission in _subdirs(path):
    for study in _subdirs(os.path.join(path, submission)):
      seen = {}
      for wdir in _subdirs(os.path.join(path, submission, study)):
        match = WORKLOAD_DIR.match(wdir)
        if not match:
          continue
        workload = match["workload"]
        if workload in seen:
          raise ValueError(f"{os.path.join(path, submission, study)}: workload {workload!r} "
                           f"appears twice ({seen[workload]} and {wdir})")
        seen[workload] = wdir
        trial_dirs = [t for t in _subdirs(os.path.join(path, submission, study, wdir))
                      if TRIAL_DIR.match(t)]
        for trial in trial_dirs:
          csv_path = os.path.join(path, submission, study, wdir, trial, EVAL_FILE)
          if not os.path.isfile(csv_path):
            skipped.append(os.path.dirname(csv_path))
            continue
          if workload not in specs:
            specs[workload] = workload_spec(workload, targets)
          trials.setdefault(workload, {}).setdefault(submission, {}).setdefault(study, []).append(
              read_eval_measurements(csv_path, specs[workload].metric, trial))
  if not trials:
    raise ValueError(f"no trials found under {path!r}: expected "
                     f"<submission>/<study>/<workload>_<jax|pytorch>/trial_<n>/{EVAL_FILE}")
  return Experiment(path, trials, skipped), specs


# ----------------------------------------------------------------------------- pure scoring


def hit_index(metric: np.ndarray, target: float, minimize: bool) -> Optional[int]:
  """Index of the first eval with ``metric <= target`` (``>=`` when maximizing); None if none."""
  with np.errstate(invalid="ignore"):
    hits = metric <= target if minimize else metric >= target
  return int(np.argmax(hits)) if hits.any() else None


def trial_to_target(trial: Trial, spec: WorkloadSpec) -> Tuple[float, float]:
  """(steps, submission seconds) at the first eval meeting the target; (inf, inf) if none."""
  i = hit_index(trial.metric, spec.target, spec.minimize)
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
  """The baselines `submission` is compared with: `baseline` and its family base, if present."""
  out = [baseline] if baseline in submissions else []
  family = [p for p in submissions if p != submission and submission.startswith(p + "_")]
  if family:
    base = max(family, key=len)
    if base not in out:
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


def score_experiment(path: str, baseline: str = "nadamw",
                     targets: Optional[Mapping[str, WorkloadSpec]] = None,
                     use_algoperf: str = "auto", num_devices: int = 1) -> Dict[str, Any]:
  """Scores every workload and submission under `path`; the result is the JSON structure above."""
  if use_algoperf not in ("auto", "yes", "no"):
    raise ValueError(f"use_algoperf must be 'auto', 'yes' or 'no', not {use_algoperf!r}")
  experiment, specs = read_experiment(path, targets)
  workloads = sorted(experiment.trials)
  submissions = sorted({s for w in workloads for s in experiment.trials[w]})
  results = {w: {s: score_workload_submission(experiment.trials[w][s], specs[w])
                 for s in sorted(experiment.trials[w])} for w in workloads}
  algoperf = None if use_algoperf == "no" else algoperf_scoring()
  if use_algoperf == "yes" and algoperf is None:
    raise ValueError("use_algoperf='yes' but AlgoPerf's scoring (scoring.performance_profile, with "
                     "pandas) does not import in this environment")
  disagreements: List[Dict[str, Any]] = []
  profile_times = _workload_times(results, workloads, submissions, "median_time_to_target")
  profile_steps = _workload_times(results, workloads, submissions, "median_steps_to_target")
  profile = {"time": _profile_section(profile_times, workloads),
             "steps": _profile_section(profile_steps, workloads)}
  if algoperf is not None:
    a_times, a_steps, a_profile = algoperf_scores(algoperf, experiment, specs)
    disagreements = _adopt_algoperf(results, a_times, a_steps)
    profile = {"time": _profile_section(a_times, workloads, "algoperf"),
               "steps": _profile_section(a_steps, workloads, "algoperf")}
    if a_profile is not None:
      for s, v in a_profile["score"].items():
        if not math.isclose(v, profile["time"]["score"][s], rel_tol=1e-9, abs_tol=1e-12):
          disagreements.append({"workload": None, "submission": s, "quantity": "score",
                                "ours": profile["time"]["score"][s], "algoperf": v})
      profile["time"].update(a_profile, backend="algoperf")
    else:
      for section in profile.values():   # algoperf's times, our profile over the present workloads
        section["backend"] = "ours"
  means = _fractions(results, submissions, baseline)
  return {
      "format": FORMAT, "experiment_dir": os.path.abspath(path), "baseline": baseline,
      "num_devices": num_devices, "backend": "algoperf" if algoperf is not None else "ours",
      "algoperf_disagreements": disagreements, "skipped_trials": experiment.skipped,
      "submissions": submissions, "workload_names": workloads,
      "workloads": {w: {"metric": specs[w].metric, "target": specs[w].target,
                        "minimize": specs[w].minimize,
                        "max_allowed_runtime_sec": specs[w].max_allowed_runtime_sec,
                        "step_hint": specs[w].step_hint, "source": specs[w].source}
                    for w in workloads},
      "results": results, "mean_fraction_of_baseline_steps": means,
      "gpu_hours": gpu_hours(results, specs, experiment, submissions, num_devices),
      "performance_profile": profile,
  }


def _adopt_algoperf(results, a_times, a_steps) -> List[Dict[str, Any]]:
  """Replaces our medians by AlgoPerf's, listing every value on which the two differ."""
  out = []
  for w, by_sub in results.items():
    for s, r in by_sub.items():
      for key, theirs in (("median_time_to_target", a_times), ("median_steps_to_target", a_steps)):
        ours, value = _inf(r[key]), theirs.get(s, {}).get(w, math.inf)
        same = (ours == value) or (math.isfinite(ours) and math.isfinite(value)
                                   and math.isclose(ours, value, rel_tol=1e-12))
        if not same:
          out.append({"workload": w, "submission": s, "quantity": key,
                      "ours": _num(ours), "algoperf": _num(value)})
        r[key] = _num(value)
  return out


# ----------------------------------------------------------------------------- AlgoPerf's code


def algoperf_scoring():
  """AlgoPerf's `scoring.performance_profile` module, or None where it does not import."""
  try:
    with warnings.catch_warnings():   # its own DeprecationWarnings (escapes, np.trapz)
      warnings.simplefilter("ignore", DeprecationWarning)
      from scoring import performance_profile as pp   # pylint: disable=import-outside-toplevel
  except Exception:   # pylint: disable=broad-except  (missing algoperf, pandas, matplotlib...)
    return None
  return pp


@contextlib.contextmanager
def _algoperf_targets(pp, specs):
  """Makes AlgoPerf's target lookup (its registry, imported from a relative path) use `specs`."""
  from absl import logging   # pylint: disable=import-outside-toplevel
  utils = pp.scoring_utils
  original, verbosity = utils.get_workload_metrics_and_targets, logging.get_verbosity()

  def lookup(workload, split="validation"):
    spec = specs[WORKLOAD_DIR.match(workload)["workload"]]
    return spec.metric, spec.target

  utils.get_workload_metrics_and_targets = lookup
  logging.set_verbosity(logging.ERROR)   # its count-of-studies/trials warnings
  try:
    yield
  finally:
    utils.get_workload_metrics_and_targets = original
    logging.set_verbosity(verbosity)


def _algoperf_frames(experiment: Experiment, specs):
  """One pandas DataFrame per submission, a row per trial, as AlgoPerf's scoring reads logs."""
  import pandas as pd   # pylint: disable=import-outside-toplevel
  frames = {}
  for w, by_sub in experiment.trials.items():
    for s, studies in by_sub.items():
      for study, trials in studies.items():
        for t in trials:
          frames.setdefault(s, []).append({
              "workload": f"{w}_jax", "study": study, "trial": (t.name, s),
              STEP_COLUMN: t.global_step, TIME_COLUMN: t.time, specs[w].metric: t.metric})
  return {s: pd.DataFrame.from_records(rows) for s, rows in frames.items()}


def algoperf_scores(pp, experiment: Experiment, specs):
  """Per-workload steps and times to target by AlgoPerf's code, and its profile when all 8 base
  workloads are present (else None): (times[s][w], steps[s][w], profile or None)."""
  frames = _algoperf_frames(experiment, specs)
  columns = {}
  with _algoperf_targets(pp, specs):
    for col in (TIME_COLUMN, STEP_COLUMN):
      columns[col] = {}
      for s, df in frames.items():
        pivot = pp.get_workloads_time_to_target(df, s, col, verbosity=0)
        columns[col][s] = {w: float(v) for w, v in pivot.loc[s].items() if not np.isnan(v)}
    profile = None
    if set(BASE_WORKLOADS) <= set(experiment.trials):
      with tempfile.TemporaryDirectory() as tmp:
        perf = pp.compute_performance_profiles(
            frames, time_col=TIME_COLUMN, min_tau=MIN_TAU, max_tau=MAX_TAU,
            reference_submission_tag=None, num_points=NUM_TAUS, scale="linear", verbosity=0,
            output_dir=tmp)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scores = pp.compute_leaderboard_score(perf, normalize=True)
      profile = {"taus": [float(x) for x in perf.columns],
                 "rho": {s: [float(x) for x in perf.loc[s]] for s in perf.index},
                 "score": {s: float(scores.loc[s, "score"]) for s in scores.index}}
  return columns[TIME_COLUMN], columns[STEP_COLUMN], profile


# ----------------------------------------------------------------------------- files


def write_scores(scores: Mapping[str, Any], path: str) -> None:
  """Writes `scores` (from score_experiment) as JSON."""
  with open(path, "w") as f:
    json.dump(scores, f, indent=1, allow_nan=False)


def load_scores(path: str) -> Dict[str, Any]:
  """Reads back a scores JSON written by `write_scores` / scripts/score.py."""
  with open(path) as f:
    scores = json.load(f)
  if scores.get("format") != FORMAT:
    raise ValueError(f"{path}: not a scores file of format {FORMAT!r} "
                     f"(format {scores.get('format')!r})")
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

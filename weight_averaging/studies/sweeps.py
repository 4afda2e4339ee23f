"""Sweeps: an experiment's trials with their hyperparameters, grouped by what varies.

A study preset (an LR sweep, shorter schedules, annealing) runs every variant as one trial
of the official layout, ``DIR/<submission>/study_<s>/<workload>_jax/trial_<t>/``, whose
``hparams.json`` holds its full point. This module reads those trials (the same ones
`scoring` scores: damaged and unfinished trials are left out and listed), and each
trial's **settings**: its hyperparameters, with the learning-rate schedule's read and
completed with their defaults by `algoperf_api.schedules` (an absent ``lr_schedule`` is
``'cosine'``, an absent ``step_hint_factor`` 1, ...), under that module's field names
(``kind``, ``step_hint_factor``, ``end_factor``, ``cooldown_fraction``, ``wsd_decay``).
A trial without ``hparams.json`` has the default schedule and no other settings.

**What varies.** A setting *varies* on a workload when two trials of one study of one
submission differ in it (a seed or a path that changes only from study to study does not
split a variant); a setting other than the schedule's and the learning rate is left out
when the others already tell those trials apart (a ``warmup_factor`` a preset derives
from the ``step_hint_factor``). A trial's **variant** is its values of the settings that vary on its
workload, leaving out those that do not apply to its schedule (``cooldown_fraction`` and
``wsd_decay`` belong to ``'wsd'``; ``'constant'`` has no ``end_factor``). A **series** is
one submission at one variant (less the settings a figure puts on its x axis); its
studies give the spread.

The values the paper's Section 6 figures and Table 2 show are computed here, from the
trials through `scoring`'s own rules (`scoring.trial_to_target`, `scoring.best_metric`),
so a figure shows what the scores say; `why_plots` draws them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from weight_averaging import layout
from weight_averaging.algoperf_api import catalog
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import recipes
from weight_averaging.algoperf_api import schedules as schedules_lib
from weight_averaging.studies import finished
from weight_averaging.studies import scoring

LEARNING_RATE = "learning_rate"
# The schedule settings (`schedules.ScheduleConfig` fields) that set how long the decay
# runs (Fig. 7a/12) and how far it goes (Fig. 7b/8).
HORIZON_SETTINGS = ("step_hint_factor", "cooldown_fraction")
DECAY_SETTINGS = ("kind", "end_factor")
# How tables and legends name a schedule field: the hyperparameter it is read from.
SHOWN = {"kind": "lr_schedule", "end_factor": "lr_end_factor"}

Variant = Tuple[Tuple[str, Any], ...]


class Point(NamedTuple):
  """One trial: `settings` as the module docstring defines them; `hparams` as read (None
  when the trial has no ``hparams.json`` or it holds ``null``, self-tuning)."""
  workload: str
  submission: str
  study: str
  trial: layout.Trial
  hparams: Optional[Dict[str, Any]]
  settings: Dict[str, Any]


class Sweep(NamedTuple):
  """Every scored trial of an experiment: `points[workload]`, `varying[workload]` the
  settings that vary there (`NAMING` order), `specs[workload]` its `scoring.WorkloadSpec`."""
  path: str
  specs: Dict[str, scoring.WorkloadSpec]
  points: Dict[str, List[Point]]
  varying: Dict[str, Tuple[str, ...]]
  skipped: List[layout.Skipped]
  unfinished: List[Dict[str, str]]


class Spread(NamedTuple):
  """One series at one x: `per_study` (inf: that study missed), and over the studies that
  did not miss their `mean`, `low`, `high` (min and max) and `std` (population); NaN when
  every study missed."""
  per_study: Tuple[float, ...]
  mean: float
  low: float
  high: float
  std: float

  @property
  def misses(self) -> int:
    return sum(not math.isfinite(v) for v in self.per_study)


def settings_of(hparams: Optional[Mapping[str, Any]], where: str = "") -> Dict[str, Any]:
  """`hparams` with the schedule's names replaced by their `schedules.ScheduleConfig`
  (defaults filled in); a bad schedule is `ValueError` naming `where` (a trial dir)."""
  raw = dict(hparams or {})
  try:
    with hp.recording() as schedule_names:
      config = schedules_lib.schedule_config(raw, hp.lookup)
  except ValueError as e:
    raise ValueError(f"{where}: {e}" if where else str(e)) from None
  settings = {k: v for k, v in raw.items() if k not in schedule_names}
  settings.update(config._asdict())
  return settings


def _applies(name: str, settings: Mapping[str, Any]) -> bool:
  """False for a schedule field its schedule ignores (`schedules`: the wsd-only fields,
  and the end of a decay that ``'constant'`` never makes)."""
  kind = settings.get("kind")
  if name in ("cooldown_fraction", "wsd_decay"):
    return kind == "wsd"
  return not (name == "end_factor" and kind == "constant")


# The settings a variant is always named by when they vary (what the presets set: the
# learning rate and every `schedules.ScheduleConfig` field), in the order a variant
# lists them; any other setting follows, by name.
NAMING = (LEARNING_RATE, "step_hint_factor", "kind", "end_factor", "cooldown_fraction",
          "wsd_decay")


def _key(settings: Mapping[str, Any], names: Sequence[str]) -> str:
  return json.dumps([settings.get(n) for n in names], sort_keys=True)


def _partition(groups, names) -> List[List[str]]:
  return [sorted({_key(s, names) for s in group}) for group in groups]


def _varying(points: Sequence[Point]) -> Tuple[str, ...]:
  """The settings two points of one (submission, study) differ in (in `NAMING` order),
  less any other than
  the schedule's and the learning rate that the rest already tell apart (a
  ``warmup_factor`` a preset derives from the ``step_hint_factor``, say): leaving one
  out must not merge two variants."""
  by_group: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
  for p in points:
    by_group.setdefault((p.submission, p.study), []).append(p.settings)
  groups = list(by_group.values())
  names = sorted({k for group in groups for s in group for k in s
                  if len({_key(x, [k]) for x in group}) > 1},
                 key=lambda n: (NAMING.index(n) if n in NAMING else len(NAMING), n))
  for name in [n for n in names if n not in NAMING]:
    rest = [n for n in names if n != name]
    if rest and [len(p) for p in _partition(groups, rest)] == [
        len(p) for p in _partition(groups, names)]:
      names = rest
  return tuple(names)


def read_sweep(path: str, targets: Optional[Mapping[str, scoring.WorkloadSpec]] = None
               ) -> Sweep:
  """The trials `scoring.score_experiment` scores under `path`, with their settings."""
  experiment, specs = scoring.read_experiment(path, targets)
  experiment, unfinished = finished.without_unfinished(experiment, specs)
  points: Dict[str, List[Point]] = {}
  for w, by_sub in experiment.trials.items():
    for s, studies in by_sub.items():
      for study, trials in studies.items():
        for t in trials:
          hparams = layout.read_hparams(t.directory) if t.directory else None
          points.setdefault(w, []).append(
              Point(w, s, study, t, hparams, settings_of(hparams, t.directory)))
  varying = {w: _varying(ps) for w, ps in points.items()}
  return Sweep(path, specs, points, varying, list(experiment.skipped), unfinished)


# ----------------------------------------------------------------------------- grouping


def variant(sweep: Sweep, point: Point, without: Sequence[str] = ()) -> Variant:
  """The point's values of the settings that vary on its workload, less `without`."""
  return tuple((k, point.settings.get(k)) for k in sweep.varying[point.workload]
               if k not in without and k in point.settings and _applies(k, point.settings))


def _shown(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def variant_label(v: Variant) -> str:
  """``'lr_schedule=cosine, step_hint_factor=0.5'``; ``''`` for the empty variant."""
  return ", ".join(f"{SHOWN.get(k, k)}={_shown(x)}" for k, x in v)


def series_label(submission: str, v: Variant) -> str:
  """``'NadamW + LAWA (lr_end_factor=0.5)'``."""
  name = catalog.label(submission) if submission in catalog.SUBMISSIONS else submission
  return f"{name} ({variant_label(v)})" if v else name


def _order(value: Any):
  return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _submission_order(submission: str):
  names = list(catalog.NAMES)
  return (names.index(submission), "") if submission in names else (len(names), submission)


def series(sweep: Sweep, workload: str, without: Sequence[str] = ()
           ) -> Dict[Tuple[str, Variant], Dict[str, List[Point]]]:
  """``{(submission, variant less without): {study: [points]}}`` of `workload`, submissions
  in `catalog` order, then variants by value."""
  out: Dict[Tuple[str, Variant], Dict[str, List[Point]]] = {}
  for p in sweep.points.get(workload, []):
    key = (p.submission, variant(sweep, p, without))
    out.setdefault(key, {}).setdefault(p.study, []).append(p)
  ordered = sorted(out, key=lambda k: (_submission_order(k[0]),
                                       [(n, _order(x)) for n, x in k[1]]))
  return {k: out[k] for k in ordered}


def spread(per_study: Sequence[float]) -> Spread:
  """`Spread` of per-study values (inf or NaN: a miss)."""
  values = tuple(float(v) for v in per_study)
  hits = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
  if not hits.size:
    return Spread(values, math.nan, math.nan, math.nan, math.nan)
  return Spread(values, float(hits.mean()), float(hits.min()), float(hits.max()),
                float(hits.std()))


# ----------------------------------------------------------------------------- values


def steps_to_target(points: Sequence[Point], spec: scoring.WorkloadSpec) -> float:
  """The fewest steps to target among `points` (one study's trials of one series); inf
  when none hits (`scoring.trial_to_target`)."""
  return min(scoring.trial_to_target(p.trial, spec)[0] for p in points)


def best_score(points: Sequence[Point], spec: scoring.WorkloadSpec) -> float:
  """The best validation metric over the evals of `points` (`scoring.best_metric`); NaN
  when none has a value."""
  values = [scoring.best_metric(p.trial, spec.minimize)[0] for p in points]
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return math.nan
  return min(values) if spec.minimize else max(values)


def by_learning_rate(sweep: Sweep, workload: str, value_of
                     ) -> Dict[Tuple[str, Variant], Dict[float, Spread]]:
  """``{series: {learning rate: Spread of value_of(points of a study, spec)}}`` for the
  points that state a learning rate (Fig. 4 with `steps_to_target`, Fig. 6 with
  `best_score`)."""
  spec = sweep.specs[workload]
  out: Dict[Tuple[str, Variant], Dict[float, Spread]] = {}
  for key, studies in series(sweep, workload, without=(LEARNING_RATE,)).items():
    by_lr: Dict[float, Dict[str, List[Point]]] = {}
    for study, points in studies.items():
      for p in points:
        lr = p.settings.get(LEARNING_RATE)
        if lr is not None:
          by_lr.setdefault(float(lr), {}).setdefault(study, []).append(p)
    if by_lr:
      out[key] = {lr: spread([value_of(ps, spec) for ps in per_study.values()])
                  for lr, per_study in sorted(by_lr.items())}
  return out


def curve_of(points: Sequence[Point], spec: scoring.WorkloadSpec) -> layout.Trial:
  """The trial a study shows for a series: its fastest to target, else its best."""
  trials = [p.trial for p in points]
  k = scoring.fastest_trial(trials, spec)
  if k is None:
    sign = 1.0 if spec.minimize else -1.0
    best = [(sign * scoring.best_metric(t, spec.minimize)[0], i) for i, t in enumerate(trials)]
    finite = [b for b in best if math.isfinite(b[0])]
    k = min(finite)[1] if finite else 0
  return trials[k]


def mean_curve(studies: Mapping[str, Sequence[Point]], spec: scoring.WorkloadSpec
               ) -> Tuple[np.ndarray, np.ndarray]:
  """(steps, mean metric over studies) of each study's `curve_of`, at the eval steps every
  study has (NaN evals skipped in the mean)."""
  trials = [curve_of(points, spec) for points in studies.values()]
  steps = trials[0].global_step
  for t in trials[1:]:
    steps = np.intersect1d(steps, t.global_step)
  stacked = np.array([[t.metric[np.searchsorted(t.global_step, s)] for s in steps]
                      for t in trials], dtype=np.float64).reshape(len(trials), len(steps))
  with warnings.catch_warnings():   # a step where every study has NaN stays NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.asarray(steps), np.nanmean(stacked, axis=0)


def learning_rates(point: Point, step_hint: int, steps: np.ndarray) -> np.ndarray:
  """The learning rate the point's optimizer runs at each of `steps`: its recipe's
  schedule (`recipes.learning_rate_schedule`) from its hyperparameters. `ValueError`
  naming the trial when its hyperparameters do not make a config."""
  optimizer = catalog.get(point.submission).optimizer
  config_of = hp.nadamw_config if optimizer == "nadamw" else hp.shampoo_config
  try:
    schedule = recipes.learning_rate_schedule(config_of(point.hparams), step_hint)
  except ValueError as e:
    raise ValueError(f"{point.trial.directory}: {e}") from None
  return np.asarray(schedule(np.asarray(steps)), dtype=np.float64)


# ----------------------------------------------------------------------------- Table 2

TABLE2_FIELDS = ("workload", "metric", "minimize", "submission", "variant", "num_studies",
                 "num_studies_with_value", "best_mean", "best_std", "best_per_study")


ALL_TRIALS = "all trials"   # Table 2's row of a submission's best over every variant


def _table2_row(w, spec, submission, label, studies) -> Dict[str, Any]:
  summary = spread([best_score(points, spec) for points in studies.values()])
  return {"workload": w, "metric": spec.metric, "minimize": spec.minimize,
          "submission": submission, "variant": label, "num_studies": len(studies),
          "num_studies_with_value": len(studies) - summary.misses,
          "best_mean": summary.mean, "best_std": summary.std,
          "best_per_study": summary.per_study}


def table2(sweep: Sweep) -> List[Dict[str, Any]]:
  """Table 2: per workload and submission, the best validation metric of each study
  (`best_score` over its trials) and its mean and population std over the studies with a
  value (`spread`): `scoring`'s ``best_metric``. Where settings vary, the row's variant is
  `ALL_TRIALS`, and a row per variant (its trials only) follows it."""
  rows = []
  for w in sorted(sweep.points):
    spec = sweep.specs[w]
    by_series = series(sweep, w)
    for s in dict.fromkeys(s for s, _ in by_series):
      mine = {k: v for k, v in by_series.items() if k[0] == s}
      if sweep.varying[w]:
        every: Dict[str, List[Point]] = {}
        for studies in mine.values():
          for study, points in studies.items():
            every.setdefault(study, []).extend(points)
        rows.append(_table2_row(w, spec, s, ALL_TRIALS, every))
      rows += [_table2_row(w, spec, s, variant_label(v), studies)
               for (_, v), studies in mine.items()]
  return rows


def _number(value: float, spec: str = "{:.5g}") -> str:
  return spec.format(value) if math.isfinite(value) else "-"


def table2_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 2 as markdown: a row per (submission, variant), a column per workload (its
  metric, and its direction as an arrow), cells ``mean ± std`` over studies."""
  workloads = list(dict.fromkeys(r["workload"] for r in rows))
  keys = list(dict.fromkeys((r["submission"], r["variant"]) for r in rows))
  cells = {(r["submission"], r["variant"], r["workload"]): r for r in rows}
  metric = {r["workload"]: r["metric"].split("/", 1)[-1] + ("↓" if r["minimize"] else "↑")
            for r in rows}
  with_variant = any(v for _, v in keys)
  header = ["submission"] + (["variant"] if with_variant else []) + [
      f"{w} {metric[w]}" for w in workloads]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s, v in keys:
    row = [catalog.label(s) if s in catalog.SUBMISSIONS else s] + ([v] if with_variant else [])
    for w in workloads:
      r = cells.get((s, v, w))
      row.append("" if r is None else
                 f"{_number(r['best_mean'])} ± {_number(r['best_std'], '{:.2g}')}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_table2_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Table 2 with the columns `TABLE2_FIELDS`; a study without a value is ``nan`` in
  ``best_per_study`` (``;``-separated), and an undefined mean or std an empty cell."""
  def cell(value):
    if isinstance(value, tuple):
      return ";".join(repr(x) for x in value)
    if isinstance(value, float) and not math.isfinite(value):
      return ""
    return repr(value) if isinstance(value, float) else str(value)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(TABLE2_FIELDS))
    writer.writeheader()
    writer.writerows({k: cell(r[k]) for k in TABLE2_FIELDS} for r in rows)

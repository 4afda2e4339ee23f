"""Offline averaging: replay EMA and LAWA over a grid from a run's params snapshots.

Ajroldi, Orvieto and Geiping (2025) tuned averaging offline (Sec. 3, App. E): save
the params every ``nu0`` steps once, then replay any averaging scheme whose
sampling interval ``nu`` is a multiple of ``nu0`` and evaluate it, with no
retraining. Figures 10-11 are the result: steps to the validation target over
``(nu, k)`` for LAWA and ``(nu, beta)`` for EMA.

A run writes snapshots with the hyperparameter ``snapshot_every = nu0``
(`weight_averaging.snapshots`): ``step_<t>.npz`` holds the params after update
``t`` (0-based) for every ``t % nu0 == 0``.

The replay uses the library's averagers themselves (`averagers.ema`,
`averagers.lawa`), so offline and online share one implementation. An averager
samples at ``t`` when ``t >= start_step and t % nu == 0``; every such ``t`` has a
snapshot, so the replay sets the state's step to ``t`` and calls ``update`` with
the snapshot (a non-sampling ``update`` changes nothing but the step count, so the
skipped calls need not be made). At an eval step ``s`` (the runner's
``global_step`` at an eval: ``s`` updates completed) the average holds every
sample with ``t <= s - 1``, exactly the averager state an online run evaluates at
``s``: with the online ``(nu, k)`` or ``(nu, beta)`` the offline evaluation is the
online one.

No averaging (the baseline) is read from the snapshots too: at eval step ``s`` the
latest snapshot ``t <= s - 1``, reported at its own step ``t + 1`` (so it is never
credited with steps it did not train; with ``nu0 = 1`` it is the live run).
Model state (batch-norm statistics) stays live, as online: that of the latest
snapshot.

Steps to target: the first eval step whose evaluation meets the workload's
validation target (``workload.has_reached_validation_target``), else null.

The results file (`run_offline`, ``scripts/offline_average.py``)::

  {"format": "weight_averaging.offline/1",
   "workload": str, "submission": str, "snapshot_dir": str,
   "snapshot_every": nu0, "start_step": int, "step_hint": int,
   "eval_steps": [s, ...],
   "target": {"metric": "validation/<name>", "value": float},
   "baseline": {"steps_to_target": int|null, "best_metric": float,
                "curve": [[step, metric], ...], "evals": [{"global_step": step, ...}]},
   "grid": [{"scheme": "ema"|"lawa", "every": nu, "k": int|null, "beta": float|null,
             "window": nu*k (LAWA) or nu/(1-beta) (EMA), in steps,
             "steps_to_target": int|null, "best_metric": float,
             "curve": [[step, metric], ...], "evals": [{"global_step": step, ...}]}]}

``metric`` is the validation target metric (``validation/<target_metric_name>``);
``best_metric`` its best value on the curve (lowest or highest as the target
says); ``evals`` the workload's full evaluation at each point.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from weight_averaging import averagers
from weight_averaging import placement
from weight_averaging import snapshots as snapshots_lib
from weight_averaging import validation

FORMAT = "weight_averaging.offline/1"
SCHEMES = ("ema", "lawa")


class GridPoint(NamedTuple):
  """One averaging scheme to replay: LAWA ``(every, k)`` or EMA ``(every, beta)``."""

  scheme: str
  every: int
  k: Optional[int] = None
  beta: Optional[float] = None

  @property
  def window(self) -> float:
    """The averaging window in steps: ``every * k`` (LAWA), ``every / (1 - beta)`` (EMA)."""
    if self.scheme == "lawa":
      return float(self.every * self.k)
    return self.every / (1.0 - self.beta)


def _is_int(value) -> bool:
  return (not isinstance(value, (bool, np.bool_))
          and isinstance(value, (int, np.integer, float, np.floating))
          and math.isfinite(float(value)) and float(value).is_integer())


def make_grid(every: Iterable[Any], lawa_k: Iterable[Any] = (),
              ema_beta: Iterable[Any] = (), snapshot_every: int = 1) -> List[GridPoint]:
  """The grid ``every x lawa_k`` (LAWA) plus ``every x ema_beta`` (EMA), validated.

  Each ``every`` must be a multiple of ``snapshot_every`` (``nu0``): only then is
  every step the averager samples a snapshot. ``k >= 1``, ``beta`` in [0, 1).
  """
  every, lawa_k, ema_beta = list(every), list(lawa_k), list(ema_beta)
  if not every:
    raise ValueError("every: give at least one sampling interval nu")
  if not lawa_k and not ema_beta:
    raise ValueError("give at least one lawa_k or ema_beta to replay")
  if not _is_int(snapshot_every) or snapshot_every < 1:
    raise ValueError(f"snapshot_every must be an integer >= 1, got {snapshot_every!r}")
  nus = []
  for nu in every:
    if not _is_int(nu) or nu < 1:
      raise ValueError(f"every must hold integers >= 1, got {nu!r}")
    if int(nu) % int(snapshot_every):
      raise ValueError(
          f"every = {nu} is not a multiple of the snapshot interval nu0 = "
          f"{snapshot_every}: the averager would sample steps that have no snapshot")
    nus.append(int(nu))
  ks = []
  for k in lawa_k:
    if not _is_int(k) or k < 1:
      raise ValueError(f"lawa_k must hold integers >= 1, got {k!r}")
    ks.append(int(k))
  betas = []
  for beta in ema_beta:
    if (isinstance(beta, (bool, np.bool_)) or not isinstance(
        beta, (int, float, np.integer, np.floating)) or not 0.0 <= float(beta) < 1.0):
      raise ValueError(f"ema_beta must hold numbers in [0, 1), got {beta!r}")
    betas.append(float(beta))
  return ([GridPoint("lawa", nu, k=k) for nu in nus for k in ks]
          + [GridPoint("ema", nu, beta=b) for nu in nus for b in betas])


def averager_for(point: GridPoint, start_step: int = 0) -> averagers.Averager:
  """The library averager a grid point stands for (as the submissions build it)."""
  if point.scheme == "lawa":
    return averagers.lawa(point.k, every=point.every, start_step=start_step)
  if point.scheme == "ema":
    return averagers.ema(point.beta, every=point.every, start_step=start_step)
  raise ValueError(f"scheme must be one of {SCHEMES}, got {point.scheme!r}")


def default_eval_steps(snapshot_steps: Sequence[int], eval_every: int,
                       trained_steps: Optional[int] = None) -> List[int]:
  """Multiples of `eval_every` up to the last step the snapshots vouch for.

  The run completed at least ``t_max + 1`` updates (``t_max`` the last snapshot),
  or `trained_steps` (recorded at every eval) if larger; that last step itself is
  included, as the runner evaluates at the end of training.
  """
  if not _is_int(eval_every) or eval_every < 1:
    raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
  if not snapshot_steps:
    raise ValueError("no snapshots to replay")
  reached = max(max(snapshot_steps) + 1, trained_steps or 0)
  steps = list(range(int(eval_every), reached + 1, int(eval_every)))
  if trained_steps and trained_steps not in steps:
    steps.append(int(trained_steps))
  return steps


class Snapshots:
  """A snapshot directory, read on demand (with a small cache) as params pytrees."""

  def __init__(self, directory: str, like: Any, cache_bytes: int = 1 << 30):
    self.directory = directory
    self.manifest = snapshots_lib.read_manifest(directory)
    self.steps = snapshots_lib.snapshot_steps(directory)
    if not self.steps:
      raise ValueError(f"{directory} holds no snapshots")
    self._like = like
    self._cache: Dict[int, Any] = {}
    self._budget = cache_bytes
    # Checks the structure once, up front.
    self.get(self.steps[0])

  @property
  def every(self) -> int:
    return self.manifest.snapshot_every

  def latest(self, step: int) -> Optional[int]:
    """The latest snapshot step ``t <= step``, or None."""
    candidates = [t for t in self.steps if t <= step]
    return candidates[-1] if candidates else None

  def get(self, step: int):
    if step in self._cache:
      return self._cache[step]
    if step not in self.steps:
      raise ValueError(
          f"snapshot {step} is missing from {self.directory} (it has "
          f"{len(self.steps)} snapshots, steps {self.steps[0]}..{self.steps[-1]}): was "
          "the run stopped before it was written?")
    tree = snapshots_lib.load(self.directory, step, self._like, self.manifest)
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    if size * (len(self._cache) + 1) <= self._budget:
      self._cache[step] = tree
    return tree


def replay(averager: averagers.Averager, every: int, start_step: int,
           snapshots: Snapshots, eval_steps: Sequence[int]):
  """Yields ``(s, averaged params, latest snapshot step)`` at each eval step ``s``.

  ``update`` is called once per sampled step ``t`` (``t >= start_step``,
  ``t % every == 0``) with the state's step set to ``t``; before anything is
  sampled the average is the latest snapshot's params (the averager's own rule).
  """
  update = jax.jit(averager.update)
  average = jax.jit(averager.average)
  first = snapshots.get(snapshots.steps[0])["params"]
  state = averager.init(first)
  t = start_step + (-start_step) % every  # the first sampled step
  for s in sorted(eval_steps):
    while t <= s - 1:
      state = update(state._replace(step=jnp.asarray(t, jnp.int32)),
                     snapshots.get(t)["params"])
      t += every
    latest = snapshots.latest(s - 1)
    if latest is None:
      raise ValueError(f"eval step {s} precedes the first snapshot {snapshots.steps[0]}")
    yield s, jax.device_get(average(state, snapshots.get(latest)["params"])), latest


# ----------------------------------------------------------------------------
# Workloads and evaluation.


def load_workload(name: str, api: str = "jit"):
  """The embedded workload `name`, else AlgoPerf's (when installed) by its registry name."""
  from weight_averaging import workloads  # pylint: disable=g-import-not-at-top
  if name in workloads.WORKLOADS:
    return workloads.get_workload(name, api=api)
  try:
    from algoperf.workloads import workloads as registry  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"unknown workload {name!r}: not embedded "
                     f"({sorted(workloads.WORKLOADS)}) and algoperf is not installed") from e
  if name not in registry.WORKLOADS:
    raise ValueError(f"unknown workload {name!r}; algoperf has {sorted(registry.WORKLOADS)}")
  info = registry.WORKLOADS[name]
  path = os.path.join(registry.BASE_WORKLOADS_DIR, info["workload_path"] + "_jax",
                      "workload.py")
  return registry.import_workload(workload_path=path,
                                  workload_class_name=info["workload_class_name"])


def _like(workload, api: str):
  """The unreplicated ``{"params", "model_state"}`` structure the snapshots hold."""
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
  tree = {"params": params, "model_state": model_state}
  return jax.device_get(placement.pmap_unreplicate(tree) if api == "pmap" else tree)


def _for_eval(tree, api: str):
  """What `eval_model` takes: under pmap one copy per device (a leading device axis)."""
  return placement.pmap_replicate(tree) if api == "pmap" else tree


def _summary(workload, evals: List[Dict[str, Any]], metric: str) -> Dict[str, Any]:
  curve = [[e["global_step"], e[metric]] for e in evals]
  hit = next((e["global_step"] for e in evals
              if workload.has_reached_validation_target(e)), None)
  values = [v for _, v in curve]
  # Lower is better unless the target is met from above (e.g. accuracy).
  higher = False
  if values:
    probe = dict(evals[0])
    probe[metric] = math.inf
    higher = bool(workload.has_reached_validation_target(probe))
  best = (max(values) if higher else min(values)) if values else None
  return {"steps_to_target": hit, "best_metric": best, "curve": curve, "evals": evals}


def run_offline(snapshot_dir: str, grid: Sequence[GridPoint], workload: Any = None, *,
                workload_name: str = "teacher_student", api: str = "jit",
                eval_every: Optional[int] = None,
                eval_steps: Optional[Sequence[int]] = None, start_step: int = 0,
                submission: str = "", data_dir: Optional[str] = None,
                progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
  """Replays every grid point and the baseline from `snapshot_dir`; the results dict.

  Args:
    snapshot_dir: a directory written with ``snapshot_every`` (`snapshots`).
    grid: from `make_grid`; each ``every`` must be a multiple of the snapshots' nu0.
    workload: an AlgoPerf-style workload (``init_model_fn``, ``eval_model``,
      ``has_reached_validation_target``); default `load_workload(workload_name)`.
    api: ``'pmap'`` when `workload` expects params with a leading device axis.
    eval_every / eval_steps: evaluate at multiples of `eval_every` (default the
      workload's ``eval_every_steps``) up to the last trained step, or exactly at
      `eval_steps`.
    start_step: the averagers' ``start_step`` (the online ``averaging_start_step``).
    submission: a label stored in the results.
    progress: called with a line per grid point.

  Returns:
    The results dict documented in the module docstring.
  """
  if workload is None:
    workload = load_workload(workload_name, api=api)
  start_step = validation.check_int("start_step", start_step, 0)
  snaps = Snapshots(snapshot_dir, _like(workload, api))
  nu0 = snaps.every
  for point in grid:
    if point.every % nu0:
      raise ValueError(f"every = {point.every} is not a multiple of the snapshot "
                       f"interval nu0 = {nu0} of {snapshot_dir}")
  if eval_steps is None:
    eval_steps = default_eval_steps(
        snaps.steps, eval_every or getattr(workload, "eval_every_steps", nu0),
        snaps.manifest.trained_steps)
  eval_steps = sorted({int(s) for s in eval_steps})
  if not eval_steps or eval_steps[0] < 1:
    raise ValueError(f"eval steps must be >= 1, got {eval_steps[:3]}...")
  metric = "validation/" + getattr(workload, "target_metric_name", "loss")
  rng = jax.random.PRNGKey(0)

  def evaluate(step, params, model_state):
    result = workload.eval_model(
        getattr(workload, "eval_batch_size", 256), _for_eval(params, api),
        _for_eval(model_state, api), rng, data_dir, None, step)
    return dict(result, global_step=int(step))

  # The baseline: the latest snapshot at or before each eval step, at its own step.
  baseline_steps = sorted({snaps.latest(s - 1) for s in eval_steps} - {None})
  baseline = []
  for t in baseline_steps:
    tree = snaps.get(t)
    baseline.append(evaluate(t + 1, tree["params"], tree["model_state"]))
  results = {
      "format": FORMAT, "workload": getattr(workload, "name", workload_name),
      "submission": submission, "snapshot_dir": os.path.abspath(snapshot_dir),
      "snapshot_every": nu0, "start_step": start_step,
      "step_hint": getattr(workload, "step_hint", None), "eval_steps": eval_steps,
      "target": {"metric": metric,
                 "value": getattr(workload, "validation_target_value", None)},
      "baseline": _summary(workload, baseline, metric), "grid": []}
  for point in grid:
    evals = []
    for s, params, latest in replay(averager_for(point, start_step), point.every,
                                    start_step, snaps, eval_steps):
      evals.append(evaluate(s, params, snaps.get(latest)["model_state"]))
    entry = {"scheme": point.scheme, "every": point.every, "k": point.k,
             "beta": point.beta, "window": point.window}
    entry.update(_summary(workload, evals, metric))
    results["grid"].append(entry)
    if progress is not None:
      progress(f"{point.scheme} every={point.every} "
               f"{'k=%d' % point.k if point.k else 'beta=%g' % point.beta}: "
               f"steps to target {entry['steps_to_target']}, best {entry['best_metric']}")
  return results


def write_results(results: Dict[str, Any], path: str) -> None:
  """Writes `results` as JSON (atomically)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1)
  os.replace(tmp, path)

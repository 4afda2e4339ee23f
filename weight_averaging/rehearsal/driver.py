"""One workload's rehearsal, in its own process, run from the AlgoPerf checkout:

  python -m weight_averaging.rehearsal.driver --workload=ogbg \
      --submissions=reference_nadamw,nadamw --output_dir=/tmp/rehearsal --steps=6 \
      --batch_size=8 --alias=wa_algoperf_submissions --repo=. --memory_limit=12884901888

(`launch.run_workload` starts it, with the alias's folder on ``PYTHONPATH``.)

The workload is built once (algoperf's fake-batch workload of
``tests/reference_algorithm_tests.py``, with the real model); each submission then runs
through ``submission_runner.train_once``, unchanged, and its cell's JSON is written as soon
as it is done (`cells.save_result`). The only patches are the workload's: its input
pipeline and eval sizes (algoperf's test harness), an eval schedule by step (the runner's
is by wall time: ``eval_period_time_sec`` is 0 after the steps of `cells.eval_steps` and
infinite otherwise), and neither targets nor the runtime budget that could end a run early
(fake data may meet a target; compiles on a shared CPU may exceed mnist's budget).
The submission's functions are wrapped, never edited: the wrappers time each
``update_params`` (waiting for its result) and fingerprint the params
``prepare_for_eval`` is handed (the live ones) and returns (the average).

Per cell: the main run (evals at `cells.eval_steps`); for an averaging submission a twin
that evals only at the end, whose live params and average at the end must equal the main
run's (training after each eval went on from the live params); the restore check (a run
stopped after the checkpoint of `cells.preempt_step`, then a new ``train_once`` on the
same directory, which restores through ``checkpoint_utils.maybe_restore_checkpoint``,
continues, and must equal the main run: live params, average, last eval row).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import importlib
import math
import os
import resource
import shutil
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from weight_averaging.rehearsal import cells


# What the runner adds to an eval row (times): not the model's metrics.
RUNNER_KEYS = ("score", "total_duration")


class Preempted(Exception):
  """Raised by the update wrapper to stop a run the way a preemption would."""


class Schedule:
  """Which steps eval, the step the runner is at, and the eval rows (shared by wrappers)."""

  def __init__(self):
    self.evals, self.done, self.rows = set(), 0, []

  def reset(self, evals):
    self.evals, self.done, self.rows = set(evals), 0, []


def digest(tree) -> str:
  """sha256 of every leaf's dtype, shape and bytes, in flattening order."""
  import jax
  import numpy as np
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def tree_bytes(tree) -> int:
  import jax
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))


def state_bytes(params, optimizer_state) -> Dict[str, int]:
  """Device bytes of the four parts; ours keep a `TrainState` as element 0."""
  state = optimizer_state[0] if isinstance(optimizer_state, tuple) else optimizer_state
  if hasattr(state, "stash") and hasattr(state, "averager"):
    return dict(params=tree_bytes(params), optimizer=tree_bytes(state.optimizer),
                averaging=tree_bytes(state.averager), stash=tree_bytes(state.stash))
  return dict(params=tree_bytes(params), optimizer=tree_bytes(optimizer_state),
              averaging=0, stash=0)


class Recorder:
  """Wraps a submission's functions for one run (signatures kept: the runner inspects
  ``update_params`` for ``train_state``)."""

  def __init__(self, schedule: Schedule, preempt_at: Optional[int] = None):
    self.schedule, self.preempt_at = schedule, preempt_at
    self.updates, self.times, self.prepares, self.memory = [], [], [], None

  def init(self, fn):
    @functools.wraps(fn)
    def wrapper(workload, model_params, model_state, hyperparameters, rng):
      out = fn(workload, model_params, model_state, hyperparameters, rng)
      self.memory = state_bytes(model_params, out)
      return out
    return wrapper

  def update(self, fn):
    import jax

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      step = int(kwargs["global_step"])
      if step == self.preempt_at:
        raise Preempted(f"preempted before step {step}")
      start = time.perf_counter()
      out = fn(*args, **kwargs)
      jax.block_until_ready(out[1])
      self.times.append(time.perf_counter() - start)
      self.updates.append(step)
      self.schedule.done = step + 1
      return out
    return wrapper

  def prepare(self, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      live = digest(kwargs["current_param_container"])
      out = fn(*args, **kwargs)
      self.prepares.append(dict(step=int(kwargs["global_step"]), live=live,
                                returned=digest(out[1]), model_state=digest(out[2])))
      return out
    return wrapper


class Rehearsal:
  """The algoperf side of one process: the workload, built once, and `train`."""

  def __init__(self, workload_name: str, batch_size: int, steps: int, runs_dir: str):
    import jax
    from absl import flags
    import submission_runner
    from tests import reference_algorithm_tests as rat
    from algoperf import logger_utils
    from algoperf.workloads import workloads
    flags.FLAGS(["rehearse", "--framework=jax", "--tuning_ruleset=external",
                 f"--num_train_steps={10 * steps + 100}"])  # the fake queue's length
    # The fake workload logs evals through the runner's real logger, which lacks this.
    logger_utils.MetricLogger.append_eval_metrics = lambda self, result: None
    self.runner, self.workloads = submission_runner, workloads
    self.name, self.batch_size, self.steps, self.runs_dir = (workload_name, batch_size,
                                                             steps, runs_dir)
    meta = submission_runner.WORKLOADS[workload_name]
    cls = workloads.import_workload(
        workload_path=os.path.join(submission_runner.BASE_WORKLOADS_DIR,
                                   meta["workload_path"] + "_jax", "workload.py"),
        workload_class_name=meta["workload_class_name"], return_class=True)
    self.workload = rat._make_one_batch_workload(  # pylint: disable=protected-access
        cls, workload_name, "jax", batch_size, True, jax.local_device_count())
    self.schedule = _schedule_workload(self.workload)

  def load(self, name: str, alias: str):
    path = cells.REFERENCE_PATH if name == cells.REFERENCE else f"{alias}/jit/{name}/submission.py"
    return importlib.import_module(self.workloads.convert_filepath_to_module(path))

  def train(self, module, point: Dict[str, Any], log_dir: str, evals, preempt_at=None):
    """One ``train_once`` of `module` at `point`; the `Recorder` of what it saw."""
    from algoperf import random_utils as prng
    from algoperf.profiler import PassThroughProfiler
    self.schedule.reset(evals)
    # As in a fresh runner: the runner attaches its logger only after the optimizer's init.
    self.workload.metrics_logger = None
    rec = Recorder(self.schedule, preempt_at)
    hyperparameters = collections.namedtuple("Hyperparameters", point)(**point)
    try:
      self.runner.train_once(
          self.workload, self.name, self.batch_size, self.batch_size, self.runs_dir, None,
          rec.init(module.init_optimizer_state), rec.update(module.update_params),
          module.data_selection, rec.prepare(module.prepare_for_eval), hyperparameters,
          0, prng.PRNGKey(0), PassThroughProfiler(), max_global_steps=self.steps,
          log_dir=log_dir, save_checkpoints=True)
    except Preempted:
      pass
    rec.rows = list(self.schedule.rows)
    return rec


def _schedule_workload(workload) -> Schedule:
  """Evals by step instead of wall time, no target or budget ends the run, eval rows
  recorded."""
  schedule = Schedule()
  base = type(workload)

  class Rehearsed(base):  # pylint: disable=abstract-method
    @property
    def eval_period_time_sec(self):
      return 0.0 if schedule.done in schedule.evals else math.inf

    @property
    def max_allowed_runtime_sec(self):
      return math.inf  # compiles on a shared CPU must not end the few steps early

    def has_reached_validation_target(self, eval_result):
      return False

    def has_reached_test_target(self, eval_result):
      return False

    def eval_model(self, *args, **kwargs):
      result = super().eval_model(*args, **kwargs)
      schedule.rows.append((schedule.done, {k: float(v) for k, v in result.items()}))
      return result

  workload.__class__ = Rehearsed
  return schedule


# ----------------------------------------------------------------------------
# Checks.


def check_main(rec: Recorder, steps: int, log_dir: str) -> Optional[str]:
  """None if the main run did what a rehearsal asks, else what it did not do."""
  evals = cells.eval_steps(steps)
  if rec.updates != list(range(steps)):
    return f"update_params ran at steps {rec.updates}, expected 0..{steps - 1}"
  if [p["step"] for p in rec.prepares] != evals:
    return f"prepare_for_eval at {[p['step'] for p in rec.prepares]}, expected {evals}"
  if [s for s, _ in rec.rows] != evals:
    return f"evals at {[s for s, _ in rec.rows]}, expected {evals}"
  bad = sorted({k for _, r in rec.rows for k, v in r.items() if not math.isfinite(v)})
  if bad:
    return f"non-finite eval metrics: {', '.join(bad)}"
  if not any(f.startswith("checkpoint_") for f in os.listdir(log_dir)):
    return f"no checkpoint written in {log_dir}"
  return None


def compare(reference: Recorder, other: Recorder, rows: bool) -> str:
  """'equal' if `other` ends where `reference` does (live params, average, last eval)."""
  a, b = reference.prepares[-1], other.prepares[-1] if other.prepares else {}
  diffs = [k for k in ("live", "returned", "model_state") if a.get(k) != b.get(k)]
  if rows:
    ra, rb = dict(reference.rows), dict(other.rows)
    last = reference.rows[-1][0]
    if last not in rb:
      diffs.append(f"no eval at step {last}")
    else:
      keys = [k for k in ra[last] if k not in RUNNER_KEYS and "time" not in k
              and not math.isclose(ra[last][k], rb[last].get(k, math.nan), rel_tol=1e-6)]
      diffs += [f"eval {k}" for k in keys]
  names = {"live": "live params", "returned": "eval params", "model_state": "model state"}
  return "equal" if not diffs else "differs: " + ", ".join(names.get(d, d) for d in diffs)


def continuation(main: Recorder, twin: Recorder) -> str:
  """The twin evals only at the end: equal ends mean training after each eval of the main
  run went on from the live params. Shown only where an eval's params were not the live
  ones (an average equal to the live params would hide a wrong swap)."""
  verdict = compare(main, twin, rows=False)
  if verdict == "equal" and all(p["live"] == p["returned"] for p in main.prepares[:-1]):
    return "equal (not shown: each eval's average equalled the live params)"
  return verdict


# ----------------------------------------------------------------------------
# One cell.


def _fresh(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def restore_check(r: Rehearsal, module, point, main: Recorder, cell_dir: str) -> str:
  """The run stopped after its checkpoint at `cells.preempt_step`, restored by a new
  ``train_once`` on the same directory and continued, against `main`.

  At 2c90454f the runner's JAX restore fails before any submission code runs: it restores
  ``eval_results`` against a target of None (flax gives None back) and then calls
  ``.items()`` on it (algoperf/checkpoint_utils.py:127). Where that happens the restore is
  tried once more with only that bypassed (`_eval_results_bypass`), so that what follows,
  ``replicate_checkpoint`` and the submission's next steps, is checked too."""
  log_dir = _fresh(os.path.join(cell_dir, "restore"))
  evals = cells.eval_steps(r.steps)
  first = r.train(module, point, log_dir, evals, preempt_at=cells.preempt_step(r.steps))
  if first.updates != list(range(cells.preempt_step(r.steps))):
    return f"failed: the first leg ran steps {first.updates}"
  verdict = _resume(r, module, point, main, log_dir)
  if EVAL_RESULTS_BUG not in verdict:
    return verdict
  with _eval_results_bypass():
    return f"{verdict}; with eval_results bypassed: {_resume(r, module, point, main, log_dir)}"


# The message of upstream's restore of eval_results (None.items()).
EVAL_RESULTS_BUG = "'NoneType' object has no attribute 'items' (at algoperf/checkpoint_utils.py"


def _resume(r: Rehearsal, module, point, main: Recorder, log_dir: str) -> str:
  try:
    resumed = r.train(module, point, log_dir, cells.eval_steps(r.steps))
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return "failed: " + cells.with_origin(traceback.format_exc())
  if not resumed.updates or resumed.updates[0] != cells.preempt_step(r.steps):
    return f"failed: not restored (resumed at step {resumed.updates[:1]})"
  return compare(main, resumed, rows=True)


@contextlib.contextmanager
def _eval_results_bypass():
  """Upstream's restore with ``eval_results`` coming back empty instead of None (the eval
  history is lost; params, model state, optimizer state and step restore unchanged)."""
  from algoperf import checkpoint_utils
  flax_checkpoints = checkpoint_utils.flax_checkpoints
  original = flax_checkpoints.restore_checkpoint

  def restore(*args, **kwargs):
    out = original(*args, **kwargs)
    if isinstance(out, dict) and out.get("eval_results") is None:
      out = dict(out, eval_results={})
    return out

  flax_checkpoints.restore_checkpoint = restore
  try:
    yield
  finally:
    flax_checkpoints.restore_checkpoint = original


def planned(workload: str, name: str, point: Dict[str, Any], repo: str, algoperf_root: str):
  """memory_plan's bytes for this cell on one device (replicated = one device's share),
  the state's four parts and the step's gradients and temporaries;
  the reference NadamW's state is NadamW's: planned from our nadamw's point."""
  from weight_averaging.studies import memory_plan, workload_facts
  if workload not in workload_facts.ALGOPERF_WORKLOADS:
    return None  # mnist: no plan (and nothing to guard)
  sub = "nadamw" if name == cells.REFERENCE else name
  if name == cells.REFERENCE:
    point = cells.first_point(cells.search_space("nadamw", repo, algoperf_root), "nadamw")
  if name in cells.AVERAGING:
    point = dict(point, averaging_placement="replicated")
  row = memory_plan.plan_row(workload, sub, memory_plan.LEADERBOARD, point, api="jit")
  return dict({k: int(getattr(row.footprint, k)) for k in cells.MEMORY_FIELDS},
              gradients=row.gradients, temporaries=row.temporaries)


def run_cell(r: Rehearsal, name: str, args, ref_time: Optional[float]) -> Dict[str, Any]:
  extra = dict(batch_size=r.batch_size, steps=r.steps, input=cells.INPUT)
  point = cells.first_point(cells.search_space(name, args.repo, os.getcwd()), name)
  plan = planned(r.name, name, point, args.repo, os.getcwd())
  reason = plan and cells.memory_skip_reason(plan, cells.available_bytes(args.memory_limit))
  if reason:
    return cells.skipped(r.name, name, reason, plan=plan, **extra)
  module = r.load(name, args.alias)
  cell_dir = os.path.join(args.output_dir, "_runs", r.name, name)
  main_dir = _fresh(os.path.join(cell_dir, "main"))
  try:
    main = r.train(module, point, main_dir, cells.eval_steps(r.steps))
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return cells.failed(r.name, name, traceback.format_exc(), plan=plan, **extra)
  sec = cells.step_seconds(main.times)
  result = dict(workload=r.name, submission=name, status="passed", plan=plan,
                memory=main.memory, sec_per_step=sec,
                step_times=[round(t, 4) for t in main.times],  # the first one compiles
                ratio=sec / ref_time if sec and ref_time else None, **extra)
  problem = check_main(main, r.steps, main_dir)
  if problem is None and name in cells.AVERAGING and not args.no_twin:
    twin = r.train(module, point, _fresh(os.path.join(cell_dir, "twin")), [r.steps])
    result["continuation"] = continuation(main, twin)
    if result["continuation"] != "equal":
      problem = "training after the eval did not go on from the live params: " + \
          result["continuation"]
  if problem is not None:
    result.update(status="failed", reason=problem)
  result["restore"] = "not run" if args.no_restore else restore_check(r, module, point, main,
                                                                      cell_dir)
  if plan:
    result["memory_vs_plan"] = cells.memory_mismatches(main.memory, plan) or "match"
  result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if not args.keep_runs:
    shutil.rmtree(cell_dir, ignore_errors=True)
  return result


def saved_reference_seconds(output_dir: str, workload: str, steps: int,
                            batch_size: int) -> Optional[float]:
  """The reference's seconds per step from its result file, if it passed at the same
  steps and batch size: the ratio's denominator for cells run in a process of their own
  (`launch.rehearse`'s ``process_per_cell``). A reference run in this process replaces it."""
  ref = cells.load_result(output_dir, workload, cells.REFERENCE)
  if (ref is None or ref.get("status") != "passed" or ref.get("steps") != steps
      or ref.get("batch_size") != batch_size):
    return None
  return ref.get("sec_per_step")


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True)
  p.add_argument("--submissions", required=True, help="comma-separated, in running order")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--batch_size", type=int, required=True)
  p.add_argument("--alias", required=True, help="import path of our submissions/ folder")
  p.add_argument("--repo", required=True, help="this repository (search spaces)")
  p.add_argument("--memory_limit", type=int, required=True, help="bytes")
  p.add_argument("--no_twin", action="store_true")
  p.add_argument("--no_restore", action="store_true")
  p.add_argument("--keep_runs", action="store_true")
  args = p.parse_args(argv)
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  r = Rehearsal(args.workload, args.batch_size, args.steps,
                _fresh(os.path.join(args.output_dir, "_runs", args.workload, "_data")))
  ref_time = saved_reference_seconds(args.output_dir, args.workload, args.steps,
                                     args.batch_size)
  for name in args.submissions.split(","):
    print(f"rehearsal: {args.workload} x {name} ...", file=sys.stderr, flush=True)
    try:
      result = run_cell(r, name, args, ref_time)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      result = cells.failed(args.workload, name, traceback.format_exc())
    if name == cells.REFERENCE:  # this process's reference: the denominator from now on
      ref_time = result.get("sec_per_step") if result["status"] == "passed" else None
      result["ratio"] = 1.0 if ref_time else None
    cells.save_result(args.output_dir, result)
    print(f"rehearsal: {args.workload} x {name}: {result['status']} "
          f"{result.get('reason', '')}", file=sys.stderr, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A whole experiment: the search space's trials, in the official layout.

``<experiment_dir>/<experiment_name>/<workload>_jax/trial_<n>/`` holds, per trial,
``hparams.json``, ``meta_data_0.json``, ``flags_0.json``, ``eval_measurements.csv``
and the latest checkpoint (`weight_averaging.layout` names them). An existing
experiment is refused without ``overwrite`` or ``resume_last_run`` (never a
prompt); a resumed trial keeps the hyperparameters it started with.

Nothing is written before everything that can be checked is: the settings, the
submission (loaded, and built for this API), the search space and every trial's
hyperparameters (run through the submission's own ``init_optimizer_state``), so that
a corrected command runs without ``--overwrite``. While it runs, the experiment is
locked (``<experiment_dir>/<experiment_name>/.<workload>_jax.lock``, holding the
runner's pid): a second runner on it is refused, naming that pid.

With several processes every process runs the same trials; process 0 alone writes
the files and holds the lock, and barriers keep the others from reading files
half-written.

``tuning_ruleset='self'`` is the official runner's self-tuning ruleset: one trial,
``hyperparameters=None`` (``hparams.json`` holds ``null``), no search space, and
1.5x the workload's runtime budget.

``hparam_start_index`` / ``hparam_end_index`` run only the trials ``start+1 .. end`` of the
search space (the official runner's flags, with its ``trial_<n>`` numbering), so that one
trial can run alone: a trunk that keeps checkpoints (``checkpoint_steps``) or a branch that
starts from one (``branch``, checked by `branch.check_branch` before anything is written).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import jax

from weight_averaging import layout, processes, workloads
from weight_averaging.runner import branch as branch_lib
from weight_averaging.runner import distributed, search_space, submissions
from weight_averaging.runner.trial import TrialResult, run_trial, step_settings, trial_keys

RULESETS = ("external", "self")
# The official runner's runtime budget under self-tuning (submission_runner.py,
# `train_once`: ``1.5 * workload.max_allowed_runtime_sec``).
SELF_TUNING_BUDGET_FACTOR = 1.5


def prepare_experiment_dir(log_dir: str, overwrite: bool, resume: bool) -> None:
  """Refuses to touch an existing experiment unless told how; never prompts.

  With several processes every one checks before process 0 changes anything, so
  they all take the same decision.
  """
  if overwrite and resume:
    raise ValueError("--overwrite and --resume_last_run exclude each other")
  exists = os.path.exists(log_dir)
  distributed.barrier("experiment_dir_checked")
  if exists:
    if overwrite:
      if distributed.is_primary():
        shutil.rmtree(log_dir)
    elif not resume:
      raise FileExistsError(
          f"experiment directory {log_dir} exists: pass --overwrite to replace it or "
          f"--resume_last_run to continue it")
  if distributed.is_primary():
    os.makedirs(log_dir, exist_ok=True)
  distributed.barrier("experiment_dir_ready")


def _trial_point(trial_dir: str, point: Dict[str, Any]) -> Dict[str, Any]:
  """The trial's hyperparameters: those it started with, when it has started."""
  if not os.path.exists(os.path.join(trial_dir, layout.HPARAMS_FILE)):
    return point
  return layout.read_hparams(trial_dir)


def _metadata(*, workload_name: str, api: str, submission_path: str, rng_seed: int,
                 trial: int) -> Dict[str, Any]:
  """``meta_data_0.json``: what ran, and on which versions and devices."""
  return {"workload": workload_name, "api": api, "submission_path": submission_path,
          "rng_seed": rng_seed, "trial": trial, "jax_version": jax.__version__,
          "num_devices": jax.device_count(), "num_processes": jax.process_count(),
          "backend": jax.default_backend(), "python": sys.version.split()[0]}


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)


def _write_trial_records(trial_dir: str, point: Dict[str, Any], meta: Dict[str, Any],
                        flag_values: Optional[Dict[str, Any]]) -> None:
  """The trial's hyperparameters (kept if already written), metadata and flags."""
  os.makedirs(trial_dir, exist_ok=True)
  hparams_path = os.path.join(trial_dir, layout.HPARAMS_FILE)
  if not os.path.exists(hparams_path):
    _write_json(hparams_path, point)
  _write_json(os.path.join(trial_dir, layout.META_FILE), meta)
  _write_json(os.path.join(trial_dir, layout.FLAGS_FILE), flag_values or {})


def _trial_points(tuning_ruleset: str, tuning_search_space: Optional[str],
                  num_tuning_trials: int, rng_seed: int) -> List[Optional[Dict[str, Any]]]:
  """The search space's points (external tuning), or ``[None]`` (self-tuning)."""
  if tuning_ruleset == "external":
    return search_space.load_search_space(tuning_search_space, num_tuning_trials,
                                          rng_seed)
  if tuning_ruleset != "self":
    raise ValueError(f"--tuning_ruleset must be one of {RULESETS}, got {tuning_ruleset!r}")
  if tuning_search_space:
    raise ValueError("--tuning_search_space cannot be given with --tuning_ruleset=self: "
                     "the submission tunes itself (it gets hyperparameters=None)")
  if num_tuning_trials != 1:
    raise ValueError(f"--num_tuning_trials={num_tuning_trials} with "
                     "--tuning_ruleset=self: self-tuning runs one trial; drop the flag")
  return [None]


def _resolved_points(points: List[Optional[Dict[str, Any]]], num_tuning_trials: int,
                     tuning_search_space: Optional[str], log_root: str, resume: bool
                     ) -> List[Tuple[Optional[Dict[str, Any]], str]]:
  """Each trial's ``(hyperparameters, where they come from)``: the search space's point,
  or, resuming, the trial's own ``hparams.json``."""
  if tuning_search_space and len(points) < num_tuning_trials:
    raise ValueError(f"--num_tuning_trials={num_tuning_trials}, but the search space "
                     f"{tuning_search_space} lists {len(points)} point(s): pass "
                     f"--num_tuning_trials={len(points)} or add points")
  out = []
  for n, point in enumerate(points, start=1):
    trial_dir = layout.trial_dir(log_root, n)
    if resume and os.path.exists(os.path.join(trial_dir, layout.HPARAMS_FILE)):
      out.append((_trial_point(trial_dir, point),
                  os.path.join(trial_dir, layout.HPARAMS_FILE)))
    else:
      out.append((point, f"point {n} of {tuning_search_space}" if tuning_search_space
                  else "self-tuning (hyperparameters=None)"))
  return out


def check_hyperparameters(workload, submission, points, rng_seed: int) -> None:
  """Runs each ``(point, source)`` through the submission's own ``init_optimizer_state``
  (on the workload's initial parameters), so that a bad hyperparameter is an error,
  naming where it comes from, before anything is written. The states are dropped."""
  _, opt_init_rng, model_init_rng, _ = trial_keys(rng_seed)
  params, model_state = workload.init_model_fn(model_init_rng)
  for point, source in points:
    hyperparameters = None if point is None else search_space.as_hyperparameters(point)
    try:
      submission.init_optimizer_state(workload, params, model_state, hyperparameters,
                                      opt_init_rng)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from e


def selected_trials(num_points: int, start: Optional[int], end: Optional[int]) -> range:
  """The trial numbers (from 1) that ``--hparam_start_index``/``--hparam_end_index``
  select, as the official runner slices its search space; `ValueError` for an empty or
  out-of-range slice, naming the flags."""
  first = 0 if start is None else start
  last = num_points if end is None else end
  if not 0 <= first < last <= num_points:
    raise ValueError(f"--hparam_start_index={start} --hparam_end_index={end} select no "
                     f"trial of the {num_points} point(s) (0 <= start < end <= "
                     f"{num_points})")
  return range(first + 1, last + 1)


def check_branches(workload, branch: Optional[branch_lib.Branch], log_root: str,
                   points, trials: range) -> None:
  """`branch_lib.check_branch` for every selected trial; `ValueError` naming both."""
  if branch is None:
    return
  if isinstance(branch.step, bool) or not isinstance(branch.step, int) or branch.step < 1:
    raise ValueError(f"--branch_step must be an integer >= 1, got {branch.step!r}")
  trunk = branch_lib.trunk_point(branch.trunk_dir)
  for n in trials:
    trial_dir = layout.trial_dir(log_root, n)
    if os.path.abspath(trial_dir) == os.path.abspath(branch.trunk_dir):
      raise ValueError(f"--branch_from={branch.trunk_dir} is trial_{n} itself")
    branch_lib.check_branch(branch, trunk, points[n - 1][0], trial_dir, workload.step_hint)


@contextlib.contextmanager
def lock(log_root: str) -> Iterator[None]:
  """The experiment's lock, held by process 0; every process raises if it is taken.

  The lock file lies beside `log_root`, so that ``--overwrite`` cannot delete it.
  """
  path = os.path.join(os.path.dirname(log_root), f".{os.path.basename(log_root)}.lock")
  with contextlib.ExitStack() as stack:
    busy = None
    if distributed.is_primary():
      try:
        stack.enter_context(processes.exclusive(path, f"experiment {log_root}"))
      except processes.Busy as e:
        busy = e
    if int(distributed.broadcast_from_primary(int(busy is not None))):
      raise busy or processes.Busy(f"experiment {log_root} is in use by another runner "
                                   "(process 0's error names it)", None)
    yield


def run_experiment(*, workload_name: str, submission_path: str,
                   tuning_search_space: Optional[str] = None,
                   tuning_ruleset: str = "external",
                   experiment_dir: str, experiment_name: str, num_tuning_trials: int = 1,
                   rng_seed: int = 0, api: str = "jit",
                   max_global_steps: Optional[int] = None,
                   eval_every_steps: Optional[int] = None, overwrite: bool = False,
                   resume_last_run: bool = False, save_checkpoints: bool = True,
                   stop_at_target: bool = True, progress: bool = False,
                   flag_values: Optional[Dict[str, Any]] = None,
                   hparam_start_index: Optional[int] = None,
                   hparam_end_index: Optional[int] = None,
                   checkpoint_steps: Tuple[int, ...] = (),
                   branch: Optional[branch_lib.Branch] = None) -> List[TrialResult]:
  """Runs `num_tuning_trials` trials (those the hparam indices select) into the official
  experiment layout; `checkpoint_steps` and `branch` go to every trial it runs.

  Raises (before anything is written):
    ValueError: a bad setting, submission, search space or hyperparameter, named.
    FileExistsError: the experiment exists, and neither `overwrite` nor
      `resume_last_run` says what to do with it.
    processes.Busy: another runner holds the experiment (its pid is named).
  """
  if not experiment_dir or not experiment_name:
    raise ValueError("--experiment_dir and --experiment_name are required")
  if overwrite and resume_last_run:
    raise ValueError("--overwrite and --resume_last_run exclude each other")
  if api == "pmap" and jax.process_count() > 1:
    raise ValueError(
        f"--api=pmap runs on one process; this run has {jax.process_count()} "
        "processes. Use the jit API (--api=jit) for several processes.")
  workload = workloads.get_workload(workload_name, api=api)
  step_settings(workload, max_global_steps, eval_every_steps)
  submission = submissions.load_submission(submission_path)
  submissions.check_api(submission, submission_path, api)
  points = _trial_points(tuning_ruleset, tuning_search_space, num_tuning_trials, rng_seed)
  if tuning_ruleset == "self":
    workload.max_allowed_runtime_sec = (SELF_TUNING_BUDGET_FACTOR *
                                        workload.max_allowed_runtime_sec)
  log_root = layout.experiment_log_dir(experiment_dir, experiment_name, workload_name)
  points = _resolved_points(points, num_tuning_trials, tuning_search_space, log_root,
                            resume_last_run)
  check_hyperparameters(workload, submission, points, rng_seed)
  trials = selected_trials(len(points), hparam_start_index, hparam_end_index)
  check_branches(workload, branch, log_root, points, trials)
  results = []
  with lock(log_root):
    prepare_experiment_dir(log_root, overwrite, resume_last_run)
    for trial in trials:
      point = points[trial - 1][0]
      trial_dir = layout.trial_dir(log_root, trial)
      if distributed.is_primary():
        _write_trial_records(trial_dir, point, _metadata(
            workload_name=workload_name, api=api, submission_path=submission_path,
            rng_seed=rng_seed, trial=trial),
            # The step cap is always stated, so scoring can tell a finished run from a
            # killed one even when the runner was called from Python (null: the step hint).
            dict(flag_values or {}, max_global_steps=max_global_steps))
      distributed.barrier(f"trial_{trial}_ready")
      results.append(run_trial(
          workload, submission,
          None if point is None else search_space.as_hyperparameters(point),
          log_dir=trial_dir,
          rng_seed=rng_seed, api=api, max_global_steps=max_global_steps,
          eval_every_steps=eval_every_steps, resume=resume_last_run,
          save_checkpoints=save_checkpoints, stop_at_target=stop_at_target,
          progress=progress, keep_steps=checkpoint_steps, branch=branch))
  return results

"""One trial: the official runner's training loop around a submission, with its clocks.

* Each step: ``data_selection``, then ``update_params``; submission time accrues as
  the wall time since the previous step ended (data selection and compilation
  included, evaluation excluded).
* At eval-eligible steps (every ``eval_every_steps``, by step so that runs are
  reproducible, and at the last step) a *timed* ``prepare_for_eval``; its outputs
  are evaluated (untimed) and training continues from them. Each eval appends a row
  to ``eval_measurements.csv`` and, with ``save_checkpoints``, writes a checkpoint.
* Training stops at ``max_global_steps`` (default: the workload's ``step_hint``),
  once both the validation and the test targets are met (``stop_at_target``), or
  when the submission time exceeds the workload's budget. Decisions that depend on
  wall time are taken by process 0 and broadcast, so all processes stop together.

The optimizer state is checkpointed with each API's convention: under ``pmap`` the
official runner saves ``x[0]`` of every leaf and replicates on restore, so a state
that does not survive that fails here as it would there. Checkpoints at the steps of
``keep_steps`` are kept for good (written there even between evals): a *branch*
(`weight_averaging.runner.branch`) starts from one of them in another trial, with the
trunk's eval rows up to that step as its own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
from absl import logging

from weight_averaging import layout, placement
from weight_averaging.runner import branch as branch_lib
from weight_averaging.runner import checkpoints, distributed, submissions


@dataclasses.dataclass
class TrialResult:
  """How a trial ended: its last step, its eval rows and its first step at the target.

  ``reached_target_step`` and ``reached_target_time`` are the step and submission
  time of the first eval that met the validation target (the workload's own
  check), None if none did; ``params`` and ``optimizer_state`` are the final ones.
  """

  log_dir: str
  global_step: int
  eval_results: List[Dict[str, Any]]
  reached_target_step: Optional[int]
  reached_target_time: Optional[float]
  params: Any = None
  optimizer_state: Any = None


class _Config(NamedTuple):
  """What stays fixed through a trial."""

  workload: Any
  submission: Any
  hyperparameters: Any
  log_dir: str
  api: str
  max_steps: int
  eval_every: int
  stop_at_target: bool
  save_checkpoints: bool
  keep_steps: Tuple[int, ...] = ()


@dataclasses.dataclass
class _Trial:
  """What a trial carries from step to step, and what a checkpoint restores.

  The loop's parts update it in place, as the official runner updates its
  ``train_state`` dict (which is the `train_state` field).
  """

  params: Any
  model_state: Any
  optimizer_state: Tuple[Any, Any]  # (state pytree, update_fn)
  train_state: Dict[str, Any]
  preemption_count: int
  global_step: int = 0
  eval_results: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


def _new_train_state() -> Dict[str, Any]:
  """The official runner's ``train_state`` at step 0."""
  return {"accumulated_submission_time": 0.0, "accumulated_eval_time": 0.0,
          "accumulated_logging_time": 0.0, "validation_goal_reached": False,
          "test_goal_reached": False, "is_time_remaining": True,
          "training_complete": False, "last_eval_time": 0.0}


def _steps_setting(flag: str, value: Optional[int], default: int, what: str) -> int:
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"--{flag} must be an integer >= 1, got {value!r} (leave it unset "
                     f"for the workload's {what}, {default})")
  return value


def step_settings(workload, max_global_steps: Optional[int],
                  eval_every_steps: Optional[int]) -> Tuple[int, int]:
  """``(max_steps, eval_every)``: the flags, else the workload's step hint and eval
  interval. A value < 1 is an error naming its flag (0 does not mean the default)."""
  return (_steps_setting("max_global_steps", max_global_steps, workload.step_hint,
                         "step hint"),
          _steps_setting("eval_every_steps", eval_every_steps, workload.eval_every_steps,
                         "eval interval"))


def _config(workload, submission, hyperparameters, log_dir, api, max_global_steps,
            eval_every_steps, stop_at_target, save_checkpoints, keep_steps) -> _Config:
  """The trial's fixed settings, defaults filled in from the workload and checked."""
  if api == "pmap" and distributed.process_count() > 1:
    raise ValueError(
        f"api='pmap' runs on one process; this run has {distributed.process_count()} "
        "processes. Use the jit API (--api=jit) for several processes.")
  max_steps, eval_every = step_settings(workload, max_global_steps, eval_every_steps)
  keep_steps = tuple(sorted(set(keep_steps)))
  if keep_steps and not save_checkpoints:
    raise ValueError(f"--checkpoint_steps={','.join(map(str, keep_steps))} keeps "
                     "checkpoints, and --save_checkpoints=false writes none: drop one")
  bad = [s for s in keep_steps if isinstance(s, bool) or not 1 <= s <= max_steps]
  if bad:
    raise ValueError(f"--checkpoint_steps: step {bad[0]!r} is outside 1..{max_steps} "
                     "(the trial's last step, --max_global_steps)")
  return _Config(workload, submission, hyperparameters, log_dir, api, max_steps,
                 eval_every, stop_at_target, save_checkpoints, keep_steps)


def trial_keys(rng_seed: int):
  """``(data, optimizer init, model init, training)`` keys of a trial, as the official
  runner splits its seed."""
  return jax.random.split(jax.random.PRNGKey(rng_seed), 4)


def _batch_size(config: _Config) -> int:
  """The submission's batch size for the workload, else the workload's default."""
  try:
    return config.submission.get_batch_size(config.workload.name)
  except ValueError:
    logging.info("get_batch_size does not know %s; using its default batch size %d",
                 config.workload.name, config.workload.default_batch_size)
    return config.workload.default_batch_size


def _initial_trial(config: _Config, model_init_rng, opt_init_rng,
                   preemption_count: int) -> _Trial:
  """Step 0: the workload's params and the submission's optimizer state."""
  params, model_state = config.workload.init_model_fn(model_init_rng)
  optimizer_state = config.submission.init_optimizer_state(
      config.workload, params, model_state, config.hyperparameters, opt_init_rng)
  if not (isinstance(optimizer_state, tuple) and len(optimizer_state) == 2):
    raise ValueError("init_optimizer_state must return (state_pytree, update_fn), got "
                     f"{type(optimizer_state).__name__}")
  return _Trial(params, model_state, optimizer_state, _new_train_state(),
                preemption_count)


def _checkpoint_arrays(trial: _Trial) -> Dict[str, Any]:
  """The arrays a checkpoint holds: params, the optimizer state's pytree, model state."""
  return {"params": trial.params, "optimizer_state": trial.optimizer_state[0],
          "model_state": trial.model_state}


def _restore(config: _Config, trial: _Trial) -> None:
  """Continues `trial` from the latest checkpoint in its directory, if there is one.

  Under pmap the checkpoint holds ``x[0]`` of every leaf (the official pmap
  runner's convention) and is replicated again; under jit every leaf comes back
  in the sharding of its freshly initialised counterpart.
  """
  restored = _read_checkpoint(config, trial, config.log_dir, None)
  if restored is None:
    return
  trial.preemption_count = restored[1]["preemption_count"] + 1
  logging.info("resumed %s at step %d", config.log_dir, trial.global_step)


def _read_checkpoint(config: _Config, trial: _Trial, log_dir: str,
                     step: Optional[int]) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """Sets `trial` to the checkpoint of `log_dir` (at `step`, else the latest one) and
  returns ``(arrays, runner_state)``; None, `trial` untouched, when there is none."""
  live = _checkpoint_arrays(trial)
  pmap = config.api == "pmap"
  target = placement.pmap_unreplicate(live) if pmap else live
  restored = checkpoints.restore_checkpoint(log_dir, target, as_numpy=pmap, step=step)
  if restored is None:
    return None
  arrays, runner_state = restored
  if pmap:
    arrays = placement.pmap_replicate(arrays)
  else:
    arrays = jax.tree_util.tree_map(
        lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding")
        else new, arrays, live)
  trial.params, trial.model_state = arrays["params"], arrays["model_state"]
  trial.optimizer_state = (arrays["optimizer_state"], trial.optimizer_state[1])
  trial.global_step = runner_state["global_step"]
  trial.eval_results = runner_state["eval_results"]
  trial.train_state.update(runner_state["train_state"])
  trial.preemption_count = runner_state["preemption_count"]
  return restored


def _start_branch(config: _Config, trial: _Trial, branch: branch_lib.Branch) -> None:
  """Starts `trial` from the trunk's checkpoint at ``branch.step``: its arrays, clocks and
  eval rows (written to this trial's ``eval_measurements.csv`` at once)."""
  _read_checkpoint(config, trial, branch.trunk_dir, branch.step)
  if trial.global_step != branch.step:
    raise ValueError(f"{branch.trunk_dir}: the checkpoint of step {branch.step} holds step "
                     f"{trial.global_step}")
  if distributed.is_primary():
    layout.write_eval_measurements(layout.eval_file(config.log_dir), trial.eval_results)
  logging.info("branched %s from %s at step %d", config.log_dir, branch.trunk_dir,
               branch.step)


def _is_complete(config: _Config, trial: _Trial) -> bool:
  """Whether training is over: out of steps or time, or both targets met."""
  state = trial.train_state
  return (trial.global_step >= config.max_steps or not state["is_time_remaining"] or
          (config.stop_at_target and state["validation_goal_reached"]
           and state["test_goal_reached"]))


@functools.lru_cache(maxsize=None)
def _compiled_step_keys():
  return jax.jit(lambda rng, step: tuple(jax.random.split(jax.random.fold_in(rng, step), 4)))


def _step_keys(rng, global_step):
  """The step's four keys, as the official runner derives them, in one dispatch."""
  return _compiled_step_keys()(rng, global_step)


def _train_step(config: _Config, trial: _Trial, input_queue, data_select_rng,
                update_rng) -> None:
  """``data_selection`` and ``update_params``; the time since the last step is timed."""
  state = trial.train_state
  batch = config.submission.data_selection(
      workload=config.workload, input_queue=input_queue,
      optimizer_state=trial.optimizer_state, current_param_container=trial.params,
      model_state=trial.model_state, hyperparameters=config.hyperparameters,
      global_step=trial.global_step, rng=data_select_rng)
  trial.optimizer_state, trial.params, trial.model_state = submissions.call(
      config.submission.update_params, workload=config.workload,
      current_param_container=trial.params,
      current_params_types=config.workload.model_params_types,
      model_state=trial.model_state, hyperparameters=config.hyperparameters,
      batch=batch, loss_type=config.workload.loss_type,
      optimizer_state=trial.optimizer_state, eval_results=trial.eval_results,
      global_step=trial.global_step, rng=update_rng, train_state=dict(state))
  trial.global_step += 1
  now = time.time()
  state["accumulated_submission_time"] += now - state["last_step_end_time"]
  state["last_step_end_time"] = now
  if trial.global_step >= config.max_steps:
    state["training_complete"] = True


def _prepare_for_eval(config: _Config, trial: _Trial, rng) -> None:
  """The timed ``prepare_for_eval`` (if the submission has one): what it returns is
  evaluated and trained from."""
  prepare_for_eval = getattr(config.submission, "prepare_for_eval", None)
  if prepare_for_eval is None:
    return
  start = time.time()
  trial.optimizer_state, trial.params, trial.model_state = prepare_for_eval(
      workload=config.workload, current_param_container=trial.params,
      current_params_types=config.workload.model_params_types,
      model_state=trial.model_state, hyperparameters=config.hyperparameters,
      loss_type=config.workload.loss_type, optimizer_state=trial.optimizer_state,
      eval_results=trial.eval_results, global_step=trial.global_step, rng=rng)
  jax.block_until_ready(trial.params)
  trial.train_state["accumulated_submission_time"] += time.time() - start


def _evaluate(config: _Config, trial: _Trial, rng) -> Dict[str, Any]:
  """The time budget check, then the untimed eval and the goals it reaches."""
  workload, state = config.workload, trial.train_state
  # Process 0's clock decides, so that every process stops at the same step.
  state["is_time_remaining"] = bool(distributed.broadcast_from_primary(int(
      state["accumulated_submission_time"] < workload.max_allowed_runtime_sec)))
  if not state["is_time_remaining"]:
    state["training_complete"] = True
  start = time.time()
  result = workload.eval_model(workload.eval_batch_size, trial.params, trial.model_state,
                               rng, None, None, trial.global_step)
  state["accumulated_eval_time"] += time.time() - start
  state["validation_goal_reached"] |= workload.has_reached_validation_target(result)
  state["test_goal_reached"] |= workload.has_reached_test_target(result)
  if config.stop_at_target and state["validation_goal_reached"] and \
      state["test_goal_reached"]:
    state["training_complete"] = True
  return result


def _save(config: _Config, trial: _Trial) -> None:
  """A checkpoint of the arrays and of what the runner needs to go on."""
  arrays = _checkpoint_arrays(trial)
  if config.api == "pmap":  # the official pmap runner saves x[0] of every leaf
    arrays = jax.device_get(placement.pmap_unreplicate(arrays))
  checkpoints.save_checkpoint(config.log_dir, trial.global_step, arrays, {
      "global_step": trial.global_step, "eval_results": trial.eval_results,
      "preemption_count": trial.preemption_count,
      "train_state": {k: v for k, v in trial.train_state.items()
                      if k != "last_step_end_time"}}, keep=config.keep_steps)


def _log_eval(config: _Config, trial: _Trial, result: Dict[str, Any],
              start: float) -> None:
  """The eval row (the official columns, then the metrics), the CSV and a checkpoint.

  `start` is the trial's wall-clock start (earlier runs of a resumed trial
  included), for ``total_duration``. This bookkeeping is logging time.
  """
  state = trial.train_state
  log_start = time.time()
  row = dict(result)
  row.update(accumulated_eval_time=state["accumulated_eval_time"],
             accumulated_logging_time=state["accumulated_logging_time"],
             accumulated_submission_time=state["accumulated_submission_time"],
             global_step=trial.global_step, preemption_count=trial.preemption_count,
             score=state["accumulated_submission_time"],
             total_duration=time.time() - start)
  trial.eval_results.append(row)
  if distributed.is_primary():
    layout.write_eval_measurements(layout.eval_file(config.log_dir), trial.eval_results)
  if config.save_checkpoints:
    _save(config, trial)
  state["accumulated_logging_time"] += time.time() - log_start


def _progress_bar(config: _Config, trial: _Trial, show: bool):
  """A tqdm bar on process 0, or None."""
  if not (show and distributed.is_primary()):
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.max_steps, initial=trial.global_step,
              desc=os.path.basename(config.log_dir), unit="step", dynamic_ncols=True,
              leave=True)


def _show_eval(bar, workload, result: Dict[str, Any], state: Dict[str, Any]) -> None:
  bar.set_postfix_str(
      f"val {workload.target_metric_name} "
      f"{result['validation/' + workload.target_metric_name]:.4f} "
      f"(target {workload.validation_target_value}), "
      f"{state['accumulated_submission_time']:.1f}s")


def _train(config: _Config, trial: _Trial, input_queue, rng, bar) -> None:
  """Steps until training is complete; at each eval-eligible step, eval and log."""
  state = trial.train_state
  start = time.time() - (trial.eval_results[-1]["total_duration"]
                         if trial.eval_results else 0.0)
  state["last_step_end_time"] = time.time()
  while not state["training_complete"]:
    data_select_rng, update_rng, prep_eval_rng, eval_rng = _step_keys(
        rng, trial.global_step)
    # The batch lives inside the step only: it is freed before the eval.
    _train_step(config, trial, input_queue, data_select_rng, update_rng)
    if bar is not None:
      bar.update(1)
    if trial.global_step % config.eval_every and not state["training_complete"]:
      if trial.global_step in config.keep_steps:  # a branch point between evals
        _save(config, trial)
      continue
    # An eval-eligible step: the timed prepare_for_eval, then the untimed eval.
    _prepare_for_eval(config, trial, prep_eval_rng)
    result = _evaluate(config, trial, eval_rng)
    _log_eval(config, trial, result, start)
    if bar is not None:
      _show_eval(bar, config.workload, result, state)
    state["last_step_end_time"] = time.time()


def _first_at_target(workload, eval_results) -> Tuple[Optional[int], Optional[float]]:
  """Step and submission time of the first eval row that meets the validation target."""
  for row in eval_results:
    if workload.has_reached_validation_target(row):
      return row["global_step"], row["accumulated_submission_time"]
  return None, None


def run_trial(workload, submission, hyperparameters, *, log_dir: str, rng_seed: int,
              api: str = "jit", max_global_steps: Optional[int] = None,
              eval_every_steps: Optional[int] = None, resume: bool = False,
              save_checkpoints: bool = True, stop_at_target: bool = True,
              progress: bool = False, preemption_count: int = 0,
              keep_steps: Sequence[int] = (),
              branch: Optional[branch_lib.Branch] = None) -> TrialResult:
  """Trains `submission` on `workload` under the official runner's contract.

  Logs into `log_dir` (``eval_measurements.csv`` and checkpoints); with `resume`
  it continues from the latest checkpoint there, to the same result as an
  uninterrupted run. The seed's keys are split as the official runner splits them.
  `keep_steps`: checkpoints kept for good; `branch`: start from another trial's
  checkpoint (when `log_dir` has none of its own to resume from), whose schedule the
  caller has checked (`branch_lib.check_branch`).
  """
  config = _config(workload, submission, hyperparameters, log_dir, api,
                   max_global_steps, eval_every_steps, stop_at_target, save_checkpoints,
                   keep_steps)
  os.makedirs(log_dir, exist_ok=True)
  data_rng, opt_init_rng, model_init_rng, rng = trial_keys(rng_seed)
  batch_size = _batch_size(config)
  trial = _initial_trial(config, model_init_rng, opt_init_rng, preemption_count)
  if resume:
    _restore(config, trial)
  if branch is not None and trial.global_step == 0:
    _start_branch(config, trial, branch)
  # Whether to go on is decided anew: a resumed run may have a larger step budget.
  trial.train_state["training_complete"] = _is_complete(config, trial)
  input_queue = workload.input_queue(data_rng, batch_size, start_step=trial.global_step)
  bar = _progress_bar(config, trial, progress)
  _train(config, trial, input_queue, rng, bar)
  if bar is not None:
    bar.close()
  reached_step, reached_time = _first_at_target(workload, trial.eval_results)
  return TrialResult(log_dir=log_dir, global_step=trial.global_step,
                     eval_results=trial.eval_results, reached_target_step=reached_step,
                     reached_target_time=reached_time, params=trial.params,
                     optimizer_state=trial.optimizer_state)

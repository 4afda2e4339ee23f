"""The embedded runner: AlgoPerf's submission-runner contract, on one machine.

``python -m weight_averaging.runner --submission_path=... --tuning_search_space=...``
runs any AlgoPerf JAX submission (loaded by path, like the official runner) on an
embedded workload, with the official runner's semantics:

* each step: ``data_selection``, then ``update_params``; submission time accrues as
  the wall time since the previous step ended (data selection and compilation
  included, evaluation excluded);
* at eval-eligible steps (every ``--eval_every_steps``, by step so that runs are
  reproducible, and at the end) a *timed* ``prepare_for_eval``; its outputs are
  evaluated and training continues from them;
* stop when both the validation and the test targets are reached, at
  ``--max_global_steps`` (default: the workload's ``step_hint``), or when the
  submission time exceeds the workload's budget;
* the official layout ``experiment_dir/experiment_name/<workload>_jax/trial_k/``
  with ``hparams.json``, ``meta_data_0.json``, ``flags_0.json`` and
  ``eval_measurements.csv`` (the official columns), so scoring code reads it as is;
* an orbax checkpoint at every eval; ``--resume_last_run`` continues a killed run
  to the same result as an uninterrupted one; an existing experiment is refused
  without ``--overwrite`` or ``--resume_last_run`` (never a prompt).

Several processes (jit API): with ``--num_processes``, ``--process_id`` and
``--coordinator_address`` (or ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
``JAX_COORDINATOR_ADDRESS``, which ``python -m weight_averaging.launch`` sets) every
process runs this same program over one mesh of all processes' devices. Each
process builds only its own rows of every batch; each writes its own shards of the
checkpoint (orbax), so no state is gathered on one process; process 0 alone
writes the logs. Decisions that depend on wall time are taken by process 0 and
broadcast, so that all processes stop at the same step.

The optimizer state is checkpointed with each API's convention: under ``pmap`` the
official runner saves ``x[0]`` of every leaf and replicates on restore, so a state
that does not survive that fails here as it would there.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags, logging

from weight_averaging import distributed

flags.DEFINE_string("workload", "teacher_student", "Embedded workload to run.")
flags.DEFINE_string("framework", "jax", "Only 'jax' (accepted for compatibility).")
flags.DEFINE_string("submission_path", None, "Path to a submission.py file.")
flags.DEFINE_string("tuning_search_space", None, "Search-space JSON (list or dict form).")
flags.DEFINE_integer("num_tuning_trials", 1, "Number of hyperparameter points to run.")
flags.DEFINE_string("experiment_dir", None, "Root directory of the experiment logs.")
flags.DEFINE_string("experiment_name", None, "Name of this experiment under experiment_dir.")
flags.DEFINE_integer("rng_seed", 0, "Seed of the run (data order, init, dropout).")
flags.DEFINE_integer("max_global_steps", None, "Stop after this many steps "
                     "(default: the workload's step_hint).")
flags.DEFINE_boolean("overwrite", False, "Delete an existing experiment and start anew.")
flags.DEFINE_boolean("resume_last_run", False, "Continue an existing experiment.")
flags.DEFINE_enum("api", "jit", ["jit", "pmap"], "The AlgoPerf JAX API the submission "
                  "implements: 'jit' (algoperf 2c90454f) or 'pmap' (fb2f492a).")
flags.DEFINE_integer("eval_every_steps", None, "Eval-eligible every this many steps "
                     "(default: the workload's).")
flags.DEFINE_boolean("save_checkpoints", True, "Checkpoint at every eval.")
flags.DEFINE_boolean("stop_at_target", True, "Stop once validation and test targets are met.")
flags.DEFINE_integer("num_devices", None, "Simulated CPU devices (sets XLA_FLAGS; CPU only).")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                     "JAX_NUM_PROCESSES, else 1).")
flags.DEFINE_integer("process_id", None, "This process's index (default: JAX_PROCESS_ID).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                    "(default: JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for the coordinator "
                     "and the other processes before failing.")

FLAGS = flags.FLAGS

CSV_COLUMNS = ("accumulated_eval_time", "accumulated_logging_time",
               "accumulated_submission_time", "global_step", "preemption_count", "score",
               "total_duration")


def simulate_devices(num_devices: Optional[int]) -> None:
  """Asks XLA for `num_devices` CPU devices; must run before JAX starts its backend."""
  if not num_devices:
    return
  os.environ["XLA_FLAGS"] = distributed.with_device_count(
      os.environ.get("XLA_FLAGS", ""), num_devices)


# ----------------------------------------------------------------------------
# Submissions and search spaces.


def load_submission(path: str):
  """Imports a submission file by path (absolute, or relative to the working dir)."""
  if not path or not path.endswith(".py"):
    raise ValueError(f"--submission_path must name a .py file, got {path!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"submission file not found: {path}")
  name = "submission_" + os.path.splitext(os.path.basename(os.path.dirname(
      os.path.abspath(path))))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  required = ("init_optimizer_state", "update_params", "get_batch_size", "data_selection")
  missing = [f for f in required if not callable(getattr(module, f, None))]
  if missing:
    raise ValueError(f"{path} is not an AlgoPerf submission: it lacks {', '.join(missing)}")
  return module


def _halton(index: int, base: int) -> float:
  result, f = 0.0, 1.0
  while index > 0:
    f /= base
    index, digit = divmod(index, base)
    result += f * digit
  return result


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def _sample_dict_space(space: Dict[str, Any], num_trials: int, seed: int):
  """Quasi-random points of a dict-form search space (Halton sequence, shifted by seed)."""
  names = sorted(space)
  if len(names) > len(_PRIMES):
    raise ValueError(f"search space has {len(names)} hyperparameters; at most "
                     f"{len(_PRIMES)} supported")
  points = []
  for trial in range(num_trials):
    point = {}
    for name, prime in zip(names, _PRIMES):
      spec = space[name]
      u = (_halton(trial + 1, prime) + _halton(seed + 1, 97)) % 1.0
      if "feasible_points" in spec:
        options = spec["feasible_points"]
        if not options:
          raise ValueError(f"search space: {name} has no feasible_points")
        point[name] = options[min(int(u * len(options)), len(options) - 1)]
      elif "min" in spec and "max" in spec:
        lo, hi = float(spec["min"]), float(spec["max"])
        if spec.get("scaling", "linear") == "log":
          if lo <= 0:
            raise ValueError(f"search space: {name} has log scaling and min {lo} <= 0")
          point[name] = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        elif spec.get("scaling", "linear") == "linear":
          point[name] = lo + u * (hi - lo)
        else:
          raise ValueError(f"search space: {name} has unknown scaling {spec['scaling']!r}")
      else:
        raise ValueError(f"search space: {name} needs 'feasible_points' or 'min'/'max', "
                         f"got {spec!r}")
    points.append(point)
  return points


def load_search_space(path: str, num_trials: int, seed: int = 0) -> List[Dict[str, Any]]:
  """The trials' hyperparameters from a search space in either official format.

  A list of points gives its first `num_trials` points; a dict of ranges
  (``{"min", "max", "scaling"}`` or ``{"feasible_points"}``) is sampled.
  """
  if not path:
    raise ValueError("--tuning_search_space is required for external tuning")
  try:
    with open(path) as f:
      space = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"search space not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"search space {path} is not valid JSON: {e}") from e
  if num_trials < 1:
    raise ValueError(f"--num_tuning_trials must be >= 1, got {num_trials}")
  if isinstance(space, list):
    if not space or not all(isinstance(p, dict) for p in space):
      raise ValueError(f"search space {path}: a list must hold hyperparameter dicts")
    for i, point in enumerate(space[1:], start=2):
      # The official runner builds one namedtuple class from the first point's keys.
      if set(point) != set(space[0]):
        raise ValueError(
            f"search space {path}: point {i} has other hyperparameters than point 1 "
            f"(missing {sorted(set(space[0]) - set(point))}, extra "
            f"{sorted(set(point) - set(space[0]))}); the official runner needs the "
            "same names in every point")
    return [dict(p) for p in space[:num_trials]]
  if isinstance(space, dict):
    if not all(isinstance(v, dict) for v in space.values()):
      raise ValueError(f"search space {path}: every entry must be a dict with "
                       f"'feasible_points' or 'min'/'max'")
    return _sample_dict_space(space, num_trials, seed)
  raise ValueError(f"search space {path} must be a JSON list or object")


def as_hyperparameters(point: Dict[str, Any]):
  """A namedtuple, as the official runner hands hyperparameters to submissions."""
  return collections.namedtuple("Hyperparameters", sorted(point))(**point)


# ----------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_dirs(log_dir: str):
  steps = []
  for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
    if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit():
      step = int(name[len("checkpoint_"):])
      if os.path.exists(os.path.join(log_dir, f"runner_state_{step}.json")):
        steps.append(step)
  return sorted(steps)


def _checkpointer():
  """orbax's PyTree checkpointer, writing a replicated array from one replica.

  Newer orbax splits the write of a replicated array over its replicas, which
  calls `jax.sharding.set_mesh` as a context manager: jax 0.7.0 has no such
  context manager. The replicated leaves here are params-sized at most, so one
  writer is enough.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  array_handler = ocp.type_handlers.ArrayHandler
  if "use_replica_parallel" not in inspect.signature(array_handler.__init__).parameters:
    return ocp.PyTreeCheckpointer()
  others = [(t, ocp.type_handlers.get_type_handler(t))
            for t in (int, float, bytes, np.number, np.ndarray, str)]
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, array_handler(use_replica_parallel=False)), *others)
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def save_checkpoint(log_dir: str, step: int, arrays: Dict[str, Any],
                    runner_state: Dict[str, Any]) -> None:
  """Writes the arrays with orbax, then the runner's JSON state; keeps the latest only.

  `jax.Array` leaves are written as they lie: with several processes each writes
  its own shards, so nothing is gathered on one process. Every process must call
  this; process 0 alone writes the JSON and removes the previous checkpoint, after
  orbax has finished the new one on all processes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(log_dir, f"checkpoint_{step}")
  if distributed.is_primary() and os.path.exists(path):
    shutil.rmtree(path)
  distributed.barrier(f"checkpoint_{step}_clear")
  leaves = jax.tree_util.tree_leaves(arrays)
  _checkpointer().save(path, {f"{i:06d}": leaf for i, leaf in enumerate(leaves)})
  if distributed.is_primary():
    tmp = os.path.join(log_dir, f"runner_state_{step}.json.tmp")
    with open(tmp, "w") as f:
      json.dump(runner_state, f)
    os.replace(tmp, os.path.join(log_dir, f"runner_state_{step}.json"))
    for old in _checkpoint_dirs(log_dir)[:-1]:
      shutil.rmtree(os.path.join(log_dir, f"checkpoint_{old}"), ignore_errors=True)
      os.remove(os.path.join(log_dir, f"runner_state_{old}.json"))
  distributed.barrier(f"checkpoint_{step}_done")


def _restore_args(leaf, as_numpy: bool):
  """Restore each `jax.Array` leaf straight into its sharding (each process its part)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not as_numpy and isinstance(leaf, jax.Array):
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                dtype=leaf.dtype)
  return ocp.RestoreArgs(restore_type=np.ndarray)


def restore_checkpoint(log_dir: str, target: Dict[str, Any], as_numpy: bool = True):
  """The latest complete checkpoint shaped like `target`, or None.

  With ``as_numpy`` every leaf comes back as a NumPy array; otherwise a leaf that
  is a `jax.Array` in `target` comes back with that leaf's sharding, each process
  reading only its own shards.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  steps = _checkpoint_dirs(log_dir)
  if not steps:
    return None
  step = steps[-1]
  path = os.path.join(log_dir, f"checkpoint_{step}")
  leaves, treedef = jax.tree_util.tree_flatten(target)
  checkpointer = _checkpointer()
  saved = checkpointer.metadata(path)
  saved = getattr(saved, "item_metadata", saved)  # orbax >= 0.7 wraps the tree
  if len(saved) != len(leaves):
    raise ValueError(f"checkpoint {step} in {log_dir} holds {len(saved)} arrays; this "
                     f"submission's state has {len(leaves)}: not the same submission?")
  item = {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}
  restore_args = {k: _restore_args(v, as_numpy) for k, v in item.items()}
  flat = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  restored = treedef.unflatten([flat[f"{i:06d}"] for i in range(len(leaves))])
  with open(os.path.join(log_dir, f"runner_state_{step}.json")) as f:
    return restored, json.load(f)


# ----------------------------------------------------------------------------
# One trial.


@dataclasses.dataclass
class TrialResult:
  log_dir: str
  global_step: int
  eval_results: List[Dict[str, Any]]
  reached_target_step: Optional[int]
  reached_target_time: Optional[float]
  params: Any = None
  optimizer_state: Any = None


def _write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
  metrics = sorted({k for r in rows for k in r if k not in CSV_COLUMNS})
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS) + metrics)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _unreplicate(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: x[0], tree)


@functools.lru_cache(maxsize=None)
def _compiled_step_keys():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda rng, step: tuple(jax.random.split(jax.random.fold_in(rng, step), 4)))


def _step_keys(rng, global_step):
  """The step's four keys, as the official runner derives them, in one dispatch."""
  return _compiled_step_keys()(rng, global_step)


def _call(fn, **kwargs):
  """Calls a submission function, passing `train_state` only if it accepts it."""
  if "train_state" in kwargs and "train_state" not in inspect.signature(fn).parameters:
    kwargs.pop("train_state")
  return fn(**kwargs)


def run_trial(workload, submission, hyperparameters, *, log_dir: str, rng_seed: int,
              api: str = "jit", max_global_steps: Optional[int] = None,
              eval_every_steps: Optional[int] = None, resume: bool = False,
              save_checkpoints: bool = True, stop_at_target: bool = True,
              progress: bool = False, preemption_count: int = 0) -> TrialResult:
  """Trains `submission` on `workload` under the official runner's contract."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if api == "pmap" and distributed.process_count() > 1:
    raise ValueError(
        f"api='pmap' runs on one process; this run has {distributed.process_count()} "
        "processes. Use the jit API (--api=jit) for several processes.")
  os.makedirs(log_dir, exist_ok=True)
  max_steps = max_global_steps or workload.step_hint
  eval_every = eval_every_steps or workload.eval_every_steps
  if max_steps < 1 or eval_every < 1:
    raise ValueError(f"max_global_steps ({max_steps}) and eval_every_steps "
                     f"({eval_every}) must be >= 1")

  rng = jax.random.PRNGKey(rng_seed)
  data_rng, opt_init_rng, model_init_rng, rng = jax.random.split(rng, 4)
  try:
    batch_size = submission.get_batch_size(workload.name)
  except ValueError:
    batch_size = workload.default_batch_size
    logging.info("get_batch_size does not know %s; using its default batch size %d",
                 workload.name, batch_size)
  params, model_state = workload.init_model_fn(model_init_rng)
  optimizer_state = submission.init_optimizer_state(
      workload, params, model_state, hyperparameters, opt_init_rng)
  if not (isinstance(optimizer_state, tuple) and len(optimizer_state) == 2):
    raise ValueError("init_optimizer_state must return (state_pytree, update_fn), got "
                     f"{type(optimizer_state).__name__}")

  global_step, eval_results = 0, []
  train_state = {"accumulated_submission_time": 0.0, "accumulated_eval_time": 0.0,
                 "accumulated_logging_time": 0.0, "validation_goal_reached": False,
                 "test_goal_reached": False, "is_time_remaining": True,
                 "training_complete": False, "last_eval_time": 0.0}
  if resume:
    saved_state = optimizer_state[0]
    target = {"params": params, "optimizer_state": saved_state,
              "model_state": model_state}
    if api == "pmap":  # the official pmap runner saves x[0] of every leaf
      target = _unreplicate(target)
    restored = restore_checkpoint(log_dir, target, as_numpy=api == "pmap")
    if restored is not None:
      arrays, runner_state = restored
      if api == "pmap":
        from weight_averaging.workloads.teacher_student import replicate  # pylint: disable=g-import-not-at-top
        arrays = replicate(arrays)
      else:
        arrays = jax.tree_util.tree_map(
            lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding")
            else new, arrays, {"params": params, "optimizer_state": saved_state,
                               "model_state": model_state})
      params, model_state = arrays["params"], arrays["model_state"]
      optimizer_state = (arrays["optimizer_state"], optimizer_state[1])
      global_step = runner_state["global_step"]
      eval_results = runner_state["eval_results"]
      train_state.update(runner_state["train_state"])
      preemption_count = runner_state["preemption_count"] + 1
      logging.info("resumed %s at step %d", log_dir, global_step)

  # Whether to go on is decided anew: a resumed run may have a larger step budget.
  train_state["training_complete"] = (
      global_step >= max_steps or not train_state["is_time_remaining"] or
      (stop_at_target and train_state["validation_goal_reached"]
       and train_state["test_goal_reached"]))
  input_queue = workload.input_queue(data_rng, batch_size, start_step=global_step)
  prepare_for_eval = getattr(submission, "prepare_for_eval", None)
  reached_step = next((r["global_step"] for r in eval_results
                       if workload.has_reached_validation_target(r)), None)
  reached_time = next((r["accumulated_submission_time"] for r in eval_results
                       if workload.has_reached_validation_target(r)), None)

  bar = None
  if progress and distributed.is_primary():
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=max_steps, initial=global_step, desc=os.path.basename(log_dir),
               unit="step", dynamic_ncols=True, leave=True)

  start = time.time() - (eval_results[-1]["total_duration"] if eval_results else 0.0)
  train_state["last_step_end_time"] = time.time()
  while not train_state["training_complete"]:
    data_select_rng, update_rng, prep_eval_rng, eval_rng = _step_keys(rng, global_step)
    batch = submission.data_selection(
        workload=workload, input_queue=input_queue, optimizer_state=optimizer_state,
        current_param_container=params, model_state=model_state,
        hyperparameters=hyperparameters, global_step=global_step, rng=data_select_rng)
    optimizer_state, params, model_state = _call(
        submission.update_params, workload=workload, current_param_container=params,
        current_params_types=workload.model_params_types, model_state=model_state,
        hyperparameters=hyperparameters, batch=batch, loss_type=workload.loss_type,
        optimizer_state=optimizer_state, eval_results=eval_results,
        global_step=global_step, rng=update_rng, train_state=dict(train_state))
    global_step += 1
    now = time.time()
    train_state["accumulated_submission_time"] += now - train_state["last_step_end_time"]
    train_state["last_step_end_time"] = now
    if global_step >= max_steps:
      train_state["training_complete"] = True
    if bar is not None:
      bar.update(1)

    if global_step % eval_every and not train_state["training_complete"]:
      continue
    # An eval-eligible step: the timed prepare_for_eval, then the untimed eval.
    del batch
    if prepare_for_eval is not None:
      prep_start = time.time()
      optimizer_state, params, model_state = prepare_for_eval(
          workload=workload, current_param_container=params,
          current_params_types=workload.model_params_types, model_state=model_state,
          hyperparameters=hyperparameters, loss_type=workload.loss_type,
          optimizer_state=optimizer_state, eval_results=eval_results,
          global_step=global_step, rng=prep_eval_rng)
      jax.block_until_ready(params)
      train_state["accumulated_submission_time"] += time.time() - prep_start
    # Process 0's clock decides, so that every process stops at the same step.
    train_state["is_time_remaining"] = bool(distributed.broadcast_from_primary(int(
        train_state["accumulated_submission_time"] < workload.max_allowed_runtime_sec)))
    if not train_state["is_time_remaining"]:
      train_state["training_complete"] = True
    eval_start = time.time()
    result = workload.eval_model(workload.eval_batch_size, params, model_state, eval_rng,
                                 None, None, global_step)
    train_state["accumulated_eval_time"] += time.time() - eval_start
    train_state["validation_goal_reached"] |= workload.has_reached_validation_target(result)
    train_state["test_goal_reached"] |= workload.has_reached_test_target(result)
    if reached_step is None and workload.has_reached_validation_target(result):
      reached_step = global_step
      reached_time = train_state["accumulated_submission_time"]
    if stop_at_target and train_state["validation_goal_reached"] and \
        train_state["test_goal_reached"]:
      train_state["training_complete"] = True

    log_start = time.time()
    row = dict(result)
    row.update(accumulated_eval_time=train_state["accumulated_eval_time"],
               accumulated_logging_time=train_state["accumulated_logging_time"],
               accumulated_submission_time=train_state["accumulated_submission_time"],
               global_step=global_step, preemption_count=preemption_count,
               score=train_state["accumulated_submission_time"],
               total_duration=time.time() - start)
    eval_results.append(row)
    if distributed.is_primary():
      _write_csv(os.path.join(log_dir, "eval_measurements.csv"), eval_results)
    if save_checkpoints:
      arrays = {"params": params, "optimizer_state": optimizer_state[0],
                "model_state": model_state}
      if api == "pmap":
        arrays = jax.device_get(_unreplicate(arrays))
      save_checkpoint(log_dir, global_step, arrays, {
          "global_step": global_step, "eval_results": eval_results,
          "preemption_count": preemption_count,
          "train_state": {k: v for k, v in train_state.items()
                          if k != "last_step_end_time"}})
    train_state["accumulated_logging_time"] += time.time() - log_start
    if bar is not None:
      bar.set_postfix_str(
          f"val {workload.target_metric_name} "
          f"{result['validation/' + workload.target_metric_name]:.4f} "
          f"(target {workload.validation_target_value}), "
          f"{train_state['accumulated_submission_time']:.1f}s")
    train_state["last_step_end_time"] = time.time()

  if bar is not None:
    bar.close()
  return TrialResult(log_dir=log_dir, global_step=global_step, eval_results=eval_results,
                     reached_target_step=reached_step, reached_target_time=reached_time,
                     params=params, optimizer_state=optimizer_state)


# ----------------------------------------------------------------------------
# A whole experiment: the official layout.


def experiment_log_dir(experiment_dir: str, experiment_name: str, workload_name: str) -> str:
  return os.path.join(os.path.abspath(experiment_dir), experiment_name,
                      f"{workload_name}_jax")


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


def run_experiment(*, workload_name: str, submission_path: str, tuning_search_space: str,
                   experiment_dir: str, experiment_name: str, num_tuning_trials: int = 1,
                   rng_seed: int = 0, api: str = "jit",
                   max_global_steps: Optional[int] = None,
                   eval_every_steps: Optional[int] = None, overwrite: bool = False,
                   resume_last_run: bool = False, save_checkpoints: bool = True,
                   stop_at_target: bool = True, progress: bool = False,
                   flag_values: Optional[Dict[str, Any]] = None) -> List[TrialResult]:
  """Runs `num_tuning_trials` trials into the official experiment layout."""
  import jax  # pylint: disable=g-import-not-at-top
  from weight_averaging import workloads  # pylint: disable=g-import-not-at-top

  if not experiment_dir or not experiment_name:
    raise ValueError("--experiment_dir and --experiment_name are required")
  if api == "pmap" and jax.process_count() > 1:
    raise ValueError(
        f"--api=pmap runs on one process; this run has {jax.process_count()} "
        "processes. Use the jit API (--api=jit) for several processes.")
  workload = workloads.get_workload(workload_name, api=api)
  submission = load_submission(submission_path)
  points = load_search_space(tuning_search_space, num_tuning_trials, rng_seed)
  log_root = experiment_log_dir(experiment_dir, experiment_name, workload_name)
  prepare_experiment_dir(log_root, overwrite, resume_last_run)
  results = []
  primary = distributed.is_primary()
  for trial, point in enumerate(points, start=1):
    trial_dir = os.path.join(log_root, f"trial_{trial}")
    hparams_path = os.path.join(trial_dir, "hparams.json")
    if os.path.exists(hparams_path):  # a resumed trial keeps its hyperparameters
      with open(hparams_path) as f:
        point = json.load(f)
    distributed.barrier(f"trial_{trial}_hparams_read")
    if primary:
      os.makedirs(trial_dir, exist_ok=True)
      if not os.path.exists(hparams_path):
        with open(hparams_path, "w") as f:
          json.dump(point, f, indent=2)
      meta = {"workload": workload_name, "api": api, "submission_path": submission_path,
              "rng_seed": rng_seed, "trial": trial, "jax_version": jax.__version__,
              "num_devices": jax.device_count(), "num_processes": jax.process_count(),
              "backend": jax.default_backend(), "python": sys.version.split()[0]}
      with open(os.path.join(trial_dir, "meta_data_0.json"), "w") as f:
        json.dump(meta, f, indent=2)
      with open(os.path.join(trial_dir, "flags_0.json"), "w") as f:
        json.dump(flag_values or {}, f, indent=2)
    distributed.barrier(f"trial_{trial}_ready")
    results.append(run_trial(
        workload, submission, as_hyperparameters(point), log_dir=trial_dir,
        rng_seed=rng_seed, api=api, max_global_steps=max_global_steps,
        eval_every_steps=eval_every_steps, resume=resume_last_run,
        save_checkpoints=save_checkpoints, stop_at_target=stop_at_target,
        progress=progress))
  return results


def main(argv):
  del argv
  if FLAGS.framework != "jax":
    raise app.UsageError(f"--framework must be 'jax', got {FLAGS.framework!r}")
  for name in ("submission_path", "experiment_dir", "experiment_name", "tuning_search_space"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  simulate_devices(FLAGS.num_devices)
  try:
    distributed.initialize(
        distributed.config_from(FLAGS.coordinator_address, FLAGS.num_processes,
                                FLAGS.process_id),
        timeout_s=FLAGS.initialization_timeout)
  except (ConnectionError, ValueError) as e:
    print(f"weight_averaging.runner: {e}", file=sys.stderr)
    sys.exit(1)
  results = run_experiment(
      workload_name=FLAGS.workload, submission_path=FLAGS.submission_path,
      tuning_search_space=FLAGS.tuning_search_space, experiment_dir=FLAGS.experiment_dir,
      experiment_name=FLAGS.experiment_name, num_tuning_trials=FLAGS.num_tuning_trials,
      rng_seed=FLAGS.rng_seed, api=FLAGS.api, max_global_steps=FLAGS.max_global_steps,
      eval_every_steps=FLAGS.eval_every_steps, overwrite=FLAGS.overwrite,
      resume_last_run=FLAGS.resume_last_run, save_checkpoints=FLAGS.save_checkpoints,
      stop_at_target=FLAGS.stop_at_target, progress=FLAGS.progress,
      flag_values=FLAGS.flag_values_dict())
  if not distributed.is_primary():
    return
  for i, r in enumerate(results, start=1):
    reached = (f"reached the validation target at step {r.reached_target_step} "
               f"({r.reached_target_time:.1f}s)" if r.reached_target_step else
               "did not reach the validation target")
    print(f"trial_{i}: {r.global_step} steps; {reached}; logs in {r.log_dir}")


if __name__ == "__main__":
  app.run(main)

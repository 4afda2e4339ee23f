"""orbax checkpoints of a trial; the latest two kept (and any asked for), a damaged one named
and passed over.

A checkpoint at step ``s`` is two entries of the trial directory:

* ``checkpoint_<s>/``: the arrays (params, optimizer state, model state), written by
  orbax as a flat dict ``{"000000": leaf_0, ...}`` in `jax.tree_util` leaf order, so
  that any pytree of arrays round-trips without custom code;
* ``runner_state_<s>.json``: the runner's own state (step, eval rows, clocks), and the
  device and process counts of the run that wrote it (``saved_by``).

The JSON is written last, atomically: a checkpoint counts only once it exists, so a
run killed while writing resumes from the previous one. The previous checkpoint is
kept too: when the latest one cannot be read (a truncated file, a full disk), restore
warns, naming the file, and resumes from the one before. A checkpoint written with
another device count whose arrays no longer fit is refused with both counts named.

Checkpoints at the steps a run asks to keep (``keep``: a trunk's branch points,
`weight_averaging.runner.branch`) are never removed, and `restore_checkpoint` reads the
one at a given ``step`` for a branch.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from weight_averaging.runner import distributed

_ARRAYS = "checkpoint_{step}"
_RUNNER_STATE = "runner_state_{step}.json"


def checkpoint_steps(log_dir: str) -> List[int]:
  """The steps of the complete checkpoints in `log_dir`, ascending."""
  prefix = _ARRAYS.format(step="")
  steps = []
  for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      step = int(name[len(prefix):])
      if os.path.exists(os.path.join(log_dir, _RUNNER_STATE.format(step=step))):
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
  array_handler = ocp.type_handlers.ArrayHandler
  if "use_replica_parallel" not in inspect.signature(array_handler.__init__).parameters:
    return ocp.PyTreeCheckpointer()
  others = [(t, ocp.type_handlers.get_type_handler(t))
            for t in (int, float, bytes, np.number, np.ndarray, str)]
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, array_handler(use_replica_parallel=False)), *others)
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _flat(leaves) -> Dict[str, Any]:
  return {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}


class DamagedCheckpoint(ValueError):
  """A checkpoint file that cannot be read; the message names it."""


def _brief(e: BaseException) -> str:
  """The exception's kind and first line, short (orbax's can run to pages)."""
  line = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {line[:200]}{'...' if len(line) > 200 else ''}"


def _remove(log_dir: str, step: int) -> None:
  shutil.rmtree(os.path.join(log_dir, _ARRAYS.format(step=step)), ignore_errors=True)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(log_dir, _RUNNER_STATE.format(step=step)))


def _saved_by() -> Dict[str, int]:
  return {"num_devices": jax.device_count(), "num_processes": jax.process_count()}


def save_checkpoint(log_dir: str, step: int, arrays: Dict[str, Any],
                    runner_state: Dict[str, Any], keep: Sequence[int] = ()) -> None:
  """Writes the arrays with orbax, then the runner's JSON state; keeps this one, the one
  before it and the earlier ones at the steps of `keep`.

  `jax.Array` leaves are written as they lie: with several processes each writes
  its own shards, so nothing is gathered on one process. Every process must call
  this; process 0 alone writes the JSON and removes the older checkpoints (and any of
  a later step, left by a run that this one resumed before), after orbax has
  finished the new one on all processes.
  """
  path = os.path.join(log_dir, _ARRAYS.format(step=step))
  if distributed.is_primary() and os.path.exists(path):
    shutil.rmtree(path)
  distributed.barrier(f"checkpoint_{step}_clear")
  _checkpointer().save(path, _flat(jax.tree_util.tree_leaves(arrays)))
  if distributed.is_primary():
    final = os.path.join(log_dir, _RUNNER_STATE.format(step=step))
    with open(final + ".tmp", "w") as f:
      json.dump(dict(runner_state, saved_by=_saved_by()), f)
    os.replace(final + ".tmp", final)
    steps = checkpoint_steps(log_dir)
    earlier = [s for s in steps if s < step]
    for old in [s for s in earlier[:-1] if s not in keep] + [s for s in steps if s > step]:
      _remove(log_dir, old)
  distributed.barrier(f"checkpoint_{step}_done")


def _restore_args(leaf, as_numpy: bool):
  """Restore each `jax.Array` leaf straight into its sharding (each process its part)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not as_numpy and isinstance(leaf, jax.Array):
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                dtype=leaf.dtype)
  return ocp.RestoreArgs(restore_type=np.ndarray)


def _read_runner_state(log_dir: str, step: int) -> Dict[str, Any]:
  path = os.path.join(log_dir, _RUNNER_STATE.format(step=step))
  try:
    with open(path) as f:
      state = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError included
    raise DamagedCheckpoint(f"{path} is damaged ({_brief(e)})") from e
  if not isinstance(state, dict) or "global_step" not in state:
    raise DamagedCheckpoint(f"{path} is damaged: it holds no runner state")
  return state


def _check_fits(path: str, saved, leaves, saved_by: Optional[Dict[str, int]]) -> None:
  """The saved arrays' count and shapes against this run's; a mismatch is named."""
  if len(saved) != len(leaves):
    raise ValueError(f"checkpoint {path} holds {len(saved)} arrays; this submission's "
                     f"state has {len(leaves)}: not the same submission?")
  for key, leaf in zip(sorted(saved), leaves):
    shape = getattr(saved[key], "shape", None)
    if shape is None or tuple(shape) == tuple(np.shape(leaf)):
      continue
    where = (f"array {key} is {tuple(shape)} in {path}, {tuple(np.shape(leaf))} in this run")
    devices = (saved_by or {}).get("num_devices")
    if devices is not None and devices != jax.device_count():
      raise ValueError(
          f"{path} was written by a run on {devices} devices; this run has "
          f"{jax.device_count()}, and its sharded arrays do not fit ({where}). Resume with "
          f"the saved run's device count (--num_devices={devices} on CPU), or start the "
          "trial anew with --overwrite")
    raise ValueError(f"{where}: not the same submission or hyperparameters?")


def _restore_step(log_dir: str, step: int, target: Dict[str, Any], as_numpy: bool):
  """``(arrays, runner_state)`` of the checkpoint at `step`, or `DamagedCheckpoint`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  runner_state = _read_runner_state(log_dir, step)
  path = os.path.join(log_dir, _ARRAYS.format(step=step))
  checkpointer = _checkpointer()
  try:
    saved = checkpointer.metadata(path)
    saved = getattr(saved, "item_metadata", saved)  # orbax >= 0.7 wraps the tree
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
    saved, error = None, f" ({_brief(e)})"
  else:
    error = ""
  if saved is None:  # newer orbax logs the error and returns None
    raise DamagedCheckpoint(f"{os.path.join(path, '_METADATA')} is damaged: orbax cannot "
                            f"read the checkpoint's index{error}")
  saved = dict(saved.items())
  leaves, treedef = jax.tree_util.tree_flatten(target)
  _check_fits(path, saved, leaves, runner_state.get("saved_by"))
  item = _flat(leaves)
  restore_args = {k: _restore_args(v, as_numpy) for k, v in item.items()}
  try:
    flat = checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(f"{path} is damaged: orbax cannot read its arrays "
                            f"({_brief(e)})") from e
  return treedef.unflatten([flat[f"{i:06d}"] for i in range(len(leaves))]), runner_state


def _warn_devices(log_dir: str, runner_state: Dict[str, Any]) -> None:
  saved = runner_state.get("saved_by", {}).get("num_devices")
  if saved is not None and saved != jax.device_count():
    logging.warning("%s: resuming a run saved on %d devices on %d devices; the arrays fit, "
                    "but the reductions (and so the last digits) may differ", log_dir, saved,
                    jax.device_count())


def restore_checkpoint(log_dir: str, target: Dict[str, Any], as_numpy: bool = True,
                       step: Optional[int] = None) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """``(arrays, runner_state)`` of the latest readable checkpoint, shaped like `target`;
  None when there is none. With `step`, the checkpoint at that step, or `ValueError`
  naming the steps there are (a damaged one is not passed over: a branch needs that step).

  With ``as_numpy`` every leaf comes back as a NumPy array; otherwise a leaf that
  is a `jax.Array` in `target` comes back with that leaf's sharding, each process
  reading only its own shards. A damaged checkpoint is named in a warning and the
  one before it is read instead.

  Raises:
    DamagedCheckpoint: there are checkpoints, but none can be read (each is named).
    ValueError: the checkpoint's arrays do not fit `target` (another device count,
      submission or hyperparameters), named.
  """
  steps = checkpoint_steps(log_dir)
  if step is not None:
    if step not in steps:
      raise ValueError(
          f"{log_dir} has no checkpoint at step {step} (it has {steps or 'none'}): run that "
          f"trial with --checkpoint_steps={step}, to at least step {step}")
    return _restore_step(log_dir, step, target, as_numpy)
  damaged = []
  for step in reversed(steps):  # pylint: disable=redefined-argument-from-local
    try:
      arrays, runner_state = _restore_step(log_dir, step, target, as_numpy)
    except DamagedCheckpoint as e:
      damaged.append(str(e))
      logging.warning("%s; resuming from the checkpoint before it, if any", e)
      continue
    _warn_devices(log_dir, runner_state)
    return arrays, runner_state
  if damaged:
    raise DamagedCheckpoint(
        f"no readable checkpoint in {log_dir}: " + "; ".join(damaged) +
        ". Start the trial anew with --overwrite (or remove the damaged files)")
  return None

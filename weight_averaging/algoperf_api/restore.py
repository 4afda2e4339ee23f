"""Recognising a checkpoint the official runner restored, and undoing its device axis.

AlgoPerf's JAX restore (``algoperf/checkpoint_utils.py``, `maybe_restore_checkpoint`
at 2c90454f and at fb2f492a) reads the checkpoint into host arrays and passes the
optimizer state's first element, the params and the model state through
``flax.jax_utils.replicate`` (`replicate_checkpoint`): every leaf comes back with an
extra leading axis of size ``jax.local_device_count()``, ``x -> stack([x] * n)``, on
the devices. Its next call is ``update_params`` (``prepare_for_eval`` only follows a
step), handed those trees.

* jit API (2c90454f): the runner saves the arrays as they are, so each restored leaf
  is ``(n, *shape)`` of what the submission initialised: `strip_device_axis`
  recognises that by the shapes and keeps ``x[0]``.
* pmap API (fb2f492a): the runner saves ``x[0]`` of every leaf (`unreplicate`) and
  replicates again on restore, and the submission's state carries that device axis
  from ``init_optimizer_state`` on, so the restored shapes are the initialised ones
  and nothing is stripped; a tree replicated once more (saved without the
  ``unreplicate``) is stripped like the jit API's.

The decision is per tree and all or nothing: either every leaf has the shape it was
initialised with, or every leaf has ``(n, *that shape)`` for one ``n`` (1 included).
Anything else is a `ValueError` naming the leaf, its shape and the two it could have
had. Only ``jax`` and ``numpy`` are used: an exported entry carries no flax.

Upstream, before any of this: at 2c90454f with flax 0.10.7's default (orbax)
checkpointing, ``flax_checkpoints.restore_checkpoint`` returns ``None`` for the
target's ``'eval_results': None`` and ``checkpoint_utils.py`` line 127 calls
``.items()`` on it, so the runner's restore fails for every submission; with flax's
msgpack checkpoints (``flax_use_orbax_checkpointing`` off) it runs, and this applies.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import numpy as np


def shapes(tree: Any) -> Any:
  """`tree` with each leaf replaced by its `jax.ShapeDtypeStruct`: what is checked."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype), tree)


def _leaf_shapes(expected: Any):
  return [tuple(x.shape) for x in jax.tree_util.tree_leaves(expected)]


def device_axis(tree: Any, expected: Any, what: str) -> int:
  """0 when `tree` has the `expected` shapes, ``n`` when it is ``(n, *expected)``.

  `expected` is `shapes` of the tree as initialised. `what` names the tree in the
  error (``'optimizer state'``, ``'params'``, ``'model state'``).
  """
  found = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = _leaf_shapes(expected)
  if len(found) != len(want):
    raise ValueError(
        f"the restored {what} has {len(found)} arrays where this submission "
        f"initialised {len(want)}: restore a checkpoint of the same workload, "
        "submission and hyperparameters")
  n = None
  for (path, leaf), shape in zip(found, want):
    got = tuple(np.shape(leaf))
    if n is None:  # the first leaf decides the layout; every other must agree
      n = got[0] if (len(got) == len(shape) + 1 and got[1:] == shape
                     and got != shape) else 0
    if got != ((n,) + shape if n else shape):
      replicated = str((n or "n",) + shape).replace("'", "")
      raise ValueError(
          f"restored {what} leaf {jax.tree_util.keystr(path) or '(root)'} has shape "
          f"{got}; this submission expects {shape} (as initialised) or {replicated} "
          "(with the leading device axis flax.jax_utils.replicate adds on restore), "
          "the same for every leaf. Restore a checkpoint of the same workload, "
          "submission and hyperparameters.")
  return n or 0


def _first(x, shape: Tuple[int, ...]):
  """``x[0]`` of a replicated leaf, without gathering the other copies to the host.

  A device array's first copy is the shard that starts at index 0 of the device
  axis: its buffer itself when the sharding drops the axis (pmap's), else a host
  copy of that one shard. A host array gives a view.
  """
  if isinstance(x, jax.Array):
    for shard in x.addressable_shards:
      index = shard.index[0] if shard.index else 0
      if (index if isinstance(index, int) else index.start or 0) != 0:
        continue
      if shard.data.shape == shape:
        return shard.data
      if shard.data.shape == (1,) + shape:
        return np.asarray(shard.data).reshape(shape)
  return np.asarray(x)[0]


def strip_device_axis(tree: Any, expected: Any, what: str) -> Tuple[Any, bool]:
  """``(tree without the restore's device axis, whether there was one)``.

  Leaves of a replicated tree become ``x[0]``: a view of a host array, or device
  0's copy of a device array (no other copy is read). A tree already in the
  `expected` shapes comes back as it is.
  """
  if not device_axis(tree, expected, what):
    return tree, False
  flat, treedef = jax.tree_util.tree_flatten(tree)
  return treedef.unflatten([_first(x, s) for x, s in zip(flat, _leaf_shapes(expected))]
                           ), True

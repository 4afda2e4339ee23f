r"""How parameters are cut into blocks, and the statistics and roots of a stack of blocks.

A parameter is squeezed (size-1 dims dropped), adjacent small dims are merged
(`merge_small_dims`) and every dim is split into blocks of at most ``block_size``
(`block_groups`, `split_into_blocks`, `merge_blocks`). Each block of rank k has one
statistic per dim; `block_plan` assigns every statistic a slot in the stack of its
``(size, exponent)``, so the roots of all equal-size statistics are one batched call.
The plan is static: it is recomputed from the shapes, never stored in the state.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np


def merge_small_dims(shape: Sequence[int], max_dim: int) -> Tuple[int, ...]:
  """Drops size-1 dims, then merges adjacent dims while their product is <= max_dim.

  ``[1, 2, 512, 1, 2048, 1, 3, 4]`` at 1024 gives ``[1024, 2048, 12]``. A tensor
  of a single element gives ``()``. ``max_dim <= 1`` only squeezes.
  """
  merged: List[int] = []
  for d in shape:
    if d == 1:
      continue
    if merged and merged[-1] * d <= max_dim:
      merged[-1] *= d
    else:
      merged.append(int(d))
  return tuple(merged)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """Blocks of one shape in a tensor: a regular grid ``counts`` of ``block_shape`` blocks.

  ``starts`` and ``stops`` delimit the sub-tensor the grid covers. A dim of length
  ``n > block_size`` splits into ``n // block_size`` full blocks and, if
  ``n % block_size``, one remainder block, so a rank-k tensor has at most
  :math:`2^k` groups.
  """
  starts: Tuple[int, ...]
  stops: Tuple[int, ...]
  counts: Tuple[int, ...]
  block_shape: Tuple[int, ...]

  @property
  def num_blocks(self) -> int:
    return int(np.prod(self.counts, dtype=np.int64))


def _dim_segments(n: int, block_size: int):
  if n <= block_size:
    return [(0, n, 1, n)]
  full = n // block_size
  segments = [(0, full * block_size, full, block_size)]
  if n % block_size:
    segments.append((full * block_size, n, 1, n % block_size))
  return segments


def block_groups(shape: Sequence[int], block_size: int) -> Tuple[BlockGroup, ...]:
  """The groups of equal-shape blocks of a tensor of this shape (see `BlockGroup`)."""
  per_dim = [_dim_segments(int(n), block_size) for n in shape]
  groups = []
  for combo in itertools.product(*per_dim):
    groups.append(BlockGroup(starts=tuple(s[0] for s in combo),
                             stops=tuple(s[1] for s in combo),
                             counts=tuple(s[2] for s in combo),
                             block_shape=tuple(s[3] for s in combo)))
  return tuple(groups)


def split_into_blocks(x: jnp.ndarray, block_size: int) -> List[jnp.ndarray]:
  """Splits ``x`` into one ``[num_blocks, *block_shape]`` array per `BlockGroup`."""
  k = x.ndim
  out = []
  for g in block_groups(x.shape, block_size):
    sub = x[tuple(slice(a, b) for a, b in zip(g.starts, g.stops))]
    interleaved = [v for pair in zip(g.counts, g.block_shape) for v in pair]
    sub = sub.reshape(interleaved)
    sub = jnp.transpose(sub, list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
    out.append(sub.reshape((g.num_blocks,) + g.block_shape))
  return out


def merge_blocks(blocks: Sequence[jnp.ndarray], shape: Sequence[int],
                 block_size: int) -> jnp.ndarray:
  """Inverse of `split_into_blocks`: reassembles a tensor of ``shape``."""
  shape = tuple(int(n) for n in shape)
  k = len(shape)
  groups = block_groups(shape, block_size)
  pieces = []
  for g, b in zip(groups, blocks):
    b = b.reshape(g.counts + g.block_shape)
    # Inverse of the split's permutation (counts first, then block dims).
    perm = [v for i in range(k) for v in (i, k + i)]
    b = jnp.transpose(b, perm)
    pieces.append(b.reshape(tuple(e - s for s, e in zip(g.starts, g.stops))))
  if len(pieces) == 1:
    return pieces[0]
  out = jnp.zeros(shape, pieces[0].dtype)
  for g, piece in zip(groups, pieces):
    out = out.at[tuple(slice(a, b) for a, b in zip(g.starts, g.stops))].set(piece)
  return out


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static preconditioning plan of one parameter (recomputed from its shape)."""
  shape: Tuple[int, ...]
  merged_shape: Tuple[int, ...]
  preconditioned: bool
  exponent: int
  groups: Tuple[BlockGroup, ...]
  # For every group and dim: (stack index, offset of the group's blocks in it).
  slots: Tuple[Tuple[Tuple[int, int], ...], ...]


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Plans of all leaves, and the stacks: one ``(d, p, n)`` per size and exponent."""
  leaves: Tuple[LeafPlan, ...]
  stacks: Tuple[Tuple[int, int, int], ...]


def block_plan(shapes: Sequence[Sequence[int]], *, block_size: int,
               merge_dims_threshold: int, skip_dim_gt: int,
               exponent_override: int = 0) -> BlockPlan:
  """Plans the statistics of a list of parameter shapes.

  A parameter is preconditioned unless, after squeezing, it is a scalar or one of
  its dims exceeds ``skip_dim_gt`` (an embedding table, say): those get the graft
  step only. The others are merged (`merge_small_dims`) and blocked
  (`block_groups`); every block of rank k gets k statistics with exponent
  ``p = exponent_override or 2k``, stored in the stack of their ``(size, p)``.
  """
  counts: Dict[Tuple[int, int], int] = {}
  raw = []
  for shape in shapes:
    shape = tuple(int(n) for n in shape)
    squeezed = tuple(n for n in shape if n != 1)
    if not squeezed or max(squeezed) > skip_dim_gt:
      raw.append((shape, squeezed, False, 0, (), ()))
      continue
    merged = merge_small_dims(squeezed, merge_dims_threshold)
    p = int(exponent_override) if exponent_override else 2 * len(merged)
    groups = block_groups(merged, block_size)
    slots = []
    for g in groups:
      dims = []
      for d in g.block_shape:
        key = (d, p)
        dims.append((key, counts.get(key, 0)))
        counts[key] = counts.get(key, 0) + g.num_blocks
      slots.append(tuple(dims))
    raw.append((shape, merged, True, p, groups, tuple(slots)))
  keys = sorted(counts)
  index = {key: i for i, key in enumerate(keys)}
  leaves = []
  for shape, merged, pre, p, groups, slots in raw:
    slots = tuple(tuple((index[key], off) for key, off in dims) for dims in slots)
    leaves.append(LeafPlan(shape, merged, pre, p, groups, slots))
  return BlockPlan(tuple(leaves), tuple((d, p, counts[(d, p)]) for d, p in keys))


# ---------------------------------------------------------------------------
# Statistics and preconditioning of stacks of blocks
# ---------------------------------------------------------------------------


def block_statistics(blocks, dim, precision):
  """``B_(i) B_(i)^T`` for a ``[n, *block_shape]`` stack of blocks, batched over n."""
  n = blocks.shape[0]
  unfolded = jnp.moveaxis(blocks, dim + 1, 1).reshape(n, blocks.shape[dim + 1], -1)
  return jnp.einsum("nij,nkj->nik", unfolded, unfolded, precision=precision)


def apply_roots(blocks, roots, precision):
  """``B x_1 P_1 ... x_k P_k`` for stacks of blocks and of (symmetric) roots."""
  n = blocks.shape[0]
  for dim, root in enumerate(roots):
    moved = jnp.moveaxis(blocks, dim + 1, -1)
    inner = moved.shape
    flat = jnp.matmul(moved.reshape(n, -1, inner[-1]), root, precision=precision)
    blocks = jnp.moveaxis(flat.reshape(inner), -1, dim + 1)
  return blocks

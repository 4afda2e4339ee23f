r"""Distributed Shampoo as optax transforms, in two recipes (Google's and Meta's 2024 one).

For a parameter tensor with gradient :math:`G` (after squeezing size-1 dims, merging
small adjacent dims and splitting every dim into blocks of at most ``block_size``),
each block :math:`B` of rank :math:`k` keeps one statistic per dim :math:`i`,

.. math::

  L_i \leftarrow \beta_2 L_i + (1 - \beta_2)\, B_{(i)} B_{(i)}^\top,

where :math:`B_{(i)}` is the block unfolded along dim :math:`i` (every
``statistics_every`` steps). Every ``preconditioning_every`` steps the roots
:math:`P_i = (L_i + \epsilon I)^{-1/p}` are recomputed (``p = 2k`` unless
``exponent_override``), and the block of the search input :math:`X` (the gradient,
or its bias-corrected first moment) is preconditioned as

.. math::

  D = X \times_1 P_1 \times_2 P_2 \cdots \times_k P_k .

Grafting gives the direction the norm of a diagonal optimizer's step :math:`A`
(SGD, Adam, RMSProp or normalized RMSProp), per tensor or per block:

.. math::

  D \leftarrow D\, \lVert A \rVert / (\lVert D \rVert + 10^{-16}).

Before ``start_preconditioning_step`` (and always for parameters that are skipped,
see `block_plan`) the step is :math:`A` itself. Weight decay :math:`\lambda\theta`
is added to the step, then optional momentum, then the learning rate:

.. math::

  u = D + \lambda\theta, \quad m \leftarrow \mu m + w u, \quad
  \text{step} = w u + \mu m \ \text{(Nesterov)} \ \text{or} \ m, \quad
  \theta \leftarrow \theta - \eta\, \text{step},

with :math:`w = 1 - \mu` for moving-average momentum and :math:`w = 1` otherwise.

The roots of all blocks are computed in a few batched calls: statistics of the
same size and exponent live in one ``[n, d, d]`` stack, and the root is ``vmap``-ed
over the stack under a `jax.lax.cond`, so the eigendecompositions only run on the
steps that need them and compile time does not grow with the number of blocks.
With ``axis_name`` (pmap, or `shard_map` under jit) or ``mesh`` (plain jit), every
device computes the roots of its share of each stack and the shares are gathered,
so all devices hold bitwise-equal roots.

The two recipes differ only in hyperparameters (`PRESETS`): Google's (the AlgoPerf
JAX baseline's intended settings: statistics initialised to
:math:`\epsilon I`, relative :math:`\epsilon`, normalized-RMSProp grafting per tensor,
Nesterov moving-average momentum with separate buffers for the Shampoo and graft
steps) and Meta's AlgoPerf 2024 winner (zero-initialised, bias-corrected statistics,
absolute :math:`\epsilon`, Adam grafting per block, a bias-corrected NAdam first moment
preconditioned by both methods, decoupled weight decay).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
ScalarOrSchedule = Union[float, Schedule]

GRAFT_TYPES = ("sgd", "adam", "rmsprop", "rmsprop_normalized")
ROOT_METHODS = ("eigh", "newton")
# Guards the divisions by a norm (grafting and the normalized RMSProp input).
NORM_EPS = 1e-16


# ---------------------------------------------------------------------------
# Inverse p-th root
# ---------------------------------------------------------------------------


def _power_iteration(matrix, num_iters, precision):
  """Largest eigenvalue of a symmetric PSD matrix, from a fixed start vector."""
  n = matrix.shape[0]
  v0 = jnp.ones((n,), matrix.dtype) / math.sqrt(n)

  def body(_, v):
    w = jnp.matmul(matrix, v, precision=precision)
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(matrix.dtype).tiny)

  v = lax.fori_loop(0, num_iters, body, v0)
  return jnp.dot(v, jnp.matmul(matrix, v, precision=precision), precision=precision)


def _matrix_power(matrix, p, precision):
  """``matrix**p`` for a static positive int p, by binary exponentiation."""
  result, base = None, matrix
  while p:
    if p & 1:
      result = base if result is None else jnp.matmul(result, base, precision=precision)
    p >>= 1
    if p:
      base = jnp.matmul(base, base, precision=precision)
  return result


def _ridge(lambda_max, epsilon, relative_epsilon):
  # A zero matrix has lambda_max = 0; falling back to an absolute ridge keeps the
  # root finite (epsilon**(-1/p) * I) instead of dividing by zero.
  if not relative_epsilon:
    return jnp.asarray(epsilon, jnp.float32)
  return epsilon * jnp.where(lambda_max > 0, lambda_max, 1.0)


def _eigh_root(matrix, p, epsilon, relative_epsilon, precision):
  w, v = jnp.linalg.eigh(matrix)
  # The eigendecomposition reconstructs the matrix to ~float32 precision when it
  # converged; a large residual means it did not.
  recon = jnp.matmul(v * w[None, :], v.T, precision=precision)
  error = jnp.linalg.norm(recon - matrix) / jnp.maximum(jnp.linalg.norm(matrix),
                                                        jnp.finfo(jnp.float32).tiny)
  # Statistics are PSD in exact arithmetic; rounding can leave small negative
  # eigenvalues, so the spectrum is shifted up by -min(lambda_min, 0).
  w = w - jnp.minimum(jnp.min(w), 0.0)
  w = w + _ridge(jnp.max(w), epsilon, relative_epsilon)
  root = jnp.matmul(v * (w ** (-1.0 / p))[None, :], v.T, precision=precision)
  return root, error


def _newton_root(matrix, p, epsilon, relative_epsilon, num_iters, tolerance,
                 power_iterations, precision):
  n = matrix.shape[0]
  identity = jnp.eye(n, dtype=jnp.float32)
  lambda_max = (_power_iteration(matrix, power_iterations, precision)
                if relative_epsilon else jnp.zeros([], jnp.float32))
  a = matrix + _ridge(lambda_max, epsilon, relative_epsilon) * identity
  # With z = (1 + p) / (2 ||A||_F) the spectrum of M_0 = z A lies in (0, (1 + p) / 2],
  # inside the region (0, p + 1) where the iteration converges.
  z = (1.0 + p) / (2.0 * jnp.linalg.norm(a))
  m0 = z * a
  h0 = z ** (1.0 / p) * identity
  err0 = jnp.max(jnp.abs(m0 - identity))

  def cond(carry):
    i, _, _, _, _, _, run = carry
    return jnp.logical_and(i < num_iters, run)

  def body(carry):
    i, m, h, err, _, _, _ = carry
    t = (1.0 + 1.0 / p) * identity - m / p
    m_new = jnp.matmul(_matrix_power(t, p, precision), m, precision=precision)
    h_new = jnp.matmul(h, t, precision=precision)
    err_new = jnp.max(jnp.abs(m_new - identity))
    # Rounding makes the error grow again once converged; stop and keep the
    # previous iterate then.
    improved = err_new < 1.2 * err
    m = jnp.where(improved, m_new, m)
    h = jnp.where(improved, h_new, h)
    err = jnp.where(improved, err_new, err)
    run = jnp.logical_and(improved, err_new > tolerance)
    return i + 1, m, h, err, m_new, h_new, run

  carry = (jnp.zeros([], jnp.int32), m0, h0, err0, m0, h0, err0 > tolerance)
  _, _, h, err, _, _, _ = lax.while_loop(cond, body, carry)
  return h, err


def matrix_inverse_pth_root(matrix: jnp.ndarray, p: int, *, epsilon: float = 1e-6,
                            relative_epsilon: bool = True, method: str = "eigh",
                            newton_iterations: int = 100, newton_tolerance: float = 1e-6,
                            power_iterations: int = 100,
                            precision=lax.Precision.HIGHEST
                            ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  r"""Inverse p-th root :math:`(A + r I)^{-1/p}` of a symmetric PSD matrix, in float32.

  The ridge is :math:`r = \epsilon\,\lambda_{max}(A)` with ``relative_epsilon``
  (:math:`\epsilon` alone when :math:`A = 0`), else :math:`r = \epsilon`.

  * ``method='eigh'``: with :math:`A = U \operatorname{diag}(\lambda) U^\top` and the
    spectrum shifted to be non-negative, :math:`\lambda' = \lambda - \min(\lambda_{min}, 0)`,
    the root is :math:`U \operatorname{diag}((\lambda' + r)^{-1/p}) U^\top` (here
    :math:`\lambda_{max}` is exact). The error is the relative Frobenius residual
    :math:`\lVert U \operatorname{diag}(\lambda) U^\top - A \rVert / \lVert A \rVert`
    of the decomposition.
  * ``method='newton'``: the coupled Newton iteration (Higham, *Functions of
    Matrices*, 7.18) on :math:`\tilde A = A + r I` with :math:`\lambda_{max}` from
    ``power_iterations`` power-iteration steps: :math:`z = (1+p)/(2\lVert\tilde A\rVert_F)`,
    :math:`M_0 = z\tilde A`, :math:`H_0 = z^{1/p} I`, then
    :math:`T = (1 + 1/p) I - M/p`, :math:`M \leftarrow T^p M`, :math:`H \leftarrow H T`
    until :math:`\max|M - I| <` ``newton_tolerance``, ``newton_iterations`` steps,
    or the error grows by 1.2x (the previous iterate is kept). The error is
    :math:`\max|M - I|`.

  Args:
    matrix: ``[n, n]`` symmetric PSD matrix (cast to float32).
    p: positive int exponent (static).
    epsilon: the ridge, relative or absolute.
    relative_epsilon: scale ``epsilon`` by the largest eigenvalue.
    method: ``'eigh'`` or ``'newton'``.
    newton_iterations, newton_tolerance, power_iterations: Newton's settings.
    precision: precision of the matrix products.

  Returns:
    ``(root, error)``; the error is ``inf`` when the root is not finite, so a root
    is usable iff ``error < threshold`` (see `root_is_valid`).
  """
  if method not in ROOT_METHODS:
    raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}")
  p = int(p)
  if p < 1:
    raise ValueError(f"p must be a positive int, got {p}")
  matrix = jnp.asarray(matrix, jnp.float32)
  # Symmetrise: the statistics are symmetric in exact arithmetic only.
  matrix = 0.5 * (matrix + matrix.T)
  if method == "eigh":
    root, error = _eigh_root(matrix, p, epsilon, relative_epsilon, precision)
  else:
    root, error = _newton_root(matrix, p, epsilon, relative_epsilon, newton_iterations,
                               newton_tolerance, power_iterations, precision)
  finite = jnp.all(jnp.isfinite(root)) & jnp.isfinite(error)
  return root, jnp.where(finite, error, jnp.inf).astype(jnp.float32)


def root_is_valid(error: jnp.ndarray, threshold: float) -> jnp.ndarray:
  """Whether a root with this error may replace the previous one (NaN fails)."""
  return jnp.isfinite(error) & (error < threshold)


# ---------------------------------------------------------------------------
# Shapes: squeeze, merge, block
# ---------------------------------------------------------------------------


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
# Hyperparameters
# ---------------------------------------------------------------------------

#: The two recipes. `scale_by_shampoo`'s own defaults are the Google ones.
PRESETS: Dict[str, Dict[str, Any]] = {
    # google-research's distributed_shampoo with the AlgoPerf JAX baseline's
    # intended settings (preconditioning actually on).
    "google": dict(
        block_size=1024, merge_dims_threshold=4096, skip_dim_gt=4096,
        beta1=0.0, use_nadam=False, beta2=0.999, diagonal_epsilon=1e-8,
        matrix_epsilon=1e-6, relative_matrix_epsilon=True, statistics_init_scale=None,
        statistics_bias_correction=False, statistics_every=1, preconditioning_every=20,
        start_preconditioning_step=101, exponent_override=0,
        graft_type="rmsprop_normalized", graft_per_block=False, momentum=0.9,
        nesterov=True, moving_average_for_momentum=True, graft_momentum_buffer=True,
        inverse_failure_threshold=0.1, root_method="eigh"),
    # Meta's Distributed Shampoo as configured for its AlgoPerf 2024 submission.
    "meta": dict(
        block_size=1024, merge_dims_threshold=1024, skip_dim_gt=999_999,
        beta1=0.9, use_nadam=True, beta2=0.999, diagonal_epsilon=1e-8,
        matrix_epsilon=1e-8, relative_matrix_epsilon=False, statistics_init_scale=0.0,
        statistics_bias_correction=True, statistics_every=1, preconditioning_every=100,
        start_preconditioning_step=-1, exponent_override=0,
        graft_type="adam", graft_per_block=True, momentum=0.0,
        nesterov=True, moving_average_for_momentum=False, graft_momentum_buffer=False,
        inverse_failure_threshold=0.1, root_method="eigh"),
}


def shampoo_hyperparameters(preset: str = "google", **overrides) -> Dict[str, Any]:
  """The keyword arguments of `scale_by_shampoo` for a preset, with overrides."""
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
  unknown = set(overrides) - set(_SCALE_BY_SHAMPOO_ARGS)
  if unknown:
    raise TypeError(f"unknown Shampoo hyperparameters: {sorted(unknown)}")
  return {**PRESETS[preset], **overrides}


# ---------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------


class ScaleByShampooState(NamedTuple):
  """State of `scale_by_shampoo`; every field is an array or a tuple/pytree of arrays.

  ``statistics`` and ``roots`` hold one ``[n, d, d]`` stack per ``(d, p)`` of
  `block_plan`. Moment fields a configuration does not use are ``()``.
  """

  count: jnp.ndarray  # int32, number of updates so far
  statistics: Tuple[jnp.ndarray, ...]
  roots: Tuple[jnp.ndarray, ...]
  first_moment: Any  # bias-uncorrected EMA of gradients (beta1 > 0)
  graft_moment: Any  # second moment of the graft (adam, rmsprop*)
  momentum: Any  # momentum of the step (of the Shampoo step with two buffers)
  graft_momentum: Any  # momentum of the graft step (graft_momentum_buffer)


def _safe_increment(count):
  return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _axis_size(axis_name):
  if hasattr(lax, "axis_size"):
    return lax.axis_size(axis_name)
  return lax.psum(1, axis_name)  # a Python int under pmap and shard_map


def _shard_map(f, mesh, in_specs, out_specs):
  # The body has no collectives, so the replication checks have nothing to verify
  # (and they reject the loops' constant initial carries).
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map  # jax < 0.7
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _pad_with_identity(stack, multiple):
  n, d = stack.shape[0], stack.shape[1]
  pad = -n % multiple
  if not pad:
    return stack
  eye = jnp.broadcast_to(jnp.eye(d, dtype=stack.dtype), (pad, d, d))
  return jnp.concatenate([stack, eye], axis=0)


def _block_stats(blocks, dim, precision):
  """``B_(i) B_(i)^T`` for a ``[n, *block_shape]`` stack of blocks, batched over n."""
  n = blocks.shape[0]
  unfolded = jnp.moveaxis(blocks, dim + 1, 1).reshape(n, blocks.shape[dim + 1], -1)
  return jnp.einsum("nij,nkj->nik", unfolded, unfolded, precision=precision)


def _apply_roots(blocks, roots, precision):
  """``B x_1 P_1 ... x_k P_k`` for stacks of blocks and of (symmetric) roots."""
  n = blocks.shape[0]
  for dim, root in enumerate(roots):
    moved = jnp.moveaxis(blocks, dim + 1, -1)
    inner = moved.shape
    flat = jnp.matmul(moved.reshape(n, -1, inner[-1]), root, precision=precision)
    blocks = jnp.moveaxis(flat.reshape(inner), -1, dim + 1)
  return blocks


def _tree_zeros(leaves):
  return [jnp.zeros(x.shape, jnp.float32) for x in leaves]


def scale_by_shampoo(
    block_size: int = 1024,
    merge_dims_threshold: int = 4096,
    skip_dim_gt: int = 4096,
    beta1: float = 0.0,
    use_nadam: bool = False,
    beta2: float = 0.999,
    diagonal_epsilon: float = 1e-8,
    matrix_epsilon: float = 1e-6,
    relative_matrix_epsilon: bool = True,
    statistics_init_scale: Optional[float] = None,
    statistics_bias_correction: bool = False,
    statistics_every: int = 1,
    preconditioning_every: int = 20,
    start_preconditioning_step: int = 101,
    exponent_override: int = 0,
    graft_type: str = "rmsprop_normalized",
    graft_per_block: bool = False,
    momentum: float = 0.9,
    nesterov: bool = True,
    moving_average_for_momentum: bool = True,
    graft_momentum_buffer: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    inverse_failure_threshold: float = 0.1,
    root_method: str = "eigh",
    axis_name: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    mesh_axis_name: str = "batch",
    precision=lax.Precision.HIGHEST,
    newton_iterations: int = 100,
    newton_tolerance: float = 1e-6,
    power_iterations: int = 100,
) -> optax.GradientTransformation:
  r"""Shampoo's preconditioned, grafted step, with weight decay and momentum (no LR).

  One update at step :math:`t = 1, 2, \dots` (``count = t - 1``) does, per parameter:

  1. Search input :math:`X`: the gradient :math:`g` if ``beta1 == 0``, else the
     bias-corrected first moment :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
     :math:`X = m / (1-\beta_1^t)`, or with ``use_nadam``
     :math:`X = (\beta_1 m + (1-\beta_1) g) / (1-\beta_1^t)`.
  2. Graft :math:`A` from :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`:
     ``sgd`` :math:`A = X`; ``rmsprop`` :math:`A = X / (\sqrt v + \epsilon_d)`;
     ``adam`` :math:`A = X / (\sqrt{v / (1-\beta_2^t)} + \epsilon_d)`;
     ``rmsprop_normalized`` the same as ``rmsprop`` on :math:`g / \lVert g\rVert` and
     :math:`X / \lVert X \rVert` (norms per tensor).
  3. Every ``statistics_every`` steps, per block and dim,
     :math:`L_i \leftarrow \beta_2 L_i + (1-\beta_2) G_{(i)} G_{(i)}^\top`, starting from
     ``statistics_init_scale`` :math:`\cdot I` (default ``matrix_epsilon``).
  4. When ``count % preconditioning_every == 0`` (so at the first step), after the
     statistics update: :math:`P_i` = `matrix_inverse_pth_root` of :math:`L_i` (divided
     by :math:`1 - \beta_2^{s}`, s the number of statistics updates, with
     ``statistics_bias_correction``). A root whose error is NaN or
     :math:`\ge` ``inverse_failure_threshold`` is discarded and the previous one kept.
  5. :math:`D = X \times_1 P_1 \cdots`, rescaled to :math:`\lVert A\rVert` per tensor
     (or per block with ``graft_per_block``). :math:`D = A` while
     ``count < start_preconditioning_step`` (``-1``: equal to
     ``preconditioning_every``) and for skipped parameters.
  6. :math:`u = D + \lambda\theta` (``weight_decay``, optionally masked);
     :math:`m_u \leftarrow \mu m_u + w u` with :math:`w = 1-\mu` if
     ``moving_average_for_momentum`` else 1; output :math:`w u + \mu m_u` with
     ``nesterov``, else :math:`m_u` (just :math:`u` when :math:`\mu = 0`). With
     ``graft_momentum_buffer`` the Shampoo and graft steps keep separate momentum
     buffers, both always updated, and the step picks one (Google's design).

  The state holds arrays only (`ScaleByShampooState`), so it checkpoints as a
  plain pytree; the block plan is static and recomputed from the shapes.

  Distribution of the root computations (the rest is replicated):

  * ``axis_name``: inside `jax.pmap` or `shard_map` over that axis, each device
    computes its contiguous share of every stack, then `lax.all_gather`.
  * ``mesh``: under plain `jax.jit`, the stacks are split over
    ``mesh_axis_name`` by a `shard_map` and gathered back to replicated.

  Args:
    block_size: largest block edge (root cost :math:`O(d^3)`).
    merge_dims_threshold: merge adjacent dims while their product is at most this.
    skip_dim_gt: parameters with a dim above this get the graft step only.
    beta1: decay of the first-moment EMA that forms the search input (0: gradient).
    use_nadam: Nesterov look-ahead in the first moment.
    beta2: decay of the statistics and of the graft's second moment.
    diagonal_epsilon: the graft's :math:`\epsilon_d`.
    matrix_epsilon: ridge of the roots (see ``relative_matrix_epsilon``).
    relative_matrix_epsilon: ridge :math:`\epsilon\lambda_{max}` instead of :math:`\epsilon`.
    statistics_init_scale: statistics start at this times :math:`I` (None: matrix_epsilon).
    statistics_bias_correction: divide the statistics by :math:`1-\beta_2^s` for the root.
    statistics_every: statistics update interval.
    preconditioning_every: root recompute interval.
    start_preconditioning_step: first step (0-based count) that uses the roots.
    exponent_override: p for every statistic instead of 2 x rank (0: off).
    graft_type: one of ``GRAFT_TYPES``.
    graft_per_block: graft norms per block instead of per tensor.
    momentum: :math:`\mu`, momentum of the step (0: none).
    nesterov: Nesterov momentum.
    moving_average_for_momentum: :math:`w = 1 - \mu` instead of 1.
    graft_momentum_buffer: separate momentum for the graft step.
    weight_decay: :math:`\lambda`, added to the step before momentum and the LR.
    weight_decay_mask: pytree of bools (or a callable of the params) selecting
      the parameters that decay.
    inverse_failure_threshold: roots with an error at or above this are discarded.
    root_method: ``'eigh'`` or ``'newton'``.
    axis_name: pmap / shard_map axis over which the roots are split.
    mesh: mesh over which the roots are split under jit (with ``mesh_axis_name``).
    mesh_axis_name: the mesh axis used with ``mesh``.
    precision: precision of the preconditioning and root matmuls.
    newton_iterations, newton_tolerance, power_iterations: see
      `matrix_inverse_pth_root`.

  Returns:
    A `GradientTransformation` whose state is a `ScaleByShampooState`; ``update``
    needs ``params`` when ``weight_decay`` is non-zero.
  """
  if graft_type not in GRAFT_TYPES:
    raise ValueError(f"graft_type must be one of {GRAFT_TYPES}, got {graft_type!r}")
  if root_method not in ROOT_METHODS:
    raise ValueError(f"root_method must be one of {ROOT_METHODS}, got {root_method!r}")
  if axis_name is not None and mesh is not None:
    raise ValueError("give at most one of axis_name (pmap/shard_map) and mesh (jit)")
  if start_preconditioning_step < 0:
    start_preconditioning_step = preconditioning_every
  init_scale = matrix_epsilon if statistics_init_scale is None else statistics_init_scale
  plan_fn = functools.partial(block_plan, block_size=block_size,
                              merge_dims_threshold=merge_dims_threshold,
                              skip_dim_gt=skip_dim_gt, exponent_override=exponent_override)
  uses_graft_moment = graft_type != "sgd"
  two_buffers = momentum != 0 and graft_momentum_buffer
  w = (1.0 - momentum) if moving_average_for_momentum else 1.0

  def init(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    plan = plan_fn([x.shape for x in leaves])
    eye = lambda d: init_scale * jnp.eye(d, dtype=jnp.float32)
    stats = tuple(jnp.broadcast_to(eye(d), (n, d, d)) for d, _, n in plan.stacks)
    roots = tuple(jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (n, d, d))
                  for d, _, n in plan.stacks)
    zeros = lambda: jax.tree_util.tree_unflatten(treedef, _tree_zeros(leaves))
    return ScaleByShampooState(
        count=jnp.zeros([], jnp.int32), statistics=stats, roots=roots,
        first_moment=zeros() if beta1 > 0 else (),
        graft_moment=zeros() if uses_graft_moment else (),
        momentum=zeros() if momentum != 0 else (),
        graft_momentum=zeros() if two_buffers else ())

  def root_stack(stack, p):
    fn = jax.vmap(functools.partial(
        matrix_inverse_pth_root, p=p, epsilon=matrix_epsilon,
        relative_epsilon=relative_matrix_epsilon, method=root_method,
        newton_iterations=newton_iterations, newton_tolerance=newton_tolerance,
        power_iterations=power_iterations, precision=precision))
    n = stack.shape[0]
    if axis_name is not None:
      n_dev = _axis_size(axis_name)
      padded = _pad_with_identity(stack, n_dev)
      share = padded.shape[0] // n_dev
      local = lax.dynamic_slice_in_dim(padded, lax.axis_index(axis_name) * share, share)
      root, err = fn(local)
      root = lax.all_gather(root, axis_name, tiled=True)
      err = lax.all_gather(err, axis_name, tiled=True)
      return root[:n], err[:n]
    if mesh is not None:
      n_dev = mesh.shape[mesh_axis_name]
      padded = _pad_with_identity(stack, n_dev)
      split = PartitionSpec(mesh_axis_name)
      root, err = _shard_map(fn, mesh, in_specs=(split,), out_specs=(split, split))(padded)
      replicated = NamedSharding(mesh, PartitionSpec())
      root = lax.with_sharding_constraint(root, replicated)
      err = lax.with_sharding_constraint(err, replicated)
      return root[:n], err[:n]
    return fn(stack)

  def compute_roots(plan, stats, old_roots, count):
    new = []
    num_updates = (count // statistics_every + 1).astype(jnp.float32)
    for (_, p, _), s, old in zip(plan.stacks, stats, old_roots):
      if statistics_bias_correction:
        s = s / (1.0 - beta2 ** num_updates)
      root, err = root_stack(s, p)
      ok = root_is_valid(err, inverse_failure_threshold)
      new.append(jnp.where(ok[:, None, None], root, old))
    return tuple(new)

  def update_statistics(plan, grads, stats):
    parts: List[List[Tuple[int, jnp.ndarray]]] = [[] for _ in plan.stacks]
    for lp, g in zip(plan.leaves, grads):
      if not lp.preconditioned:
        continue
      blocks = split_into_blocks(g.reshape(lp.merged_shape), block_size)
      for gb, slots in zip(blocks, lp.slots):
        for dim, (si, off) in enumerate(slots):
          parts[si].append((off, _block_stats(gb, dim, precision)))
    new = []
    for s, items in zip(stats, parts):
      items.sort(key=lambda item: item[0])
      outer = jnp.concatenate([x for _, x in items], axis=0)
      new.append(beta2 * s + (1.0 - beta2) * outer)
    return tuple(new)

  def graft(g, x, v, t):
    """Returns the graft step and the new second moment."""
    if graft_type == "sgd":
      return x, v
    if graft_type == "rmsprop_normalized":
      g = g / (jnp.linalg.norm(g) + NORM_EPS)
      x = x / (jnp.linalg.norm(x) + NORM_EPS)
    v = beta2 * v + (1.0 - beta2) * g * g
    v_hat = v / (1.0 - beta2 ** t) if graft_type == "adam" else v
    return x / (jnp.sqrt(v_hat) + diagonal_epsilon), v

  def shampoo_direction(lp, x, a, roots):
    if not lp.preconditioned:
      return a
    shape = lp.merged_shape
    x_blocks = split_into_blocks(x.reshape(shape), block_size)
    out = []
    for xb, slots in zip(x_blocks, lp.slots):
      n = xb.shape[0]
      rs = [roots[si][off:off + n] for si, off in slots]
      out.append(_apply_roots(xb, rs, precision))
    if graft_per_block:
      a_blocks = split_into_blocks(a.reshape(shape), block_size)
      scaled = []
      for d, ab in zip(out, a_blocks):
        axes = tuple(range(1, d.ndim))
        d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        a_norm = jnp.sqrt(jnp.sum(ab * ab, axis=axes, keepdims=True))
        scaled.append(d * (a_norm / (d_norm + NORM_EPS)))
      return merge_blocks(scaled, shape, block_size).reshape(lp.shape)
    d = merge_blocks(out, shape, block_size).reshape(lp.shape)
    return d * (jnp.linalg.norm(a) / (jnp.linalg.norm(d) + NORM_EPS))

  def update(updates, state, params=None):
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    plan = plan_fn([x.shape for x in leaves])
    flat = lambda tree: treedef.flatten_up_to(tree)
    grads = [x.astype(jnp.float32) for x in leaves]
    count = state.count
    t = (count + 1).astype(jnp.float32)

    # 1. Search input.
    if beta1 > 0:
      mu = [beta1 * m + (1.0 - beta1) * g for m, g in zip(flat(state.first_moment), grads)]
      look = ([beta1 * m + (1.0 - beta1) * g for m, g in zip(mu, grads)]
              if use_nadam else mu)
      xs = [m / (1.0 - beta1 ** t) for m in look]
      first_moment = jax.tree_util.tree_unflatten(treedef, mu)
    else:
      xs, first_moment = grads, ()

    # 2. Graft.
    old_v = flat(state.graft_moment) if uses_graft_moment else [None] * len(grads)
    grafted = [graft(g, x, v, t) for g, x, v in zip(grads, xs, old_v)]
    graft_steps = [a for a, _ in grafted]
    graft_moment = (jax.tree_util.tree_unflatten(treedef, [v for _, v in grafted])
                    if uses_graft_moment else ())

    # 3. Statistics (skipped by a cond on the off steps).
    if statistics_every == 1:
      stats = update_statistics(plan, grads, state.statistics)
    else:
      stats = lax.cond(count % statistics_every == 0,
                       lambda s: update_statistics(plan, grads, s), lambda s: s,
                       state.statistics)

    # 4. Roots: the cond keeps the eigendecompositions off the steps between
    # recomputations (both branches would run under a select).
    roots = lax.cond(count % preconditioning_every == 0,
                     lambda s, r: compute_roots(plan, s, r, count),
                     lambda s, r: r, stats, state.roots)

    # 5. Grafted Shampoo direction, or the graft alone before the start.
    use_shampoo = count >= start_preconditioning_step
    directions = [shampoo_direction(lp, x, a, roots)
                  for lp, x, a in zip(plan.leaves, xs, graft_steps)]

    # 6. Weight decay, momentum.
    if weight_decay:
      if params is None:
        raise ValueError("scale_by_shampoo needs params when weight_decay != 0")
      mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
      mask = flat(mask) if mask is not None else [True] * len(grads)
      decay = [weight_decay * p.astype(jnp.float32) if m else jnp.zeros_like(g)
               for p, m, g in zip(flat(params), mask, grads)]
    else:
      decay = [jnp.zeros_like(g) for g in grads]
    u_shampoo = [d + wd for d, wd in zip(directions, decay)]
    u_graft = [a + wd for a, wd in zip(graft_steps, decay)]
    selected = [jnp.where(use_shampoo, us, ug) for us, ug in zip(u_shampoo, u_graft)]

    if momentum == 0:
      outs, mom, graft_mom = selected, (), ()
    elif two_buffers:
      m_s = [momentum * m + w * u for m, u in zip(flat(state.momentum), u_shampoo)]
      m_g = [momentum * m + w * u for m, u in zip(flat(state.graft_momentum), u_graft)]
      m_sel = [jnp.where(use_shampoo, a, b) for a, b in zip(m_s, m_g)]
      outs = ([w * u + momentum * m for u, m in zip(selected, m_sel)] if nesterov
              else m_sel)
      mom = jax.tree_util.tree_unflatten(treedef, m_s)
      graft_mom = jax.tree_util.tree_unflatten(treedef, m_g)
    else:
      m_new = [momentum * m + w * u for m, u in zip(flat(state.momentum), selected)]
      outs = ([w * u + momentum * m for u, m in zip(selected, m_new)] if nesterov
              else m_new)
      mom, graft_mom = jax.tree_util.tree_unflatten(treedef, m_new), ()

    outs = [o.astype(x.dtype) for o, x in zip(outs, leaves)]
    new_state = ScaleByShampooState(
        count=_safe_increment(count), statistics=stats, roots=roots,
        first_moment=first_moment, graft_moment=graft_moment, momentum=mom,
        graft_momentum=graft_mom)
    return jax.tree_util.tree_unflatten(treedef, outs), new_state

  return optax.GradientTransformation(init, update)


_SCALE_BY_SHAMPOO_ARGS = tuple(
    name for name in scale_by_shampoo.__code__.co_varnames[
        :scale_by_shampoo.__code__.co_argcount])


def distributed_shampoo(learning_rate: ScalarOrSchedule, *, preset: str = "google",
                        **kwargs) -> optax.GradientTransformation:
  r"""Distributed Shampoo: `scale_by_shampoo` with a preset's hyperparameters, then the LR.

  .. math:: \theta \leftarrow \theta - \eta_s\, \text{step}

  ``preset`` is ``'google'`` or ``'meta'`` (`PRESETS`); ``kwargs`` override any
  `scale_by_shampoo` argument (``weight_decay``, ``axis_name``, ``mesh``, ...). A
  schedule is indexed by this transform's own count, starting at 0.

  Mapping from the original names: Google's ``beta1`` is ``momentum`` here (with
  ``moving_average_for_momentum`` and ``nesterov``); Meta's ``betas[0]`` is
  ``beta1``, its ``momentum`` is ``momentum`` (with ``moving_average_for_momentum=False``),
  ``epsilon`` is ``matrix_epsilon``, ``grafting_epsilon`` is ``diagonal_epsilon``,
  ``max_preconditioner_dim`` is ``block_size`` and ``merge_dims_threshold``,
  ``precondition_frequency`` is ``preconditioning_every`` and
  ``inv_root_override`` is ``exponent_override``.
  """
  return optax.chain(scale_by_shampoo(**shampoo_hyperparameters(preset, **kwargs)),
                     optax.scale_by_learning_rate(learning_rate))

"""Shampoo's hyperparameters as one frozen dataclass, checked once when it is made."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from jax import lax

from weight_averaging.optimizers.shampoo.roots import DEFAULT_CHUNK_BYTES, ROOT_METHODS

GRAFT_TYPES = ("sgd", "adam", "rmsprop", "rmsprop_normalized")


@dataclasses.dataclass(frozen=True)
class ShampooConfig:
  r"""The hyperparameters of `scale_by_shampoo`; the defaults are Google's recipe.

  Attributes:
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
    start_preconditioning_step: first step (0-based count) that uses the roots
      (negative: ``preconditioning_every``).
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
    root_method: one of ``ROOT_METHODS`` (``'eigh'`` or ``'newton'``).
    axis_name: pmap / shard_map axis over which the roots are split.
    mesh: mesh over which the roots are split under jit (with ``mesh_axis_name``).
    mesh_axis_name: the mesh axis used with ``mesh``.
    precision: precision of the preconditioning and root matmuls.
    root_chunk_bytes: the roots of a stack are computed this many bytes of
      statistics at a time (at least one matrix; `roots.chunk_length`), so the
      eigendecompositions' temporaries are a few chunks, not a few stacks. The
      roots do not depend on it.
    newton_iterations, newton_tolerance, power_iterations: see
      `matrix_inverse_pth_root`.
  """

  block_size: int = 1024
  merge_dims_threshold: int = 4096
  skip_dim_gt: int = 4096
  beta1: float = 0.0
  use_nadam: bool = False
  beta2: float = 0.999
  diagonal_epsilon: float = 1e-8
  matrix_epsilon: float = 1e-6
  relative_matrix_epsilon: bool = True
  statistics_init_scale: Optional[float] = None
  statistics_bias_correction: bool = False
  statistics_every: int = 1
  preconditioning_every: int = 20
  start_preconditioning_step: int = 101
  exponent_override: int = 0
  graft_type: str = "rmsprop_normalized"
  graft_per_block: bool = False
  momentum: float = 0.9
  nesterov: bool = True
  moving_average_for_momentum: bool = True
  graft_momentum_buffer: bool = True
  weight_decay: float = 0.0
  weight_decay_mask: Any = None
  inverse_failure_threshold: float = 0.1
  root_method: str = "eigh"
  axis_name: Optional[str] = None
  mesh: Optional[jax.sharding.Mesh] = None
  mesh_axis_name: str = "batch"
  precision: Any = lax.Precision.HIGHEST
  newton_iterations: int = 100
  newton_tolerance: float = 1e-6
  power_iterations: int = 100
  root_chunk_bytes: int = DEFAULT_CHUNK_BYTES

  def __post_init__(self):
    if self.graft_type not in GRAFT_TYPES:
      raise ValueError(f"graft_type must be one of {GRAFT_TYPES}, got {self.graft_type!r}")
    if self.root_method not in ROOT_METHODS:
      raise ValueError(
          f"root_method must be one of {ROOT_METHODS}, got {self.root_method!r}")
    if not (isinstance(self.root_chunk_bytes, int) and self.root_chunk_bytes > 0):
      raise ValueError("root_chunk_bytes must be a positive int (bytes of statistics per "
                       f"batched root call), got {self.root_chunk_bytes!r}")
    if self.axis_name is not None and self.mesh is not None:
      raise ValueError("give at most one of axis_name (pmap/shard_map) and mesh (jit)")

  @property
  def first_preconditioned_step(self) -> int:
    """The first count that uses the roots (a negative start means the first recompute
    after step 0)."""
    if self.start_preconditioning_step < 0:
      return self.preconditioning_every
    return self.start_preconditioning_step

  @property
  def init_scale(self) -> float:
    """The statistics start at this times :math:`I`."""
    if self.statistics_init_scale is None:
      return self.matrix_epsilon
    return self.statistics_init_scale

  @property
  def uses_graft_moment(self) -> bool:
    """Whether the graft keeps a second moment (all but SGD)."""
    return self.graft_type != "sgd"

  @property
  def two_momentum_buffers(self) -> bool:
    """Whether the Shampoo and graft steps keep separate momentum buffers."""
    return self.momentum != 0 and self.graft_momentum_buffer

  @property
  def momentum_weight(self) -> float:
    """:math:`w`: the weight of the new step in the momentum buffer."""
    return (1.0 - self.momentum) if self.moving_average_for_momentum else 1.0

  def root_kwargs(self) -> dict:
    """The keyword arguments of `refresh_roots` (`batched_inverse_pth_roots`, and so
    `matrix_inverse_pth_root`, but the chunking) this config sets."""
    return dict(epsilon=self.matrix_epsilon, relative_epsilon=self.relative_matrix_epsilon,
                method=self.root_method, newton_iterations=self.newton_iterations,
                newton_tolerance=self.newton_tolerance,
                power_iterations=self.power_iterations, precision=self.precision,
                axis_name=self.axis_name, mesh=self.mesh,
                mesh_axis_name=self.mesh_axis_name, chunk_bytes=self.root_chunk_bytes)

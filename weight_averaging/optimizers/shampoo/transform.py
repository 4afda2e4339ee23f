r"""`scale_by_shampoo` and `distributed_shampoo`: Shampoo as optax transforms over a `ShampooConfig`.

`init` and `update` are plain functions of the config, which the transforms bind. The
state (`ScaleByShampooState`) holds arrays only; the block plan it is laid out by is
static and recomputed from the shapes on every call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from weight_averaging.optimizers import common
from weight_averaging.optimizers.shampoo import blocks
from weight_averaging.optimizers.shampoo.config import ShampooConfig
from weight_averaging.optimizers.shampoo.presets import shampoo_hyperparameters
from weight_averaging.optimizers.shampoo.roots import refresh_roots

# Guards the divisions by a norm (grafting and the normalized RMSProp input).
NORM_EPS = 1e-16


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


def _plan(config: ShampooConfig, leaves) -> blocks.BlockPlan:
  return blocks.block_plan([x.shape for x in leaves], block_size=config.block_size,
                           merge_dims_threshold=config.merge_dims_threshold,
                           skip_dim_gt=config.skip_dim_gt,
                           exponent_override=config.exponent_override)


def _tree_zeros(leaves):
  return [jnp.zeros(x.shape, jnp.float32) for x in leaves]


def init(config: ShampooConfig, params) -> ScaleByShampooState:
  r"""Statistics at ``init_scale`` :math:`\cdot I`, roots at :math:`I`, zero moments.

  Moments the config does not use are ``()``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  plan = _plan(config, leaves)
  eye = lambda d: config.init_scale * jnp.eye(d, dtype=jnp.float32)
  stats = tuple(jnp.broadcast_to(eye(d), (n, d, d)) for d, _, n in plan.stacks)
  roots = tuple(jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (n, d, d))
                for d, _, n in plan.stacks)
  zeros = lambda: jax.tree_util.tree_unflatten(treedef, _tree_zeros(leaves))
  return ScaleByShampooState(
      count=jnp.zeros([], jnp.int32), statistics=stats, roots=roots,
      first_moment=zeros() if config.beta1 > 0 else (),
      graft_moment=zeros() if config.uses_graft_moment else (),
      momentum=zeros() if config.momentum != 0 else (),
      graft_momentum=zeros() if config.two_momentum_buffers else ())


def _search_input(config: ShampooConfig, grads, first_moment, t):
  """The search input X per leaf, and the new first moment (None with ``beta1 == 0``)."""
  b1 = config.beta1
  if b1 > 0:
    mu = [b1 * m + (1.0 - b1) * g for m, g in zip(first_moment, grads)]
    look = ([b1 * m + (1.0 - b1) * g for m, g in zip(mu, grads)]
            if config.use_nadam else mu)
    return [m / (1.0 - b1 ** t) for m in look], mu
  return grads, None


def _graft(config: ShampooConfig, g, x, v, t):
  """The graft step A of one leaf and its new second moment."""
  if config.graft_type == "sgd":
    return x, v
  if config.graft_type == "rmsprop_normalized":
    g = g / (jnp.linalg.norm(g) + NORM_EPS)
    x = x / (jnp.linalg.norm(x) + NORM_EPS)
  b2 = config.beta2
  v = b2 * v + (1.0 - b2) * g * g
  v_hat = v / (1.0 - b2 ** t) if config.graft_type == "adam" else v
  return x / (jnp.sqrt(v_hat) + config.diagonal_epsilon), v


def _update_statistics(config: ShampooConfig, plan, grads, stats):
  r""":math:`L_i \leftarrow \beta_2 L_i + (1-\beta_2) G_{(i)} G_{(i)}^\top`, slot by slot.

  Each block group's new statistics are written into their slots of the stack
  (`lax.dynamic_update_slice`), so a donated state is updated in place: the
  temporaries are one group's outer products, not a second stack.
  """
  new = list(stats)
  b2 = config.beta2
  for lp, g in zip(plan.leaves, grads):
    if not lp.preconditioned:
      continue
    g_blocks = blocks.split_into_blocks(g.reshape(lp.merged_shape), config.block_size)
    for gb, slots in zip(g_blocks, lp.slots):
      for dim, (si, off) in enumerate(slots):
        outer = blocks.block_statistics(gb, dim, config.precision)
        old = lax.slice_in_dim(new[si], off, off + outer.shape[0])
        new[si] = lax.dynamic_update_slice_in_dim(new[si], b2 * old + (1.0 - b2) * outer,
                                                  off, 0)
  return tuple(new)


def _compute_roots(config: ShampooConfig, plan, stats, old_roots, count):
  """The roots of every stack (`refresh_roots`); where a root failed, the old one stays."""
  normalizer = 1.0
  if config.statistics_bias_correction:
    num_updates = (count // config.statistics_every + 1).astype(jnp.float32)
    normalizer = 1.0 - config.beta2 ** num_updates
  return tuple(refresh_roots(s, old, p, threshold=config.inverse_failure_threshold,
                             normalizer=normalizer, **config.root_kwargs())
               for (_, p, _), s, old in zip(plan.stacks, stats, old_roots))


def _direction(config: ShampooConfig, lp: blocks.LeafPlan, x, a, roots):
  """D of one leaf: X preconditioned, rescaled to the graft's norm (A if skipped)."""
  if not lp.preconditioned:
    return a
  shape, block_size = lp.merged_shape, config.block_size
  x_blocks = blocks.split_into_blocks(x.reshape(shape), block_size)
  out = []
  for xb, slots in zip(x_blocks, lp.slots):
    n = xb.shape[0]
    rs = [roots[si][off:off + n] for si, off in slots]
    out.append(blocks.apply_roots(xb, rs, config.precision))
  if config.graft_per_block:
    a_blocks = blocks.split_into_blocks(a.reshape(shape), block_size)
    scaled = []
    for d, ab in zip(out, a_blocks):
      axes = tuple(range(1, d.ndim))
      d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
      a_norm = jnp.sqrt(jnp.sum(ab * ab, axis=axes, keepdims=True))
      scaled.append(d * (a_norm / (d_norm + NORM_EPS)))
    return blocks.merge_blocks(scaled, shape, block_size).reshape(lp.shape)
  d = blocks.merge_blocks(out, shape, block_size).reshape(lp.shape)
  return d * (jnp.linalg.norm(a) / (jnp.linalg.norm(d) + NORM_EPS))


def _weight_decay(config: ShampooConfig, params, grads, flat):
  r""":math:`\lambda\theta` per leaf; zeros where the mask is false, or with no decay."""
  if not config.weight_decay:
    return [jnp.zeros_like(g) for g in grads]
  if params is None:
    raise ValueError("scale_by_shampoo needs params when weight_decay != 0")
  mask = config.weight_decay_mask
  mask = mask(params) if callable(mask) else mask
  mask = flat(mask) if mask is not None else [True] * len(grads)
  return [config.weight_decay * p.astype(jnp.float32) if m else jnp.zeros_like(g)
          for p, m, g in zip(flat(params), mask, grads)]


def _momentum(config: ShampooConfig, state, flat, use_shampoo, u_shampoo, u_graft,
              selected):
  """The output step and the new momentum buffers (leaf lists, None when unused)."""
  mu, w = config.momentum, config.momentum_weight
  if mu == 0:
    return selected, None, None
  if config.two_momentum_buffers:
    m_s = [mu * m + w * u for m, u in zip(flat(state.momentum), u_shampoo)]
    m_g = [mu * m + w * u for m, u in zip(flat(state.graft_momentum), u_graft)]
    m_sel = [jnp.where(use_shampoo, a, b) for a, b in zip(m_s, m_g)]
    outs = ([w * u + mu * m for u, m in zip(selected, m_sel)] if config.nesterov
            else m_sel)
    return outs, m_s, m_g
  m_new = [mu * m + w * u for m, u in zip(flat(state.momentum), selected)]
  outs = [w * u + mu * m for u, m in zip(selected, m_new)] if config.nesterov else m_new
  return outs, m_new, None


def update(config: ShampooConfig, updates, state: ScaleByShampooState, params=None):
  """One step of `scale_by_shampoo`: ``(step, new_state)``, the step in the updates' dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  plan = _plan(config, leaves)
  flat = lambda tree: treedef.flatten_up_to(tree)
  unflat = lambda xs: () if xs is None else jax.tree_util.tree_unflatten(treedef, xs)
  grads = [x.astype(jnp.float32) for x in leaves]
  count = state.count
  t = (count + 1).astype(jnp.float32)

  # 1. Search input.
  first_moment = flat(state.first_moment) if config.beta1 > 0 else None
  xs, first_moment = _search_input(config, grads, first_moment, t)

  # 2. Graft.
  old_v = flat(state.graft_moment) if config.uses_graft_moment else [None] * len(grads)
  grafted = [_graft(config, g, x, v, t) for g, x, v in zip(grads, xs, old_v)]
  graft_steps = [a for a, _ in grafted]
  graft_moment = [v for _, v in grafted] if config.uses_graft_moment else None

  # 3. Statistics (skipped by a cond on the off steps).
  if config.statistics_every == 1:
    stats = _update_statistics(config, plan, grads, state.statistics)
  else:
    stats = lax.cond(count % config.statistics_every == 0,
                     lambda s: _update_statistics(config, plan, grads, s), lambda s: s,
                     state.statistics)

  # 4. Roots: the cond keeps the eigendecompositions off the steps between
  # recomputations (both branches would run under a select).
  roots = lax.cond(count % config.preconditioning_every == 0,
                   lambda s, r: _compute_roots(config, plan, s, r, count),
                   lambda s, r: r, stats, state.roots)

  # 5. Grafted Shampoo direction, or the graft alone before the start.
  use_shampoo = count >= config.first_preconditioned_step
  directions = [_direction(config, lp, x, a, roots)
                for lp, x, a in zip(plan.leaves, xs, graft_steps)]

  # 6. Weight decay, momentum.
  decay = _weight_decay(config, params, grads, flat)
  u_shampoo = [d + wd for d, wd in zip(directions, decay)]
  u_graft = [a + wd for a, wd in zip(graft_steps, decay)]
  selected = [jnp.where(use_shampoo, us, ug) for us, ug in zip(u_shampoo, u_graft)]
  outs, mom, graft_mom = _momentum(config, state, flat, use_shampoo, u_shampoo, u_graft,
                                   selected)

  outs = [o.astype(x.dtype) for o, x in zip(outs, leaves)]
  new_state = ScaleByShampooState(
      count=common.safe_increment(count), statistics=stats, roots=roots,
      first_moment=unflat(first_moment), graft_moment=unflat(graft_moment),
      momentum=unflat(mom), graft_momentum=unflat(graft_mom))
  return jax.tree_util.tree_unflatten(treedef, outs), new_state


def scale_by_shampoo(config: Optional[ShampooConfig] = None,
                     **hyperparameters) -> optax.GradientTransformation:
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
    config: a `ShampooConfig` (default: ``ShampooConfig()``, Google's recipe).
    **hyperparameters: fields of `ShampooConfig` (its docstring says what each
      one does), overriding those of ``config``.

  Returns:
    A `GradientTransformation` whose state is a `ScaleByShampooState`; ``update``
    needs ``params`` when ``weight_decay`` is non-zero.
  """
  config = dataclasses.replace(config or ShampooConfig(), **hyperparameters)
  return optax.GradientTransformation(functools.partial(init, config),
                                      functools.partial(update, config))


def distributed_shampoo(learning_rate: common.ScalarOrSchedule, *, preset: str = "google",
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

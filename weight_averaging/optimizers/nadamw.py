"""NadamW as in AlgoPerf's reference NadamW submission, written as optax transforms.

The optimizer is the chain

.. code-block:: text

  [scale_by_clipped_global_norm(grad_clip)]   # only when grad_clip is given
  -> scale_by_nadam(b1, b2, eps, eps_root)
  -> add_decayed_weights(weight_decay)         # decoupled, then scaled by the LR
  -> scale_by_learning_rate(schedule)          # warmup + cosine to 0 at step_hint

so one update, with :math:`g_t` the gradient of step :math:`t = 1, 2, \\dots`, is

.. math::

  \\mu_t &= \\beta_1 \\mu_{t-1} + (1 - \\beta_1) g_t, \\qquad
  \\nu_t = \\beta_2 \\nu_{t-1} + (1 - \\beta_2) g_t^2, \\\\
  \\hat\\mu_t &= \\frac{\\beta_1 \\mu_t + (1 - \\beta_1) g_t}{1 - \\beta_1^t}, \\qquad
  \\hat\\nu_t = \\frac{\\nu_t}{1 - \\beta_2^t}, \\\\
  \\theta_t &= \\theta_{t-1} - \\eta_{t-1}\\Big(
      \\frac{\\hat\\mu_t}{\\sqrt{\\hat\\nu_t + \\epsilon_{root}} + \\epsilon}
      + \\lambda \\theta_{t-1}\\Big),

with :math:`\\eta_s` the schedule at the optimizer's own count :math:`s = t - 1`
(so the first update uses :math:`\\eta_0`, which is 0 with a warmup).

Nothing here knows about AlgoPerf's API or about weight averaging.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
ScalarOrSchedule = Union[float, Schedule]

# Reference constants: Adam's epsilon and the guard in the clipping factor.
EPS = 1e-8
GRAD_CLIP_EPS = 1e-6


class ScaleByNadamState(NamedTuple):
  """State of `scale_by_nadam`: the step count and both moment estimates."""

  count: jnp.ndarray  # int32, number of updates so far
  mu: optax.Updates
  nu: optax.Updates


def _safe_increment(count):
  # Saturates rather than wrapping to a negative count after 2**31 - 1 steps.
  return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def scale_by_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = EPS,
                   eps_root: float = 0.0, debias: bool = True
                   ) -> optax.GradientTransformation:
  r"""Rescales updates by Nesterov-accelerated Adam.

  .. math::

    \mu_t = \beta_1 \mu_{t-1} + (1 - \beta_1) g_t, \quad
    \nu_t = \beta_2 \nu_{t-1} + (1 - \beta_2) g_t^2,

    u_t = \frac{\hat\mu_t}{\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon},
    \quad \hat\mu_t = \frac{\beta_1 \mu_t + (1 - \beta_1) g_t}{1 - \beta_1^t},
    \quad \hat\nu_t = \frac{\nu_t}{1 - \beta_2^t}.

  The Nesterov look-ahead applies the momentum once more to the *new* moment, and
  both terms share the bias correction :math:`1 - \beta_1^t`. With
  ``debias=False`` the two divisions by :math:`1 - \beta^t` are left out.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    eps_root: added to the second moment inside the root.
    debias: apply the bias corrections.

  Returns:
    A `GradientTransformation` whose state is a `ScaleByNadamState`.
  """

  def init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return ScaleByNadamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                             nu=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g,
                                state.nu, updates)
    count = _safe_increment(state.count)
    look_ahead = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
    if debias:
      t = count.astype(jnp.float32)
      look_ahead = jax.tree_util.tree_map(
          lambda m: (m / (1 - b1**t)).astype(m.dtype), look_ahead)
      nu_hat = jax.tree_util.tree_map(lambda v: (v / (1 - b2**t)).astype(v.dtype), nu)
    else:
      nu_hat = nu
    out = jax.tree_util.tree_map(
        lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), look_ahead, nu_hat)
    return out, ScaleByNadamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def global_norm(tree) -> jnp.ndarray:
  """:math:`\\sqrt{\\sum_i \\lVert x_i \\rVert^2}` over the leaves (optax renamed its own)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def scale_by_clipped_global_norm(max_norm: float) -> optax.GradientTransformation:
  r"""Scales the whole gradient by :math:`\min(1, c / (\lVert g \rVert_2 + 10^{-6}))`.

  This is the reference submission's clipping (``grad_clip`` = :math:`c`), which
  differs from `optax.clip_by_global_norm` by the :math:`10^{-6}` guard.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    norm = global_norm(updates)
    factor = jnp.clip(max_norm / (norm + GRAD_CLIP_EPS), 0.0, 1.0)
    return jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(init, update)


def nadamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
           eps: float = EPS, eps_root: float = 0.0, debias: bool = True,
           weight_decay: float = 0.0, weight_decay_mask: Any = None,
           grad_clip: Optional[float] = None) -> optax.GradientTransformation:
  r"""NadamW: `scale_by_nadam`, decoupled weight decay, then the learning rate.

  .. math:: \theta \leftarrow \theta - \eta_s (u_t + \lambda\,\theta)

  The weight decay :math:`\lambda` is decoupled from the adaptive scaling but, as
  in the reference, multiplied by the learning rate :math:`\eta_s` (a schedule is
  indexed by this transform's own count, starting at 0). ``grad_clip`` prepends
  `scale_by_clipped_global_norm`.
  """
  parts = []
  if grad_clip is not None:
    parts.append(scale_by_clipped_global_norm(grad_clip))
  parts += [
      scale_by_nadam(b1, b2, eps, eps_root, debias),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*parts)


def warmup_cosine_schedule(learning_rate: float, warmup_factor: float,
                           step_hint: int) -> Schedule:
  r"""Linear warmup from 0, then cosine decay to 0 at `step_hint`.

  With :math:`W = \lfloor \text{warmup\_factor} \cdot T \rfloor` and
  :math:`D = \max(T - W, 1)`:

  .. math::

    \eta_s = \eta \frac{s}{W} \ (s < W), \qquad
    \eta_s = \frac{\eta}{2}\Big(1 + \cos\big(\pi \min(s - W, D) / D\big)\Big)
    \ (s \ge W),

  so the rate is 0 from step :math:`T` on.
  """
  warmup_steps = int(warmup_factor * step_hint)
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  cosine = optax.cosine_decay_schedule(learning_rate,
                                       max(step_hint - warmup_steps, 1), alpha=0.0)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def cosine_value(learning_rate: float, warmup_factor: float, step_hint: int,
                 step: int) -> float:
  """`warmup_cosine_schedule` in plain Python floats (for checks and plots)."""
  warmup_steps = int(warmup_factor * step_hint)
  if step < warmup_steps:
    return learning_rate * step / warmup_steps
  decay = max(step_hint - warmup_steps, 1)
  frac = min(step - warmup_steps, decay) / decay
  return 0.5 * learning_rate * (1.0 + math.cos(math.pi * frac))

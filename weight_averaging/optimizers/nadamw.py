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

The clipping, the schedule and the step counter are `common`'s, shared with Shampoo.
Nothing here knows about AlgoPerf's API or about weight averaging.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

# global_norm and warmup_cosine_schedule are not used here: they stay importable from this
# module while its callers move to `common`.
from weight_averaging.optimizers.common import (ScalarOrSchedule, global_norm,
                                                safe_increment, scale_by_clipped_global_norm,
                                                warmup_cosine_schedule)

# The reference submission's Adam epsilon.
EPS = 1e-8


class ScaleByNadamState(NamedTuple):
  """State of `scale_by_nadam`: the step count and both moment estimates."""

  count: jnp.ndarray  # int32, number of updates so far
  mu: optax.Updates
  nu: optax.Updates


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
    count = safe_increment(state.count)
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

r"""What the optimizers share: the global norm, the reference clipping, the learning-rate
schedules (warmup, then cosine, linear, none or warmup-stable-decay) and the saturating
step counter.

Nothing here knows about a particular optimizer, AlgoPerf's API or weight averaging.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
ScalarOrSchedule = Union[float, Schedule]

# The guard in the reference submission's clipping factor.
GRAD_CLIP_EPS = 1e-6

# ``safe_increment(count)``: count + 1, saturating at the dtype's maximum rather than
# wrapping to a negative count after 2**31 - 1 steps. Optax's own; before optax 0.2.4 it
# exists for int32 only, the dtype of every count here.
if hasattr(optax, "safe_increment"):
  safe_increment = optax.safe_increment
else:
  safe_increment = optax.safe_int32_increment


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


# The learning-rate schedules after the warmup (`lr_schedule`'s ``kind``), and the
# decays a warmup-stable-decay schedule can end with.
SCHEDULES = ("cosine", "constant", "linear", "wsd")
WSD_DECAYS = ("linear", "cosine")
# A warmup-stable-decay run's cooldown, as a fraction of the horizon: with a linear
# decay over the last 20 % it matches a cosine run (Hägele et al., 2024, "Scaling Laws
# and Compute-Optimal Training Beyond Fixed Training Durations").
DEFAULT_COOLDOWN_FRACTION = 0.2


def horizon_steps(step_hint: int, step_hint_factor: float) -> int:
  r""":math:`H = \max(1, \mathrm{round}(T \cdot f))`: the steps a schedule runs over."""
  return max(1, int(round(step_hint * step_hint_factor)))


def lr_schedule(learning_rate: float, warmup_factor: float, step_hint: int, *,
                kind: str = "cosine", step_hint_factor: float = 1.0,
                end_factor: float = 0.0,
                cooldown_fraction: float = DEFAULT_COOLDOWN_FRACTION,
                wsd_decay: str = "linear") -> Schedule:
  r"""Linear warmup from 0 to :math:`\eta`, then `kind`, over `horizon_steps` :math:`H`.

  With :math:`W = \lfloor \text{warmup\_factor} \cdot H \rfloor` (the warmup is a
  fraction of the horizon, as in Meta's Shampoo submission) and
  :math:`\eta_{\min} = \text{end\_factor} \cdot \eta`, the rate is
  :math:`\eta s / W` for :math:`s < W`, then with :math:`D = \max(H - W, 1)` and
  :math:`u = \min(s - W, D) / D`:

  * ``'cosine'``: :math:`\eta_{\min} + (\eta - \eta_{\min}) (1 + \cos \pi u) / 2`;
  * ``'linear'``: :math:`\eta - (\eta - \eta_{\min}) u`;
  * ``'constant'``: :math:`\eta` (no decay; `end_factor` unused);
  * ``'wsd'``: :math:`\eta` until :math:`S = \max(W, H - C)` with
    :math:`C = \max(1, \mathrm{round}(\text{cooldown\_fraction} \cdot H))`, then the
    `wsd_decay` (``'linear'`` or ``'cosine'``) above over :math:`D = \max(H - S, 1)`
    steps from :math:`S`.

  Every decay holds :math:`\eta_{\min}` from its end on. The defaults are
  `warmup_cosine_schedule`, built from the same optax calls (the same rates, bit for
  bit). `step_hint_factor` < 1 is a shorter schedule, `end_factor` > 0 anneals less.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"unknown schedule {kind!r}: use one of {SCHEDULES}")
  horizon = horizon_steps(step_hint, step_hint_factor)
  warmup_steps = int(warmup_factor * horizon)
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  if kind == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(learning_rate)],
                                [warmup_steps])
  if kind != "wsd":
    return optax.join_schedules(
        [warmup, _decay(kind, learning_rate, end_factor,
                        max(horizon - warmup_steps, 1))], [warmup_steps])
  if wsd_decay not in WSD_DECAYS:
    raise ValueError(f"unknown wsd decay {wsd_decay!r}: use one of {WSD_DECAYS}")
  cooldown = max(1, int(round(cooldown_fraction * horizon)))
  decay_start = max(warmup_steps, horizon - cooldown)
  decay = _decay(wsd_decay, learning_rate, end_factor, max(horizon - decay_start, 1))
  return optax.join_schedules(
      [warmup, optax.constant_schedule(learning_rate), decay],
      [warmup_steps, decay_start])


def _decay(kind: str, learning_rate: float, end_factor: float, steps: int) -> Schedule:
  """From `learning_rate` to ``end_factor * learning_rate`` over `steps`, then held."""
  if kind == "cosine":
    return optax.cosine_decay_schedule(learning_rate, steps, alpha=end_factor)
  return optax.linear_schedule(learning_rate, end_factor * learning_rate, steps)


def warmup_cosine_schedule(learning_rate: float, warmup_factor: float,
                           step_hint: int) -> Schedule:
  r"""Linear warmup from 0, then cosine decay to 0 at `step_hint` (`lr_schedule`'s default).

  With :math:`W = \lfloor \text{warmup\_factor} \cdot T \rfloor` and
  :math:`D = \max(T - W, 1)`:

  .. math::

    \eta_s = \eta \frac{s}{W} \ (s < W), \qquad
    \eta_s = \frac{\eta}{2}\Big(1 + \cos\big(\pi \min(s - W, D) / D\big)\Big)
    \ (s \ge W),

  so the rate is 0 from step :math:`T` on.
  """
  return lr_schedule(learning_rate, warmup_factor, step_hint)


def cosine_value(learning_rate: float, warmup_factor: float, step_hint: int,
                 step: int) -> float:
  """`warmup_cosine_schedule` in plain Python floats (for checks and plots)."""
  warmup_steps = int(warmup_factor * step_hint)
  if step < warmup_steps:
    return learning_rate * step / warmup_steps
  decay = max(step_hint - warmup_steps, 1)
  frac = min(step - warmup_steps, decay) / decay
  return 0.5 * learning_rate * (1.0 + math.cos(math.pi * frac))

"""Weight averaging along the training trajectory: EMA and LAWA, in the optax style.

An `Averager` is three pure, jit-able functions:

* ``init(params) -> state``: a `NamedTuple` of arrays, its own step count included;
* ``update(state, params) -> state``: call once per training step with the params
  *after* that step's optimizer update; the averager samples them only on the steps
  its schedule says;
* ``average(state, params) -> params``: the averaged weights, in the params' dtypes;
  before anything has been sampled it returns ``params``.

The schedule is the one of Ajroldi, Orvieto and Geiping (2025): with ``t`` the number
of `update` calls before the current one (so ``t`` is AlgoPerf's ``global_step``), the
params are sampled when ``t >= start_step and t % every == 0``.

Nothing here knows about AlgoPerf or about optimizers: the state composes with any
training loop, and checkpoints as a plain pytree of arrays.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from weight_averaging import placement as placement_lib

Params = Any
GATES = ("cond", "mask")


class Averager(NamedTuple):
  """``init``, ``update`` and ``average`` plus the `Placement` of the state."""

  init: Callable[[Params], Any]
  update: Callable[[Any, Params], Any]
  average: Callable[[Any, Params], Params]
  placement: placement_lib.Placement

  def state_shardings(self, state):
    """Shardings for `state` under `jax.jit` (in/out shardings or `device_put`)."""
    return self.placement.shardings(state)


class EmaState(NamedTuple):
  """State of `ema`.

  step: int32, number of `update` calls so far.
  count: int32, number of params sampled into the average so far.
  ema: the running average, one leaf per param, stored in the placement's layout.
  """

  step: jnp.ndarray
  count: jnp.ndarray
  ema: Any


class LawaState(NamedTuple):
  """State of `lawa`.

  step: int32, number of `update` calls so far.
  count: int32, number of snapshots pushed so far (the next slot is ``count % k``).
  ring: per param a ``[k, ...]`` buffer of the latest ``k`` snapshots (zeros in the
    slots not yet written).
  survivor_sum: per param the sum of the snapshots in ``ring`` except the one in
    the next slot, i.e. those that survive the next push.
  """

  step: jnp.ndarray
  count: jnp.ndarray
  ring: Any
  survivor_sum: Any


# ----------------------------------------------------------------------------
# Validation: a bad hyperparameter names itself and its value.


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_beta(beta: Any) -> float:
  if isinstance(beta, (bool, np.bool_)) or not isinstance(
      beta, (int, float, np.integer, np.floating)):
    raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
  if not 0.0 <= float(beta) < 1.0:  # also rejects NaN
    raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
  return float(beta)


def _check_dtype(dtype: Any) -> Optional[np.dtype]:
  if dtype is None:
    return None
  try:
    parsed = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype must be a floating dtype, got {dtype!r}") from e
  if not jnp.issubdtype(parsed, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
  return parsed


def _check_gate(gate: Any) -> str:
  if gate not in GATES:
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
  return gate


def _check_common(every, start_step, dtype, gate, placement):
  """The arguments `ema` and `lawa` share, checked; the placement resolved."""
  return (_check_int("every", every, 1), _check_int("start_step", start_step, 0),
          _check_dtype(dtype), _check_gate(gate), placement_lib.get(placement))


# ----------------------------------------------------------------------------
# Shared pieces.


def _accumulator_dtype(param_dtype, dtype):
  """At least float32, so that sums and averages of bf16 params keep moving."""
  return jnp.promote_types(dtype or param_dtype, jnp.float32)


def _sampling(step, every: int, start_step: int):
  """Whether the params after update number `step` (0-based) are sampled."""
  return (step >= start_step) & (step % every == 0)


def _gated(gate: str, take, sample: Callable, buffers, where):
  """`sample(buffers)` where `take`, else `buffers` unchanged, as the placement stores them.

  With ``gate='cond'`` the buffers move to device memory (``host`` placement) and
  are read and written only inside the sampling branch, so a step that does not
  sample touches none of them. ``'mask'`` computes both and selects.
  """
  def to_compute(b):
    return _tree_map(where.to_compute, b)

  def constrain(b):
    return _tree_map(where.constrain, b)

  if gate == "cond":
    return jax.lax.cond(take, lambda b: constrain(sample(to_compute(b))), lambda b: b,
                        buffers)
  current = to_compute(buffers)
  return constrain(_tree_map(lambda a, b: jnp.where(take, a, b), sample(current), current))


def _tree_map(fn, *trees):
  return jax.tree_util.tree_map(fn, *trees)


def _increment(step):
  # Saturates instead of wrapping to a negative count after 2**31 - 1 steps.
  return jnp.where(step < jnp.iinfo(jnp.int32).max, step + 1, step)


# ----------------------------------------------------------------------------
# EMA.


def ema(beta: float, every: int = 1, start_step: int = 0, debias: bool = False,
        dtype: Any = None, placement: Any = "replicated", *,
        gate: str = "cond") -> Averager:
  r"""Exponential moving average of the params sampled every `every` steps.

  With :math:`\theta_1, \theta_2, \dots` the sampled params (see the module
  docstring for the schedule) and :math:`n` the number sampled so far:

  * ``debias=False`` (the paper's Algorithm 2): :math:`a_1 = \theta_1` and
    :math:`a_n = \beta a_{n-1} + (1 - \beta) \theta_n`; the average is :math:`a_n`.
  * ``debias=True`` (Adam-style): :math:`m_0 = 0`,
    :math:`m_n = \beta m_{n-1} + (1 - \beta)\theta_n`, and the average is
    :math:`m_n / (1 - \beta^n)`.

  `beta` acts per sample, so the time constant in steps is about
  ``every / (1 - beta)``.

  Args:
    beta: decay in [0, 1); 0 keeps the latest sample.
    every: sampling interval ``nu`` in steps (>= 1).
    start_step: no params are sampled before this step.
    debias: divide by :math:`1 - \beta^n` (then the average starts from zero).
    dtype: floating dtype of the stored average. ``None`` keeps it in the params'
      dtype promoted to at least float32: a bfloat16 EMA with ``1 - beta`` small
      rounds every update back to the old value and stops moving.
    placement: ``'replicated'``, ``'sharded'``, ``'host'`` or a `Placement`.
    gate: how non-sampling steps skip the arithmetic: ``'cond'`` (`lax.cond`, the
      default: nothing is read or written) or ``'mask'`` (compute and select).

  Returns:
    An `Averager` whose state is an `EmaState`.
  """
  beta = _check_beta(beta)
  every, start_step, dtype, gate, where = _check_common(
      every, start_step, dtype, gate, placement)

  def stored(p):
    return where.layout(p).astype(dtype or _accumulator_dtype(p.dtype, None))

  def init(params):
    zeros = _tree_map(lambda p: where.constrain(jnp.zeros_like(stored(p))), params)
    return EmaState(step=jnp.zeros([], jnp.int32), count=jnp.zeros([], jnp.int32),
                    ema=zeros)

  def update(state, params):
    take = _sampling(state.step, every, start_step)
    # Without debiasing the first sample replaces the (zero) average exactly.
    decay = beta if debias else jnp.where(state.count == 0, 0.0, beta)

    def sample(avg):
      return _tree_map(
          lambda a, p: (decay * a + (1.0 - decay) * stored(p)).astype(a.dtype),
          avg, params)

    return EmaState(step=_increment(state.step),
                    count=state.count + take.astype(jnp.int32),
                    ema=_gated(gate, take, sample, state.ema, where))

  def average(state, params):
    if debias:
      correction = 1.0 - jnp.asarray(beta, jnp.float32) ** state.count
      correction = jnp.where(state.count > 0, correction, 1.0)
    else:
      correction = 1.0

    def leaf(a, p):
      avg = where.unlayout(where.to_compute(a), p) / correction
      return jnp.where(state.count > 0, avg.astype(p.dtype), p)

    return _tree_map(leaf, state.ema, params)

  return Averager(init, update, average, where)


# ----------------------------------------------------------------------------
# LAWA.


def _sum_slots(ring, dtype):
  """Sum over the leading axis, slot by slot (XLA:CPU reduces a leading axis slowly)."""
  return jax.lax.fori_loop(
      0, ring.shape[0],
      lambda i, acc: acc + jax.lax.dynamic_index_in_dim(ring, i, 0, False).astype(dtype),
      jnp.zeros(ring.shape[1:], dtype))


def lawa(k: int, every: int, start_step: int = 0, dtype: Any = None,
         placement: Any = "replicated", *, gate: str = "cond") -> Averager:
  r"""Latest weight averaging: the mean of the latest `k` sampled params.

  With :math:`\theta_1, \dots, \theta_n` the params sampled so far (every `every`
  steps from `start_step`), the average is

  .. math:: \bar\theta_n = \frac{1}{\min(n, k)} \sum_{i = \max(1, n - k + 1)}^{n} \theta_i

  (the mean of fewer than `k` snapshots until the queue fills).

  Pushing a snapshot and reading the mean cost :math:`O(1)` in `k` (amortised): the
  state keeps a ring buffer of the latest `k` snapshots and ``survivor_sum``, the
  sum of all of them but the one the next push overwrites. A push writes its
  snapshot into the ring in place, then sets

  .. math:: s \leftarrow s + \theta_{new} - r_{next}

  where :math:`r_{next}` is read from the ring *after* the write (reading a slot
  before overwriting the ring in one program would make XLA copy the whole ring).
  The mean is :math:`(s + r_{next}) / \min(n, k)`, one extra slot read. Adding and
  subtracting forever would let rounding errors accumulate, so each time the ring
  wraps (every `k` pushes) `s` is recomputed exactly from the ring: the error of
  the mean is that of at most ``2k`` float32 additions, however long the run.

  Args:
    k: queue length (>= 1).
    every: sampling interval ``nu`` in steps (>= 1).
    start_step: no params are sampled before this step.
    dtype: floating dtype of the stored snapshots; ``None`` stores them in the
      params' dtype (exact copies). The sum is kept in at least float32.
    placement: ``'replicated'``, ``'sharded'``, ``'host'`` or a `Placement`.
    gate: ``'cond'`` (default) or ``'mask'``; see `ema`.

  Returns:
    An `Averager` whose state is a `LawaState`.
  """
  k = _check_int("k", k, 1)
  every, start_step, dtype, gate, where = _check_common(
      every, start_step, dtype, gate, placement)

  def init(params):
    def ring(p):
      x = where.layout(p)
      return where.constrain(jnp.zeros((k,) + x.shape, dtype or p.dtype))

    def acc(p):
      x = where.layout(p)
      return where.constrain(jnp.zeros(x.shape, _accumulator_dtype(p.dtype, dtype)))

    return LawaState(step=jnp.zeros([], jnp.int32), count=jnp.zeros([], jnp.int32),
                     ring=_tree_map(ring, params), survivor_sum=_tree_map(acc, params))

  def update(state, params):
    take = _sampling(state.step, every, start_step)
    head = state.count % k
    after = (head + 1) % k

    def push(buffers):
      def leaf(r, s, p):
        new = where.layout(p).astype(r.dtype)
        r = jax.lax.dynamic_update_index_in_dim(r, new, head, 0)
        evicted_next = jax.lax.dynamic_index_in_dim(r, after, 0, keepdims=False)
        evicted_next = evicted_next.astype(s.dtype)
        s = jax.lax.cond(
            after == 0,  # the ring just wrapped: recompute exactly
            lambda: _sum_slots(r, s.dtype) - evicted_next,
            lambda: s + (new.astype(s.dtype) - evicted_next))
        return r, s

      ring, sums = buffers
      out = _tree_map(leaf, ring, sums, params)
      treedef = jax.tree_util.tree_structure(ring)
      flat = treedef.flatten_up_to(out)
      return (treedef.unflatten([x[0] for x in flat]),
              treedef.unflatten([x[1] for x in flat]))

    ring, sums = _gated(gate, take, push, (state.ring, state.survivor_sum), where)
    return LawaState(step=_increment(state.step),
                     count=state.count + take.astype(jnp.int32),
                     ring=ring, survivor_sum=sums)

  def average(state, params):
    n = jnp.maximum(jnp.minimum(state.count, k), 1)
    head = state.count % k

    def leaf(r, s, p):
      r, s = where.to_compute(r), where.to_compute(s)
      total = s + jax.lax.dynamic_index_in_dim(r, head, 0, keepdims=False).astype(s.dtype)
      mean = where.unlayout(total, p) / n.astype(s.dtype)
      return jnp.where(state.count > 0, mean.astype(p.dtype), p)

    return _tree_map(leaf, state.ring, state.survivor_sum, params)

  return Averager(init, update, average, where)

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

Dtypes. Only floating leaves (``jnp.inexact``: float and complex) are averaged. Sums
and averages are kept in at least float32 (or the ``dtype`` asked for), and `average`
returns every leaf in its own dtype: a bfloat16 scalar in a float32 tree comes back
bfloat16. Integer and boolean leaves (counters, masks) are *not* averaged: the state
holds ``None`` in their place and `average` returns them live, as ``params`` has them
(a mean of counters would be floored, a mean of masks rounded to ``True``).

Nothing here knows about AlgoPerf or about optimizers: the state composes with any
training loop, and checkpoints as a plain pytree of arrays.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from weight_averaging import placement as placement_lib
from weight_averaging import validation

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

  With the ``host`` placement ``ema`` lives in host memory, the counters on the device.
  """

  step: jnp.ndarray
  count: jnp.ndarray
  ema: Any

  HOST_FIELDS = ("ema",)  # not a field: what a `host` placement offloads


class LawaState(NamedTuple):
  """State of `lawa`.

  step: int32, number of `update` calls so far.
  count: int32, number of snapshots pushed so far (the next slot is ``count % k``).
  ring: per param a ``[k, ...]`` buffer of the latest ``k`` snapshots (zeros in the
    slots not yet written).
  survivor_sum: per param the sum of the snapshots in ``ring`` except the one in
    the next slot, i.e. those that survive the next push.

  With the ``host`` placement ``ring`` lives in host memory; the counters and
  ``survivor_sum`` stay on the device, so a push moves two slots, not the ring.
  """

  step: jnp.ndarray
  count: jnp.ndarray
  ring: Any
  survivor_sum: Any

  HOST_FIELDS = ("ring",)  # not a field: what a `host` placement offloads


# ----------------------------------------------------------------------------
# Validation: a bad hyperparameter names itself and its value.


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


def _check_common(every, start_step, dtype, gate, placement):
  """The arguments `ema` and `lawa` share, checked; the placement resolved."""
  return (validation.check_int("every", every, 1),
          validation.check_int("start_step", start_step, 0), _check_dtype(dtype),
          validation.check_choice("gate", gate, GATES), placement_lib.get(placement))


# ----------------------------------------------------------------------------
# Shared pieces.


def _accumulator_dtype(param_dtype, dtype):
  """At least float32, so that sums and averages of bf16 params keep moving."""
  return jnp.promote_types(dtype or param_dtype, jnp.float32)


def _sampling(step, every: int, start_step: int):
  """Whether the params after update number `step` (0-based) are sampled.

  A static ``True`` when every step is: then no gate separates the averaging from
  the optimizer update, and XLA can fuse the two (the new params are read once).
  """
  if every == 1 and start_step == 0:
    return True
  return (step >= start_step) & (step % every == 0)


def _gated(gate: str, take, push: Callable, *buffers):
  """``push(*buffers, take=None)`` on sampling steps; `buffers` unchanged on the others.

  `push` returns the buffers as the placement stores them. ``gate='cond'`` runs it
  in a `lax.cond`, so a step that does not sample reads and writes none of them.
  ``'mask'`` runs it on every step with the traced `take`, and `push` selects,
  value by value, between what it would write and what is there (`_select`). A
  static ``take=True`` (every step samples) needs no gate.
  """
  if take is True:
    return push(*buffers, take=None)
  if gate == "cond":
    return jax.lax.cond(take, lambda *b: push(*b, take=None), lambda *b: b, *buffers)
  return push(*buffers, take=take)


def _select(take, new, old):
  """`new`, or under ``gate='mask'`` (`take` traced) `new` where `take` else `old`."""
  return new if take is None else jnp.where(take, new, old)


def _tree_map(fn, *trees):
  return jax.tree_util.tree_map(fn, *trees)


def is_floating(x) -> bool:
  """Whether leaf `x` (an array, a tracer or a `ShapeDtypeStruct`) is averaged."""
  dtype = getattr(x, "dtype", None)
  return jnp.issubdtype(jnp.result_type(x) if dtype is None else dtype, jnp.inexact)


def floating_part(tree):
  """`tree` with every integer or boolean leaf replaced by ``None`` (an empty subtree)."""
  return _tree_map(lambda x: x if is_floating(x) else None, tree)


def with_live(tree, floating):
  """`floating`'s leaves, and `tree`'s own where `floating` has ``None``.

  The inverse of `floating_part`: ``with_live(t, floating_part(t))`` is ``t``.
  """
  return _tree_map(lambda x, f: x if f is None else f, tree, floating)


def _floating_only(inner: "Averager") -> "Averager":
  """`inner` applied to the floating leaves; the others pass through `average` live."""

  def average(state, params):
    return with_live(params, inner.average(state, floating_part(params)))

  return Averager(init=lambda params: inner.init(floating_part(params)),
                  update=lambda state, params: inner.update(state, floating_part(params)),
                  average=average, placement=inner.placement)


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
    An `Averager` whose state is an `EmaState`; integer and boolean leaves are not
    averaged but returned live (module docstring).
  """
  beta = validation.check_float("beta", beta, 0.0, 1.0, high_open=True)
  debias = validation.check_bool("debias", debias)  # 'no' is truthy: refuse it
  every, start_step, dtype, gate, where = _check_common(
      every, start_step, dtype, gate, placement)

  def stored(p):
    return where.layout(p).astype(dtype or _accumulator_dtype(p.dtype, None))

  def init(params):
    # Every leaf is created where `state_shardings` says it lives.
    zeros = _tree_map(lambda p: where.zeros(
        where.layout(p).shape, dtype or _accumulator_dtype(p.dtype, None),
        offloaded=True), params)
    return EmaState(step=where.zeros((), jnp.int32), count=where.zeros((), jnp.int32),
                    ema=zeros)

  def update(state, params):
    take = _sampling(state.step, every, start_step)
    # Without debiasing the first sample replaces the (zero) average exactly.
    decay = beta if debias else jnp.where(state.count == 0, 0.0, beta)

    def sample(avg, take):
      def leaf(a, p):
        a = where.to_compute(a)  # `host`: the one transfer in, and one out below
        new = (decay * a + (1.0 - decay) * stored(p)).astype(a.dtype)
        return where.constrain(_select(take, new, a), offloaded=True)

      return (_tree_map(leaf, avg, params),)

    (new_ema,) = _gated(gate, take, sample, state.ema)
    return EmaState(step=_increment(state.step),
                    count=state.count + jnp.asarray(take, jnp.int32), ema=new_ema)

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

  return _floating_only(Averager(init, update, average, where))


# ----------------------------------------------------------------------------
# LAWA.


def _add_survivors(acc, ring, enabled, where):
  """``acc + ring[1] + ... + ring[k-1]`` where `enabled`, else `acc` (no slot read).

  Streams the ring through `where.read_slot` (for ``host``, one slot at a time from
  host memory), ``where.SLOTS_PER_SWEEP`` slots per sweep over `acc`. The sweeps
  are a loop run 0 times or as often as needed, not a `lax.cond`: XLA writes a
  conditional's result to a fresh buffer and copies it back, which on a large sum
  costs more than the push itself; a loop updates `acc` in place.
  """
  width = where.SLOTS_PER_SWEEP
  full, rest = divmod(ring.shape[0] - 1, width)

  def sweep(first, count):
    def body(j, acc):
      for i in range(count):  # one fused pass: `acc` is read and written once
        acc = acc + where.read_slot(ring, first + j * width + i).astype(acc.dtype)
      return acc
    return body

  acc = jax.lax.fori_loop(0, jnp.where(enabled, full, 0), sweep(1, width), acc)
  if rest:
    acc = jax.lax.fori_loop(0, jnp.where(enabled, 1, 0), sweep(1 + full * width, rest),
                            acc)
  return acc


def _push(ring, sums, take, *, params, count, k, where):
  """`params` written into slot ``count % k`` of every ring; the survivors' sums updated.

  ``s <- s + new - ring[next]``, the next slot read after the write. When this push
  completes a lap of the ring (the next slot is 0), ``s`` is recomputed exactly:
  zeroed, then the k - 1 surviving slots added (`_add_survivors`). `take` is None
  (the push happens) or, under ``gate='mask'``, traced: a step that does not
  sample rewrites its slot and keeps its sum. Returns ``(ring, sums)``.
  """
  head = count % k
  after = (head + 1) % k
  rebase = after == 0

  def leaf(r, s, p):
    new = where.layout(p).astype(r.dtype)
    if take is not None:
      new = jnp.where(take, new, where.read_slot(r, head))
    r = where.write_slot(r, new, head)
    moved = s + (new.astype(s.dtype) - where.read_slot(r, after).astype(s.dtype))
    # No lax.cond on the sum (see `_add_survivors`): zero it, then add the slots.
    s = where.constrain(_select(take, jnp.where(rebase, 0.0, moved).astype(s.dtype), s))
    return r, _add_survivors(s, r, rebase if take is None else rebase & take, where)

  out = _tree_map(leaf, ring, sums, params)
  treedef = jax.tree_util.tree_structure(ring)
  flat = treedef.flatten_up_to(out)
  return (treedef.unflatten([x[0] for x in flat]),
          treedef.unflatten([x[1] for x in flat]))


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
  wraps (every `k` pushes) `s` is recomputed exactly as the sum of the slots that
  survive the next push, read slot by slot: the error of the mean is that of at
  most ``2k`` float32 additions, however long the run.

  A push moves about 6 param-sizes of memory (the params read twice, a slot
  written, the next slot read, `s` read and written) plus, amortised, one slot for
  the re-sum; a donated state is updated in place. With ``host`` the ring stays in
  host memory: a push sends one snapshot there and brings one slot back (the
  re-sum streams the ring back a slot at a time); `average` reads one slot.

  Args:
    k: queue length (>= 1).
    every: sampling interval ``nu`` in steps (>= 1).
    start_step: no params are sampled before this step.
    dtype: floating dtype of the stored snapshots; ``None`` stores them in the
      params' dtype (exact copies). The sum is kept in at least float32.
    placement: ``'replicated'``, ``'sharded'``, ``'host'`` or a `Placement`.
    gate: ``'cond'`` (default) or ``'mask'``; see `ema`.

  Returns:
    An `Averager` whose state is a `LawaState`; integer and boolean leaves are not
    averaged but returned live (module docstring).
  """
  k = validation.check_int("k", k, 1)
  every, start_step, dtype, gate, where = _check_common(
      every, start_step, dtype, gate, placement)

  def init(params):
    # Every leaf is created where `state_shardings` says it lives.
    def ring(p):
      return where.zeros((k,) + where.layout(p).shape, dtype or p.dtype, offloaded=True)

    def acc(p):
      return where.zeros(where.layout(p).shape, _accumulator_dtype(p.dtype, dtype))

    return LawaState(step=where.zeros((), jnp.int32), count=where.zeros((), jnp.int32),
                     ring=_tree_map(ring, params), survivor_sum=_tree_map(acc, params))

  def update(state, params):
    take = _sampling(state.step, every, start_step)
    push = functools.partial(_push, params=params, count=state.count, k=k, where=where)
    ring, sums = _gated(gate, take, push, state.ring, state.survivor_sum)
    return LawaState(step=_increment(state.step),
                     count=state.count + jnp.asarray(take, jnp.int32),
                     ring=ring, survivor_sum=sums)

  def average(state, params):
    n = jnp.maximum(jnp.minimum(state.count, k), 1)
    head = state.count % k

    def leaf(r, s, p):
      total = s + where.read_slot(r, head).astype(s.dtype)  # `host`: one slot moves
      mean = where.unlayout(total, p) / n.astype(s.dtype)
      return jnp.where(state.count > 0, mean.astype(p.dtype), p)

    return _tree_map(leaf, state.ring, state.survivor_sum, params)

  return _floating_only(Averager(init, update, average, where))

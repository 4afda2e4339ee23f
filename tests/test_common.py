"""What the optimizers share: schedule, clipping, global norm and step counter, against
closed forms, optax and the plain expressions they replace."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weight_averaging.optimizers import common


def reference_schedule(lr, warmup_factor, step_hint, step):
  """Linear warmup to lr over int(warmup_factor * T) steps, then cosine to 0 at T."""
  warmup = int(warmup_factor * step_hint)
  if step < warmup:
    return lr * step / warmup
  decay = max(step_hint - warmup, 1)
  return lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


@pytest.mark.parametrize("warmup_factor,step_hint", [(0.1, 20), (0.05, 1000), (0.0, 7),
                                                     (0.02, 52000), (1.0, 10)])
def test_schedule_matches_reference(warmup_factor, step_hint):
  schedule = common.warmup_cosine_schedule(0.003, warmup_factor, step_hint)
  steps = sorted({0, 1, 2, int(warmup_factor * step_hint), step_hint // 2,
                  step_hint - 1, step_hint, step_hint + 5})
  for s in steps:
    want = reference_schedule(0.003, warmup_factor, step_hint, s)
    assert float(schedule(s)) == pytest.approx(want, rel=1e-5, abs=1e-9), s
    assert common.cosine_value(0.003, warmup_factor, step_hint, s) == pytest.approx(
        want, rel=1e-12, abs=1e-15)
  if int(warmup_factor * step_hint) < step_hint:
    assert float(schedule(step_hint)) == pytest.approx(0.0, abs=1e-12)
  # (With warmup_factor = 1 the one-step cosine starts at step_hint, as in the reference.)
  assert float(schedule(step_hint + 100)) == pytest.approx(0.0, abs=1e-12)


def test_clipping_leaves_small_gradients_alone():
  t = common.scale_by_clipped_global_norm(10.0)
  g = {"a": jnp.asarray([3.0]), "b": jnp.asarray([4.0])}
  out, _ = t.update(g, t.init(g))
  np.testing.assert_allclose(np.asarray(out["a"]), [3.0], rtol=1e-6)
  t = common.scale_by_clipped_global_norm(1.0)
  out, _ = t.update(g, t.init(g))
  np.testing.assert_allclose(np.asarray(out["b"]), [4.0 / (5.0 + 1e-6)], rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clipping_against_optax(max_norm):
  # The same up to the 1e-6 guard: exactly below the threshold, to ~1e-6 / norm above.
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  ours = common.scale_by_clipped_global_norm(max_norm)
  theirs = optax.clip_by_global_norm(max_norm)
  a, _ = ours.update(g, ours.init(g))
  b, _ = theirs.update(g, theirs.init(g))
  for k in g:
    assert a[k].dtype == g[k].dtype
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5)
  if max_norm == 100.0:
    for k in g:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(g[k]))


def test_global_norm():
  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(4, 5)), "b": [rng.normal(size=(3,)), rng.normal(size=())]}
  want = math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree_util.tree_leaves(tree)))
  tree32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
  assert float(common.global_norm(tree32)) == pytest.approx(want, rel=1e-6)


def test_safe_increment_is_the_saturating_int32_count():
  # The expression the optimizers used before taking optax's, bit for bit and in dtype.
  before = lambda c: jnp.where(c < jnp.iinfo(jnp.int32).max, c + 1, c)
  top = np.iinfo(np.int32).max
  for c in (0, 1, 41, top - 1, top):
    count = jnp.asarray(c, jnp.int32)
    new, old = common.safe_increment(count), before(count)
    assert new.dtype == old.dtype == jnp.int32
    assert int(new) == int(old) == min(c + 1, top)
  jitted = jax.jit(common.safe_increment)(jnp.asarray(top, jnp.int32))
  assert jitted.dtype == jnp.int32 and int(jitted) == top

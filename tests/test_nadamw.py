"""NadamW transforms against an independent NumPy implementation of the same math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weight_averaging.optimizers import common
from weight_averaging.optimizers import nadamw as nadamw_lib

from test_common import reference_schedule


class NumpyNadamw:
  """NadamW in float64 NumPy, one dict of arrays per state."""

  def __init__(self, params, lr, b1, b2, eps, wd, grad_clip=None, schedule=None):
    self.mu = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    self.nu = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    self.t = 0
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
    self.grad_clip, self.schedule = grad_clip, schedule

  def step(self, params, grads):
    grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
    if self.grad_clip is not None:
      norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
      factor = min(max(self.grad_clip / (norm + 1e-6), 0.0), 1.0)
      grads = {k: g * factor for k, g in grads.items()}
    lr = self.schedule(self.t) if self.schedule else self.lr
    self.t += 1
    b1, b2, t = self.b1, self.b2, self.t
    out = {}
    for k, g in grads.items():
      self.mu[k] = b1 * self.mu[k] + (1 - b1) * g
      self.nu[k] = b2 * self.nu[k] + (1 - b2) * g * g
      mu_hat = (b1 * self.mu[k] + (1 - b1) * g) / (1 - b1**t)
      nu_hat = self.nu[k] / (1 - b2**t)
      update = mu_hat / (np.sqrt(nu_hat) + self.eps) + self.wd * params[k]
      out[k] = params[k] - lr * update
    return out


def _params(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(5, 3)).astype(np.float32),
          "b": rng.normal(size=(3,)).astype(np.float32)}


@pytest.mark.parametrize("grad_clip", [None, 0.3])
def test_nadamw_matches_numpy(grad_clip):
  lr, b1, b2, wd, hint, warm = 0.01, 0.9, 0.99, 0.1, 20, 0.1
  schedule = common.warmup_cosine_schedule(lr, warm, hint)
  opt = nadamw_lib.nadamw(schedule, b1=b1, b2=b2, weight_decay=wd, grad_clip=grad_clip)
  params = {k: jnp.asarray(v) for k, v in _params(0).items()}
  ref = NumpyNadamw(_params(0), lr, b1, b2, 1e-8, wd, grad_clip,
                    lambda s: reference_schedule(lr, warm, hint, s))
  ref_params = {k: v.astype(np.float64) for k, v in _params(0).items()}
  state = opt.init(params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  rng = np.random.default_rng(1)
  for _ in range(25):  # past step_hint: the rate is 0 there
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref_params = ref.step(ref_params, grads)
    for k in params:
      np.testing.assert_allclose(np.asarray(params[k]), ref_params[k], rtol=2e-5,
                                 atol=2e-6)


def test_first_update_is_zero_with_warmup_and_nonzero_without():
  grads = {"w": jnp.ones((2,))}
  params = {"w": jnp.ones((2,))}
  warm = nadamw_lib.nadamw(common.warmup_cosine_schedule(0.1, 0.5, 10))
  updates, _ = warm.update(grads, warm.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
  flat = nadamw_lib.nadamw(common.warmup_cosine_schedule(0.1, 0.0, 10))
  updates, _ = flat.update(grads, flat.init(params), params)
  # lr 0.1 at step 0. With g = 1: mu = 0.1, look-ahead 0.9 * 0.1 + 0.1 = 0.19, over
  # 1 - b1 = 0.1 gives 1.9; nu_hat = 1. (Both terms share 1 - b1^t, so the first
  # Nesterov step is (1 + b1) times Adam's.)
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.19, rtol=1e-5)


def test_scale_by_nadam_without_debias():
  t = nadamw_lib.scale_by_nadam(b1=0.5, b2=0.75, eps=0.0, debias=False)
  g = {"w": jnp.asarray([2.0])}
  out, state = t.update(g, t.init(g))
  # mu = 1, nu = 1, look-ahead = 0.5 * 1 + 0.5 * 2 = 1.5; u = 1.5 / sqrt(1).
  np.testing.assert_allclose(np.asarray(out["w"]), [1.5])
  assert int(state.count) == 1

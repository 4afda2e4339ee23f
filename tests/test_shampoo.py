"""Distributed Shampoo against float64 NumPy references of the same math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging.optimizers import nadamw as nadamw_lib
from weight_averaging.optimizers import shampoo

F32_EPS = 2.0**-24  # unit roundoff of float32


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------


def np_root(a, p, eps, relative):
  """(A + r I)^(-1/p) in float64 with the spectrum shifted to be non-negative."""
  a = np.asarray(a, np.float64)
  a = 0.5 * (a + a.T)
  w, v = np.linalg.eigh(a)
  w = w - min(w.min(), 0.0)
  lam = w.max()
  r = eps * (lam if lam > 0 else 1.0) if relative else eps
  return (v * (w + r) ** (-1.0 / p)) @ v.T


def spd(n, cond, rng, rank=None):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  w = np.logspace(0, -math.log10(cond), n)
  if rank is not None:
    w[rank:] = 0.0
  return ((q * w) @ q.T).astype(np.float32)


def np_merge(shape, max_dim):
  out = []
  for d in shape:
    if d == 1:
      continue
    if out and out[-1] * d <= max_dim:
      out[-1] *= d
    else:
      out.append(d)
  return out


def np_blocks(shape, bs):
  """Slices of every block, by brute force over the block grid."""
  ranges = [[(s, min(s + bs, n)) for s in range(0, n, bs)] for n in shape]
  grid = np.indices([len(r) for r in ranges]).reshape(len(shape), -1).T
  return [tuple(slice(*ranges[i][j]) for i, j in enumerate(idx)) for idx in grid]


def np_mode_product(x, p, dim):
  return np.moveaxis(np.tensordot(p, x, axes=([1], [dim])), 0, dim)


class NumpyShampoo:
  """Shampoo one parameter at a time, one block at a time, in float64."""

  def __init__(self, params, lr, hp):
    self.lr, self.hp, self.t = lr, dict(hp), 0
    if self.hp["start_preconditioning_step"] < 0:
      self.hp["start_preconditioning_step"] = self.hp["preconditioning_every"]
    hp = self.hp
    init = hp["statistics_init_scale"]
    init = hp["matrix_epsilon"] if init is None else init
    self.plan, self.stats, self.roots = {}, {}, {}
    zeros = lambda: {k: np.zeros(v.shape) for k, v in params.items()}
    self.mu, self.v, self.m, self.mg = zeros(), zeros(), zeros(), zeros()
    for k, v in params.items():
      squeezed = [d for d in v.shape if d != 1]
      if not squeezed or max(squeezed) > hp["skip_dim_gt"]:
        continue
      merged = np_merge(v.shape, hp["merge_dims_threshold"])
      p = hp["exponent_override"] or 2 * len(merged)
      blocks = np_blocks(merged, hp["block_size"])
      self.plan[k] = (merged, p, blocks)
      for bi, b in enumerate(blocks):
        for i, s in enumerate(b):
          d = s.stop - s.start
          self.stats[k, bi, i] = init * np.eye(d)
          self.roots[k, bi, i] = np.eye(d)

  def _graft(self, k, g, x):
    hp = self.hp
    kind, b2, eps = hp["graft_type"], hp["beta2"], hp["diagonal_epsilon"]
    if kind == "sgd":
      return x
    if kind == "rmsprop_normalized":
      g = g / (np.linalg.norm(g) + 1e-16)
      x = x / (np.linalg.norm(x) + 1e-16)
    self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
    v = self.v[k] / (1 - b2**self.t) if kind == "adam" else self.v[k]
    return x / (np.sqrt(v) + eps)

  def step(self, params, grads):
    hp = self.hp
    c = self.t
    self.t += 1
    b1, b2, mu_, w = hp["beta1"], hp["beta2"], hp["momentum"], 1.0
    if hp["moving_average_for_momentum"]:
      w = 1 - mu_
    out = {}
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      if b1 > 0:
        self.mu[k] = b1 * self.mu[k] + (1 - b1) * g
        look = b1 * self.mu[k] + (1 - b1) * g if hp["use_nadam"] else self.mu[k]
        x = look / (1 - b1**self.t)
      else:
        x = g
      a = self._graft(k, g, x)
      d = a
      if k in self.plan:
        merged, p, blocks = self.plan[k]
        gm, xm, am = g.reshape(merged), x.reshape(merged), a.reshape(merged)
        dm = np.zeros(merged)
        for bi, b in enumerate(blocks):
          for i in range(len(merged)):
            if c % hp["statistics_every"] == 0:
              u = np.moveaxis(gm[b], i, 0).reshape(gm[b].shape[i], -1)
              self.stats[k, bi, i] = b2 * self.stats[k, bi, i] + (1 - b2) * u @ u.T
            if c % hp["preconditioning_every"] == 0:
              s = self.stats[k, bi, i]
              if hp["statistics_bias_correction"]:
                s = s / (1 - b2 ** (c // hp["statistics_every"] + 1))
              self.roots[k, bi, i] = np_root(s, p, hp["matrix_epsilon"],
                                             hp["relative_matrix_epsilon"])
          y = xm[b]
          for i in range(len(merged)):
            y = np_mode_product(y, self.roots[k, bi, i], i)
          if hp["graft_per_block"]:
            y = y * np.linalg.norm(am[b]) / (np.linalg.norm(y) + 1e-16)
          dm[b] = y
        d = dm.reshape(g.shape)
        if not hp["graft_per_block"]:
          d = d * np.linalg.norm(a) / (np.linalg.norm(d) + 1e-16)
      use = c >= hp["start_preconditioning_step"]
      decay = hp["weight_decay"] * np.asarray(params[k], np.float64)
      us, ug = d + decay, a + decay
      u = us if use else ug
      if mu_ == 0:
        step = u
      elif hp["graft_momentum_buffer"]:
        self.m[k] = mu_ * self.m[k] + w * us
        self.mg[k] = mu_ * self.mg[k] + w * ug
        m = self.m[k] if use else self.mg[k]
        step = w * u + mu_ * m if hp["nesterov"] else m
      else:
        self.m[k] = mu_ * self.m[k] + w * u
        step = w * u + mu_ * self.m[k] if hp["nesterov"] else self.m[k]
      out[k] = params[k] - self.lr * step
    return out


# ---------------------------------------------------------------------------
# Inverse p-th root
# ---------------------------------------------------------------------------

CONDS = (1e1, 1e2, 1e4, 1e6, 1e8)


def _root_tolerance(cond, eps, relative):
  # Float32 roots lose about u * kappa_eff relative accuracy, kappa_eff the
  # condition number after the ridge; the reference saw <= 0.2 u kappa_eff.
  lam_min = 1.0 / cond + (eps if relative else eps)
  return max(2e-5, 0.5 * F32_EPS / lam_min)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_root_matches_float64(method, p):
  rng = np.random.default_rng(p)
  mats = np.stack([spd(20, cond, rng) for cond in CONDS])
  for relative, eps in ((True, 1e-6), (False, 1e-7)):
    fn = jax.jit(jax.vmap(lambda a: shampoo.matrix_inverse_pth_root(
        a, p, epsilon=eps, relative_epsilon=relative, method=method)))
    roots, errors = fn(mats)
    assert np.all(np.asarray(errors) < 1e-3)
    for a, root, cond in zip(mats, np.asarray(roots), CONDS):
      ref = np_root(a, p, eps, relative)
      rel_err = np.linalg.norm(root - ref) / np.linalg.norm(ref)
      assert rel_err < _root_tolerance(cond, eps, relative), (relative, cond, rel_err)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_root_rank_deficient_zero_and_override(method):
  rng = np.random.default_rng(0)
  a = spd(16, 1e2, rng, rank=5)
  root, err = shampoo.matrix_inverse_pth_root(a, 4, epsilon=1e-4, method=method)
  ref = np_root(a, 4, 1e-4, True)
  # A backward-stable float32 eigh returns each eigenvalue within about n * u * lambda_max
  # (the zero ones come out as +-u * lambda_max or so, depending on the LAPACK build), and
  # x**(-1/p) turns an absolute error d at the ridge eps * lambda_max into a relative one of
  # d / (p * eps * lambda_max): the bound is n * u / (p * eps).
  n, p, eps = 16, 4, 1e-4
  assert np.linalg.norm(root - ref) / np.linalg.norm(ref) < n * F32_EPS / (p * eps)
  assert float(err) < 0.1
  # A zero matrix falls back to the absolute ridge: epsilon**(-1/p) I.
  root, err = shampoo.matrix_inverse_pth_root(np.zeros((4, 4), np.float32), 2,
                                              epsilon=1e-4, method=method)
  np.testing.assert_allclose(root, 100.0 * np.eye(4), rtol=1e-4)
  # p = 2 is the inverse square root: root @ root @ (A + rI) = I.
  b = spd(8, 10.0, rng)
  root, _ = shampoo.matrix_inverse_pth_root(b, 2, epsilon=1e-6, method=method)
  r = np.asarray(root, np.float64)
  np.testing.assert_allclose(r @ r @ (b + 1e-6 * np.eye(8)), np.eye(8), atol=1e-4)


def test_root_against_optax_for_powers_of_two():
  rng = np.random.default_rng(3)
  a = spd(12, 1e3, rng)
  for p in (2, 4, 8):
    ours, _ = shampoo.matrix_inverse_pth_root(a, p, epsilon=1e-6, relative_epsilon=False)
    theirs = optax.matrix_inverse_pth_root(jnp.asarray(a), p, ridge_epsilon=1e-6)[0]
    np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=2e-4)


def test_root_nan_is_signalled():
  a = np.eye(4, dtype=np.float32)
  a[1, 2] = np.nan
  for method in ("eigh", "newton"):
    _, err = shampoo.matrix_inverse_pth_root(a, 2, method=method)
    assert not bool(shampoo.root_is_valid(err, 0.1))


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, per_chunk", [(7, 3), (7, 7), (5, 1), (4, 2)])
def test_chunked_roots_equal_one_batch(n, per_chunk):
  """Chunks (the last one shifted back to end at n) give the roots of one vmap (bitwise on
  jax 0.7.0's CPU backend; to float32 rounding where batched kernels depend on the batch
  size); the normalizer divides each chunk as it would the stack."""
  rng = np.random.default_rng(n)
  d = 6
  stack = jnp.asarray(np.stack([spd(d, 1e3, rng) for _ in range(n)]))
  roots = jax.jit(shampoo.batched_inverse_pth_roots, static_argnums=1,
                  static_argnames="chunk_bytes")
  whole = roots(stack / 0.3, 4, chunk_bytes=2**30)
  assert shampoo.chunk_length(n, d, per_chunk * 4 * d * d) == per_chunk
  chunked = roots(stack, 4, chunk_bytes=per_chunk * 4 * d * d, normalizer=0.3)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-4,
                             atol=1e-5 * np.abs(whole[0]).max())
  assert np.all(chunked[1] < 1e-5) and np.all(whole[1] < 1e-5)  # residuals: rounding
  for i in range(n):
    np.testing.assert_allclose(whole[0][i], np_root(stack[i] / 0.3, 4, 1e-6, True),
                               rtol=2e-3, atol=1e-3 * np.abs(whole[0][i]).max())


def test_refresh_roots_writes_valid_roots_in_place_chunk_by_chunk():
  rng = np.random.default_rng(3)
  stack = np.stack([spd(5, 10.0, rng) for _ in range(7)])
  stack[5, 0, 0] = np.nan
  old = jnp.asarray(rng.normal(size=(7, 5, 5)).astype(np.float32))
  refresh = jax.jit(lambda s, o: shampoo.refresh_roots(s, o, 2, threshold=0.1,
                                                       chunk_bytes=3 * 4 * 25),
                    donate_argnums=1)
  new = np.asarray(refresh(jnp.asarray(stack), jnp.array(old)))
  roots, err = shampoo.batched_inverse_pth_roots(jnp.asarray(stack), 2)
  assert not np.isfinite(err[5]) and np.all(np.isfinite(np.delete(np.asarray(err), 5)))
  np.testing.assert_array_equal(new[5], old[5])  # the failed root keeps the old one
  np.testing.assert_array_equal(np.delete(new, 5, 0), np.delete(np.asarray(roots), 5, 0))
  with pytest.raises(ValueError, match="root_chunk_bytes"):
    shampoo.ShampooConfig(root_chunk_bytes=0)


def test_the_step_temporaries_do_not_grow_with_the_stack():
  """XLA's compile-time analysis of a donated step: the root refresh and the statistics
  update work in place, so the temporaries stay below two stacks of statistics (1 on
  jax 0.7.0, 1.3 on 0.10; they were 3 to 4 when all roots were computed in one batch)."""
  # A vector of 48 blocks of 128: its statistics are 128 times its size.
  params = {"w": jax.ShapeDtypeStruct((48 * 128,), jnp.float32)}
  opt = shampoo.scale_by_shampoo(block_size=128, merge_dims_threshold=1, skip_dim_gt=10**6,
                                 root_chunk_bytes=4 * 128 * 128 * 4, preconditioning_every=1)
  state = jax.eval_shape(opt.init, params)
  stack = state.statistics[0].size * 4
  m = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=1).lower(
      params, state, params).compile().memory_analysis()
  if m is None or not m.argument_size_in_bytes:
    pytest.skip("this jax has no compile-time memory analysis on this backend")
  assert m.temp_size_in_bytes < 2 * stack, (m.temp_size_in_bytes, stack)


def test_merge_small_dims():
  assert shampoo.merge_small_dims([1, 2, 512, 1, 2048, 1, 3, 4], 1024) == (1024, 2048, 12)
  assert shampoo.merge_small_dims([1, 2, 768, 1, 2048], 1024) == (2, 768, 2048)
  assert shampoo.merge_small_dims([32, 64], 4096) == (2048,)
  assert shampoo.merge_small_dims([1, 1], 4096) == ()
  assert shampoo.merge_small_dims([3, 1, 5], 1) == (3, 5)


@pytest.mark.parametrize("shape,bs", [((7,), 3), ((6, 9), 4), ((4, 8), 4), ((5, 3, 7), 2),
                                      ((2, 3), 10), ((13, 1, 3), 5)])
def test_block_round_trip(shape, bs):
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  blocks = shampoo.split_into_blocks(jnp.asarray(x), bs)
  # Every block is one of the brute-force grid's blocks, each exactly once.
  expected = sorted(x[b].tobytes() for b in np_blocks(shape, bs))
  got = sorted(np.asarray(blk).tobytes() for group in blocks for blk in group)
  assert got == expected
  assert all(max(g.shape[1:], default=0) <= bs for g in blocks)
  np.testing.assert_array_equal(shampoo.merge_blocks(blocks, shape, bs), x)


def test_merge_then_block_round_trip_and_plan():
  x = np.random.default_rng(0).normal(size=(1, 3, 5, 1, 40)).astype(np.float32)
  merged = shampoo.merge_small_dims(x.shape, 16)
  assert merged == (15, 40)
  blocks = shampoo.split_into_blocks(jnp.asarray(x.reshape(merged)), 16)
  back = shampoo.merge_blocks(blocks, merged, 16).reshape(x.shape)
  np.testing.assert_array_equal(back, x)
  plan = shampoo.block_plan([x.shape, (3,), (1,), (5000, 8), ()], block_size=16,
                            merge_dims_threshold=16, skip_dim_gt=4096)
  pre = [lp.preconditioned for lp in plan.leaves]
  assert pre == [True, True, False, False, False]
  # (15, 40) -> blocks 15 x {16, 16, 8}: factors 3 of 15, 2 of 16, 1 of 8 (p = 4);
  # (3,) -> one factor of 3 with p = 2.
  assert plan.stacks == ((3, 2, 1), (8, 4, 1), (15, 4, 3), (16, 4, 2))


# ---------------------------------------------------------------------------
# Full steps
# ---------------------------------------------------------------------------


def _params(seed, shapes):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


SMALL = dict(block_size=4, merge_dims_threshold=1, skip_dim_gt=100)


def _run(opt, params, n_steps, seed=1, jit=True, grad_fn=None):
  state = opt.init(params)
  step = jax.jit(opt.update) if jit else opt.update
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(n_steps):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append((grads, params, state))
  return history


# The remainder blocks have rank-deficient statistics, so the ridge sets their
# condition number; it is kept moderate (1e-3, relative or absolute) so that
# float32 roots agree with the float64 reference to ~1e-5 (see `_root_tolerance`).
@pytest.mark.parametrize("preset,overrides", [
    ("google", dict(beta2=0.9, start_preconditioning_step=3, preconditioning_every=2,
                    weight_decay=0.05, matrix_epsilon=1e-3)),
    ("google", dict(beta2=0.95, start_preconditioning_step=2, preconditioning_every=3,
                    matrix_epsilon=1e-3,
                    statistics_every=2, root_method="newton", graft_type="adam",
                    graft_momentum_buffer=False, nesterov=False)),
    ("meta", dict(beta1=0.8, beta2=0.9, start_preconditioning_step=-1,
                  preconditioning_every=2, weight_decay=0.05, matrix_epsilon=1e-3)),
    ("meta", dict(beta1=0.0, beta2=0.9, momentum=0.7, graft_type="sgd",
                  start_preconditioning_step=2, preconditioning_every=2,
                  exponent_override=2, matrix_epsilon=1e-3)),
])
def test_matches_numpy_shampoo(preset, overrides):
  shapes = {"w": (6, 9), "b": (7,), "k": (5, 1, 3), "emb": (120, 2)}
  params = _params(0, shapes)
  hp = shampoo.shampoo_hyperparameters(preset, **SMALL, **overrides)
  lr = 0.1
  opt = shampoo.distributed_shampoo(lr, preset=preset, **SMALL, **overrides)
  ref = NumpyShampoo(params, lr, {**hp, "weight_decay": hp.get("weight_decay", 0.0)})
  ref_params = {k: v.astype(np.float64) for k, v in params.items()}
  for grads, new_params, _ in _run(opt, params, 8):
    ref_params = ref.step(ref_params, grads)
    for k in params:
      np.testing.assert_allclose(new_params[k], ref_params[k], rtol=2e-4, atol=2e-5,
                                 err_msg=k)


def test_meta_mode_before_start_is_nadamw():
  # AlgoPerf's NadamW (this package's): optax.nadamw bias-corrects the look-ahead
  # term by 1 - b1**(t+1) instead, so it is not the reference here.
  shapes = {"w": (6, 9), "b": (7,)}
  params = _params(0, shapes)
  lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
  opt = shampoo.distributed_shampoo(lr, preset="meta", beta1=b1, beta2=b2,
                                    weight_decay=wd, block_size=4,
                                    start_preconditioning_step=100)
  ref = nadamw_lib.nadamw(lr, b1, b2, weight_decay=wd)
  ref_state, ref_params = ref.init(params), params
  for grads, new_params, _ in _run(opt, params, 6):
    upd, ref_state = ref.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
    for k in params:
      np.testing.assert_allclose(new_params[k], ref_params[k], rtol=1e-5, atol=1e-6)


def test_adam_graft_before_start_is_adamw():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  lr, wd = 0.01, 0.1
  opt = shampoo.distributed_shampoo(lr, preset="meta", beta2=0.99, use_nadam=False,
                                    weight_decay=wd, start_preconditioning_step=100)
  ref = optax.adamw(lr, 0.9, 0.99, eps=1e-8, weight_decay=wd)
  ref_state, ref_params = ref.init(params), params
  for grads, new_params, _ in _run(opt, params, 5):
    upd, ref_state = ref.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
    for k in params:
      np.testing.assert_allclose(new_params[k], ref_params[k], rtol=1e-5, atol=1e-6)


def test_google_mode_before_start_is_normalized_rmsprop_nesterov():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  lr, b2, mu, eps = 0.05, 0.99, 0.9, 1e-8
  opt = shampoo.distributed_shampoo(lr, beta2=b2, momentum=mu, diagonal_epsilon=eps)
  v = {k: np.zeros(x.shape) for k, x in params.items()}
  m = {k: np.zeros(x.shape) for k, x in params.items()}
  ref = {k: x.astype(np.float64) for k, x in params.items()}
  for grads, new_params, _ in _run(opt, params, 5):
    for k, g in grads.items():
      g = g / np.linalg.norm(g)
      v[k] = b2 * v[k] + (1 - b2) * g * g
      a = g / (np.sqrt(v[k]) + eps)
      m[k] = mu * m[k] + (1 - mu) * a
      ref[k] = ref[k] - lr * ((1 - mu) * a + mu * m[k])
      np.testing.assert_allclose(new_params[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graft_type,per_block", [("adam", False), ("adam", True),
                                                  ("rmsprop_normalized", False),
                                                  ("sgd", True)])
def test_grafted_norms(graft_type, per_block):
  params = _params(0, {"w": (6, 9), "b": (7,)})
  opt = shampoo.scale_by_shampoo(block_size=4, merge_dims_threshold=1, momentum=0.0,
                                 graft_type=graft_type, graft_per_block=per_block,
                                 start_preconditioning_step=0, preconditioning_every=1)
  graft = shampoo.scale_by_shampoo(block_size=4, merge_dims_threshold=1, momentum=0.0,
                                   graft_type=graft_type, start_preconditioning_step=99)
  s, sg = opt.init(params), graft.init(params)
  update, graft_update = jax.jit(opt.update), jax.jit(graft.update)
  rng = np.random.default_rng(2)
  for step in range(3):
    grads = {k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
    u, s = update(grads, s, params)
    a, sg = graft_update(grads, sg, params)
    for k in params:
      d, ak = np.asarray(u[k]), np.asarray(a[k])
      # Actually preconditioned (at the first step a vector's gradient is an
      # eigenvector of its own statistic, so only later steps tell).
      assert step == 0 or not np.allclose(d, ak, rtol=1e-2)
      if per_block:
        shape = d.reshape(-1, d.shape[-1]).shape if d.ndim > 1 else d.shape
        for b in np_blocks(shape, 4):
          np.testing.assert_allclose(np.linalg.norm(d.reshape(shape)[b]),
                                     np.linalg.norm(ak.reshape(shape)[b]), rtol=1e-5)
      else:
        np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(ak), rtol=1e-5)


def test_stale_roots_are_reused():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  opt = shampoo.distributed_shampoo(0.1, block_size=4, merge_dims_threshold=1,
                                    preconditioning_every=3, start_preconditioning_step=0)
  history = _run(opt, params, 7)
  roots = [[np.asarray(r) for r in h[2][0].roots] for h in history]
  stats = [[np.asarray(s) for s in h[2][0].statistics] for h in history]
  for step in range(1, 7):
    same = all(np.array_equal(a, b) for a, b in zip(roots[step], roots[step - 1]))
    assert same == (step % 3 != 0), step
    assert not any(np.array_equal(a, b) for a, b in zip(stats[step], stats[step - 1]))


def test_nan_root_falls_back():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  opt = shampoo.scale_by_shampoo(block_size=4, merge_dims_threshold=1,
                                 preconditioning_every=2, start_preconditioning_step=0)
  state = opt.init(params)
  rng = np.random.default_rng(0)
  grads = lambda: {k: rng.normal(size=x.shape).astype(np.float32)
                   for k, x in params.items()}
  update = jax.jit(opt.update)
  _, state = update(grads(), state, params)
  _, state = update(grads(), state, params)
  # Poison one statistic of the first stack; the next recompute must keep its root.
  stats = list(state.statistics)
  stats[0] = stats[0].at[0, 0, 0].set(jnp.nan)
  state = state._replace(statistics=tuple(stats))
  old = [np.asarray(r) for r in state.roots]
  out, state = update(grads(), state, params)
  new = [np.asarray(r) for r in state.roots]
  np.testing.assert_array_equal(new[0][0], old[0][0])
  assert not np.array_equal(new[0][1:], old[0][1:])  # the others were recomputed
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))


def test_skipped_and_scalar_params_get_the_graft():
  params = _params(0, {"emb": (5000, 2), "s": ()})
  opt = shampoo.scale_by_shampoo(start_preconditioning_step=0, preconditioning_every=1,
                                 momentum=0.0)
  graft = shampoo.scale_by_shampoo(start_preconditioning_step=99, momentum=0.0)
  state = opt.init(params)
  assert state.statistics == ()
  grads = _params(1, {"emb": (5000, 2), "s": ()})
  u, _ = opt.update(grads, state, params)
  a, _ = graft.update(grads, graft.init(params), params)
  for k in params:
    np.testing.assert_array_equal(u[k], a[k])


def test_state_is_a_plain_pytree_and_round_trips():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  opt = shampoo.distributed_shampoo(0.1, preset="meta", block_size=4,
                                    preconditioning_every=2, momentum=0.5)
  history = _run(opt, params, 3)
  _, params, state = history[-1]
  leaves, treedef = jax.tree_util.tree_flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = jax.tree_util.tree_unflatten(treedef, [np.array(x) for x in leaves])
  grads = _params(5, {"w": (6, 9), "b": (7,)})
  a, _ = jax.jit(opt.update)(grads, state, params)
  b, _ = jax.jit(opt.update)(grads, restored, params)
  for k in params:
    np.testing.assert_array_equal(a[k], b[k])


def test_state_fields_are_stable():
  # Checkpoints hold the state by these fields, in this order.
  assert shampoo.ScaleByShampooState._fields == (
      "count", "statistics", "roots", "first_moment", "graft_moment", "momentum",
      "graft_momentum")


def test_config_and_keywords_give_one_transform():
  params = _params(0, {"w": (6, 9), "b": (7,)})
  hp = shampoo.shampoo_hyperparameters("meta", **SMALL, preconditioning_every=2,
                                       start_preconditioning_step=0)
  by_name = shampoo.scale_by_shampoo(**hp)
  by_config = shampoo.scale_by_shampoo(shampoo.ShampooConfig(**hp))
  overridden = shampoo.scale_by_shampoo(shampoo.ShampooConfig(**dict(hp, momentum=0.5)),
                                        momentum=hp["momentum"])
  runs = [_run(opt, params, 3) for opt in (by_name, by_config, overridden)]
  for steps in zip(*runs):
    a, b, c = (jax.tree_util.tree_leaves(step) for step in steps)
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))


def test_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match="graft_type"):
    shampoo.scale_by_shampoo(graft_type="adagrad")
  with pytest.raises(ValueError, match="root_method"):
    shampoo.scale_by_shampoo(root_method="svd")
  with pytest.raises(ValueError, match="at most one"):
    shampoo.scale_by_shampoo(axis_name="batch",
                             mesh=Mesh(np.array(jax.devices()), ("batch",)))
  with pytest.raises(ValueError, match="preset"):
    shampoo.distributed_shampoo(0.1, preset="adam")
  with pytest.raises(TypeError, match="unknown Shampoo hyperparameters"):
    shampoo.shampoo_hyperparameters("meta", block_sz=4)
  with pytest.raises(TypeError):
    shampoo.scale_by_shampoo(block_sz=4)


# ---------------------------------------------------------------------------
# Distribution: one device = pmap = jit (mesh) = jit (shard_map)
# ---------------------------------------------------------------------------

DIST_SHAPES = {"w": (10, 7), "v": (9, 5), "b": (11,), "emb": (300, 3)}
# Programs compiled differently (batch sizes, fusion) round differently; the
# ridge bounds how much the roots amplify that (see `_root_tolerance`).
DIST_HP = dict(block_size=4, merge_dims_threshold=1, skip_dim_gt=100,
               preconditioning_every=2, start_preconditioning_step=1, matrix_epsilon=1e-3)


def _shard_map(f, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _dist_steps(opt, step_fn, put, n=3):
  params = _params(0, DIST_SHAPES)
  state = put(opt.init(params))
  params = put(params)
  rng = np.random.default_rng(7)
  outs = []
  for _ in range(n):
    grads = put({k: rng.normal(size=s).astype(np.float32) for k, s in DIST_SHAPES.items()})
    updates, state = step_fn(grads, state, params)
    outs.append(updates)
  return outs, state


# Newton's roots go through the same distribution code (checked once, on eigh, to
# keep the file fast); both methods are checked against float64 above.
@pytest.mark.parametrize("method", ["eigh"])
def test_distributed_equals_single_device(method):
  n_dev = jax.device_count()
  assert n_dev == 4
  hp = dict(DIST_HP, root_method=method)
  single_opt = shampoo.scale_by_shampoo(**hp)
  ref, ref_state = _dist_steps(single_opt, jax.jit(single_opt.update), lambda x: x)

  def close(a, b):  # float32 rounding, relative to the tensor's scale
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())

  def check(outs, state, first=lambda x: x):
    for o, r in zip(outs, ref):
      for k in r:
        close(first(o[k]), r[k])
    for a, b in zip(state.roots, ref_state.roots):
      close(first(a), b)

  # The devices compute their shares 3 matrices at a time (uneven chunks and shares).
  hp = dict(hp, root_chunk_bytes=3 * 4 * 4 * 4)

  # pmap: every device holds everything, the roots are split over the axis.
  pmap_opt = shampoo.scale_by_shampoo(axis_name="batch", **hp)
  rep = lambda tree: jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n_dev),
                                            tree)
  outs, state = _dist_steps(pmap_opt, jax.pmap(pmap_opt.update, axis_name="batch"), rep)
  for x in jax.tree_util.tree_leaves((outs, state)):  # devices agree bitwise
    assert all(np.array_equal(x[0], x[i]) for i in range(n_dev))
  check(outs, state, first=lambda x: np.asarray(x)[0])

  mesh = Mesh(np.array(jax.devices()), ("batch",))
  put = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

  # jit + mesh: the transform splits the stacks itself.
  mesh_opt = shampoo.scale_by_shampoo(mesh=mesh, **hp)
  outs, state = _dist_steps(mesh_opt, jax.jit(mesh_opt.update), put)
  check(outs, state)

  # jit + shard_map around the whole update, with the axis name as under pmap.
  sm_opt = shampoo.scale_by_shampoo(axis_name="batch", **hp)
  spec = PartitionSpec()
  step = jax.jit(_shard_map(sm_opt.update, mesh, (spec, spec, spec), (spec, spec)))
  outs, state = _dist_steps(sm_opt, step, put)
  check(outs, state)

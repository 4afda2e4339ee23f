"""EMA and LAWA against brute-force NumPy averages, under jit and pmap, in every placement."""

import logging
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import weight_averaging as wa
from weight_averaging import placement as placement_lib

from reference import ema_reference, lawa_reference

SHAPES = {"w": (3, 5), "b": (7,), "s": ()}


def random_trajectory(seed, num_steps, dtype=np.float32, offset=0.0):
  rng = np.random.default_rng(seed)
  return [{name: (rng.normal(size=shape) + offset).astype(dtype)
           for name, shape in SHAPES.items()} for _ in range(num_steps)]


def run_jit(averager, trajectory):
  """Averages after every step, with init/update/average each jitted."""
  params = jax.tree_util.tree_map(jnp.asarray, trajectory[0])
  state = jax.jit(averager.init)(params)
  update = jax.jit(averager.update, donate_argnums=0)
  average = jax.jit(averager.average)
  out = []
  for params in trajectory:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = update(state, params)
    out.append(jax.device_get(average(state, params)))
  return out, state


def assert_matches(got, want, trajectory, rtol, atol):
  for t, (g, w, live) in enumerate(zip(got, want, trajectory)):
    for name in SHAPES:
      expected = live[name] if w is None else w[name]
      assert g[name].dtype == live[name].dtype, (t, name)
      np.testing.assert_allclose(
          np.asarray(g[name], np.float64), np.asarray(expected, np.float64),
          rtol=rtol, atol=atol, err_msg=f"step {t}, leaf {name}")


def per_leaf(reference_fn, trajectory, **kw):
  """Runs a per-array reference over every leaf and zips the results into trees."""
  columns = {name: reference_fn([p[name] for p in trajectory], **kw) for name in SHAPES}
  return [None if columns["w"][t] is None else {n: columns[n][t] for n in SHAPES}
          for t in range(len(trajectory))]


# ----------------------------------------------------------------------------
# Against brute force, over random hyperparameters and trajectories.

SETTINGS = hypothesis.settings(max_examples=20, deadline=None, derandomize=True)


@SETTINGS
@hypothesis.given(
    beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    every=st.integers(1, 4),
    start_step=st.integers(0, 6),
    debias=st.booleans(),
    dtype=st.sampled_from([None, "float32", "bfloat16"]),
    gate=st.sampled_from(["cond", "mask"]),
    seed=st.integers(0, 2**16))
def test_ema_matches_brute_force(beta, every, start_step, debias, dtype, gate, seed):
  trajectory = random_trajectory(seed, 16)
  averager = wa.ema(beta, every=every, start_step=start_step, debias=debias,
                    dtype=dtype, gate=gate)
  got, state = run_jit(averager, trajectory)
  want = per_leaf(ema_reference, trajectory, beta=beta, every=every,
                  start_step=start_step, debias=debias)
  # A bf16 state rounds at every update (8 significant bits).
  tol = 4 * 2**-8 if dtype == "bfloat16" else 2e-6
  assert_matches(got, want, trajectory, rtol=10 * tol, atol=tol)
  assert int(state.step) == len(trajectory)
  assert int(state.count) == sum(1 for w in range(16) if w >= start_step and w % every == 0)


@SETTINGS
@hypothesis.given(
    k=st.integers(1, 6),
    every=st.integers(1, 4),
    start_step=st.integers(0, 6),
    dtype=st.sampled_from([None, "float32"]),
    gate=st.sampled_from(["cond", "mask"]),
    seed=st.integers(0, 2**16))
def test_lawa_matches_brute_force(k, every, start_step, dtype, gate, seed):
  trajectory = random_trajectory(seed, 20, offset=3.0)
  averager = wa.lawa(k, every=every, start_step=start_step, dtype=dtype, gate=gate)
  got, _ = run_jit(averager, trajectory)
  want = per_leaf(lawa_reference, trajectory, k=k, every=every, start_step=start_step)
  assert_matches(got, want, trajectory, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("make", [lambda: wa.ema(0.99, every=2),
                                  lambda: wa.lawa(4, every=2)], ids=["ema", "lawa"])
def test_bfloat16_params_average_in_float32(make):
  """bf16 params: the state is float32 by default, the average comes back as bf16."""
  trajectory = random_trajectory(1, 24, dtype=jnp.bfloat16, offset=1.0)
  averager = make()
  got, state = run_jit(averager, trajectory)
  sums = state.ema if isinstance(state, wa.EmaState) else state.survivor_sum
  for leaf in jax.tree_util.tree_leaves(sums):
    assert leaf.dtype == jnp.float32
  if isinstance(state, wa.LawaState):  # snapshots of bf16 params are exact in bf16
    assert {l.dtype for l in jax.tree_util.tree_leaves(state.ring)} == {jnp.dtype(jnp.bfloat16)}
  reference = ema_reference if isinstance(state, wa.EmaState) else lawa_reference
  kw = dict(beta=0.99, debias=False) if reference is ema_reference else dict(k=4)
  want = per_leaf(reference, trajectory, every=2, start_step=0, **kw)
  # One bf16 rounding of the float32 result (8 significant bits).
  assert_matches(got, want, trajectory, rtol=2**-8, atol=1e-2)


def test_bfloat16_state_is_why_float32_is_the_default():
  """Kept in bf16, an EMA with 1 - beta = 1e-3 stops moving; in float32 it does not."""
  start = {"w": jnp.ones((64,), jnp.bfloat16)}
  target = {"w": jnp.full((64,), 1.5, jnp.bfloat16)}
  results = {}
  for dtype in ("bfloat16", None):
    averager = wa.ema(0.999, dtype=dtype)
    state = averager.update(averager.init(start), start)
    update = jax.jit(averager.update)
    for _ in range(500):
      state = update(state, target)
    results[dtype] = float(averager.average(state, target)["w"][0])
  want = 1.5 - 0.5 * 0.999**500  # ~1.197
  assert results["bfloat16"] == 1.0
  assert abs(results[None] - want) < 2**-7 * want


# ----------------------------------------------------------------------------
# Schedule and edge cases.


def test_average_returns_live_params_until_first_sample():
  trajectory = random_trajectory(2, 6)
  for averager in (wa.ema(0.9, start_step=4), wa.lawa(3, every=1, start_step=4)):
    got, _ = run_jit(averager, trajectory)
    for t in range(4):
      np.testing.assert_array_equal(got[t]["w"], trajectory[t]["w"])
    np.testing.assert_array_equal(got[4]["w"], trajectory[4]["w"])  # one sample
    assert not np.array_equal(got[5]["w"], trajectory[5]["w"])


def test_lawa_window_is_exactly_the_latest_k():
  # Params equal to the step index make the expected window mean obvious.
  k, every = 3, 2
  averager = wa.lawa(k, every=every)
  trajectory = [{n: np.full(s, float(t), np.float32) for n, s in SHAPES.items()}
                for t in range(11)]
  got, _ = run_jit(averager, trajectory)
  # Sampled steps: 0, 2, 4, 6, 8, 10; after step 10 the window is {6, 8, 10}.
  assert float(got[10]["s"]) == 8.0
  assert float(got[3]["s"]) == 1.0   # window {0, 2}
  assert float(got[0]["s"]) == 0.0


@pytest.mark.parametrize("where", ["replicated", "sharded", "host"])
@pytest.mark.parametrize("gate", ["cond", "mask"])
@pytest.mark.parametrize("k, every", [(9, 1), (17, 2)])
def test_lawa_long_rings_match_brute_force(k, every, gate, where):
  """Rings longer than one re-sum sweep (8 slots), through every gate and placement."""
  trajectory = random_trajectory(5, 2 * k * every + 5, offset=3.0)
  got, _ = run_jit(wa.lawa(k, every=every, gate=gate, placement=where), trajectory)
  want = per_leaf(lawa_reference, trajectory, k=k, every=every, start_step=0)
  assert_matches(got, want, trajectory, rtol=2e-6, atol=2e-6)


def test_lawa_mean_does_not_drift_over_100k_pushes():
  """The running sum stays exact to float32 rounding after 100,000 pushes."""
  k, num_pushes, size = 7, 100_000, 512
  averager = wa.lawa(k, every=1)
  key = jax.random.PRNGKey(0)

  def snapshot(i):
    # Large offset: a drifting add/subtract sum would show it quickly.
    return {"x": 100.0 + jax.random.normal(jax.random.fold_in(key, i), (size,))}

  @jax.jit
  def run():
    state = averager.init(snapshot(0))
    state = jax.lax.fori_loop(0, num_pushes,
                              lambda i, s: averager.update(s, snapshot(i)), state)
    return averager.average(state, snapshot(0))["x"]

  got = np.asarray(run(), np.float64)
  window = np.stack([np.asarray(snapshot(i)["x"], np.float64)
                     for i in range(num_pushes - k, num_pushes)])
  want = window.mean(axis=0)
  eps = np.finfo(np.float32).eps
  error = np.abs(got - want).max()
  assert error <= 4 * eps * np.abs(want).max(), error

  # The same stream through a plain float32 add/subtract running sum drifts far more,
  # so this test would catch a running sum without drift control.
  rng = np.random.default_rng(0)
  stream = (100.0 + rng.normal(size=(20_000, size))).astype(np.float32)
  naive = np.zeros(size, np.float32)
  for i in range(len(stream)):
    naive += stream[i] - (stream[i - k] if i >= k else 0)
  naive_error = np.abs(naive / k - stream[-k:].astype(np.float64).mean(0)).max()
  assert naive_error > 10 * error


# ----------------------------------------------------------------------------
# Placement: the same numbers everywhere, stored where it says.

PLACEMENTS = ["replicated", "sharded", "host"]
AVERAGERS = {"ema": lambda p: wa.ema(0.8, every=2, placement=p, debias=True),
             "lawa": lambda p: wa.lawa(3, every=2, placement=p)}


def one_device_run(name, trajectory):
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("averaging",))
  averager = AVERAGERS[name](placement_lib.replicated(mesh=mesh))
  got, _ = run_jit(averager, trajectory)
  return got


@pytest.mark.parametrize("name", sorted(AVERAGERS))
@pytest.mark.parametrize("where", PLACEMENTS)
def test_jit_placements_match_one_device(name, where):
  assert jax.device_count() == 4
  trajectory = random_trajectory(3, 9)
  averager = AVERAGERS[name](where)
  got, state = run_jit(averager, trajectory)
  want = one_device_run(name, trajectory)
  for g, w in zip(got, want):
    for leaf in SHAPES:
      # Elementwise math, but XLA may fuse a partitioned program differently: equal
      # to float32 rounding (a few ulp), not always bit for bit.
      np.testing.assert_allclose(g[leaf], w[leaf], rtol=5e-7, atol=1e-7)
  full = sum(np.prod(s, dtype=int) for s in SHAPES.values()) * 4  # float32 bytes
  per_device = placement_lib.device_bytes(state)
  copies = 3 + 1 if name == "lawa" else 1  # ring of k=3 + the running sum
  scalars = 8  # step and count, replicated
  if where == "sharded":
    padded = sum(4 * -(-max(1, int(np.prod(s))) // 4) for s in SHAPES.values())
    assert per_device == [copies * padded + scalars] * 4
    assert per_device[0] < copies * full / 2
  else:
    assert per_device == [copies * full + scalars] * 4


def test_sharded_state_is_one_nth_per_device_for_large_params():
  params = {"w": jnp.zeros((1000, 33)), "b": jnp.zeros((1001,))}
  for averager, copies in ((wa.ema(0.9, placement="sharded"), 1),
                           (wa.lawa(5, every=1, placement="sharded"), 6)):
    state = jax.jit(averager.init)(params)
    state = jax.jit(averager.update)(state, params)
    full = (1000 * 33 + 1001) * 4 * copies
    for nbytes in placement_lib.device_bytes(state):
      assert full / 4 <= nbytes - 8 <= full / 4 + 4 * 4 * copies * 2


def test_host_placement_lives_in_host_memory():
  averager = wa.lawa(2, every=1, placement="host")
  params = {"w": jnp.ones((4, 4))}
  state = jax.jit(averager.update)(jax.jit(averager.init)(params), params)
  state = averager.placement.put(state)
  kinds = {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(state.ring)}
  if averager.placement.available:
    assert kinds == {"pinned_host"}
    # And the jitted update keeps it there.
    state = jax.jit(averager.update, out_shardings=averager.state_shardings(state))(
        state, params)
    assert {l.sharding.memory_kind for l in jax.tree_util.tree_leaves(state.ring)} == {
        "pinned_host"}
  else:
    assert "pinned_host" not in kinds
  np.testing.assert_array_equal(averager.average(state, params)["w"], params["w"])


def test_host_fallback_is_logged_once(caplog, monkeypatch):
  monkeypatch.setattr(placement_lib, "_logged_host_fallback", False)
  monkeypatch.setattr(placement_lib, "backend_memory_kinds",
                      lambda device=None: frozenset({"device"}))
  with caplog.at_level(logging.WARNING):
    where = placement_lib.host()
    where.sharding(1)
    where.sharding(2)
  messages = [r.getMessage() for r in caplog.records if "pinned_host" in r.getMessage()]
  assert len(messages) == 1 and "'host'" in messages[0]


@pytest.mark.parametrize("name", sorted(AVERAGERS))
@pytest.mark.parametrize("where", PLACEMENTS)
def test_pmap_placements_match_one_device(name, where):
  n = jax.local_device_count()
  trajectory = random_trajectory(4, 9)
  averager = AVERAGERS[name](placement_lib.get(where, axis_name="i"))
  replicate = lambda tree: jax.tree_util.tree_map(
      lambda x: np.broadcast_to(x, (n,) + np.shape(x)), tree)
  state = jax.pmap(averager.init, axis_name="i")(replicate(trajectory[0]))
  update = jax.pmap(averager.update, axis_name="i")
  average = jax.pmap(averager.average, axis_name="i")
  want = one_device_run(name, trajectory)
  for params, w in zip(trajectory, want):
    state = averager.placement.put(update(state, replicate(params)))
    got = jax.device_get(average(state, replicate(params)))
    for leaf in SHAPES:
      for device in range(n):
        np.testing.assert_allclose(got[leaf][device], w[leaf], rtol=5e-7, atol=1e-7)
  if where == "sharded":
    # Each device stores its own quarter of the flattened, padded average.
    tree = state.ema if name == "ema" else state.survivor_sum
    assert tree["w"].shape == (n, 4)  # 15 elements padded to 16, 4 per device
  if where == "host":
    # Between steps the bulk (ring, EMA) is in host RAM; counters and sums stay on the devices.
    bulk = state.ema if name == "ema" else state.ring
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(bulk))
    rest = [state.step, state.count] + ([] if name == "ema" else
                                        jax.tree_util.tree_leaves(state.survivor_sum))
    assert all(isinstance(x, jax.Array) for x in rest)


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, name, value", [
    (lambda: wa.ema(1.0), "beta", "1.0"),
    (lambda: wa.ema(-0.1), "beta", "-0.1"),
    (lambda: wa.ema(float("nan")), "beta", "nan"),
    (lambda: wa.ema("0.9"), "beta", "'0.9'"),
    (lambda: wa.ema(True), "beta", "True"),
    (lambda: wa.ema(0.9, every=0), "every", "0"),
    (lambda: wa.ema(0.9, every=2.5), "every", "2.5"),
    (lambda: wa.ema(0.9, every=True), "every", "True"),
    (lambda: wa.ema(0.9, every="2"), "every", "'2'"),
    (lambda: wa.ema(0.9, start_step=0.5), "start_step", "0.5"),
    (lambda: wa.ema(0.9, start_step=-1), "start_step", "-1"),
    (lambda: wa.ema(0.9, dtype="int32"), "dtype", "'int32'"),
    (lambda: wa.ema(0.9, dtype="nonsense"), "dtype", "'nonsense'"),
    (lambda: wa.ema(0.9, placement="gpu"), "placement", "'gpu'"),
    (lambda: wa.ema(0.9, gate="branch"), "gate", "'branch'"),
    (lambda: wa.lawa(0, every=1), "k", "0"),
    (lambda: wa.lawa(2.5, every=1), "k", "2.5"),
    (lambda: wa.lawa(True, every=1), "k", "True"),
    (lambda: wa.lawa("2", every=1), "k", "'2'"),
    (lambda: wa.lawa(2, every=float("inf")), "every", "inf"),
    (lambda: wa.lawa(2, every=0), "every", "0"),
    (lambda: wa.lawa(2, every=1, dtype=jnp.int8), "dtype", "int8"),
    (lambda: wa.lawa(2, every=1, placement=None), "placement", "None"),
])
def test_bad_hyperparameters_name_themselves(call, name, value):
  with pytest.raises(ValueError) as error:
    call()
  assert name in str(error.value) and value in str(error.value)


@pytest.mark.parametrize("floats, ints", [
    (lambda: wa.ema(0.9, every=2.0, start_step=3.0),
     lambda: wa.ema(0.9, every=2, start_step=3)),
    (lambda: wa.lawa(3.0, every=2.0, start_step=1.0),
     lambda: wa.lawa(3, every=2, start_step=1)),
], ids=["ema", "lawa"])
def test_integral_floats_are_their_integers(floats, ints):
  """``every=2.0`` (a value of a linear search-space range) is ``every=2``, and so on."""
  trajectory = random_trajectory(3, 12)
  got, got_state = run_jit(floats(), trajectory)
  want, want_state = run_jit(ints(), trajectory)
  assert (jax.tree_util.tree_structure(got_state)
          == jax.tree_util.tree_structure(want_state))
  for a, b in zip(jax.tree_util.tree_leaves((got, got_state)),
                  jax.tree_util.tree_leaves((want, want_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(AVERAGERS))
def test_update_works_in_place(name):
  """No state buffer is copied: a step that does not sample touches nothing, and a
  LAWA push writes one slot of the ring instead of copying all k."""
  params = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32)}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("averaging",))
  averager = AVERAGERS[name](placement_lib.replicated(mesh=mesh))
  state = jax.eval_shape(averager.init, params)
  hlo = jax.jit(averager.update, donate_argnums=0).lower(state, params).compile().as_text()
  copies = [line for line in hlo.splitlines()
            if re.search(r"= f32\[[0-9,]*\]\S* copy\(", line)
            and ("64,48" in line or "3072" in line)]
  assert not copies, copies


# ----------------------------------------------------------------------------
# Mixed dtypes: float32 and bfloat16 leaves averaged (each returned in its own dtype),
# integer and boolean leaves passed through live.

MIXED = {"w": ((3, 5), np.float32), "scale": ((), jnp.bfloat16),
         "count": ((2,), np.int32), "mask": ((4,), np.bool_)}


def mixed_trajectory(seed, num_steps):
  """Floats that wander, integers and booleans that change at every step."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(num_steps):
    out.append({"w": rng.normal(size=(3, 5)).astype(np.float32),
                "scale": np.asarray(1.0 + rng.normal(), jnp.bfloat16),
                "count": np.asarray([t + 1, 3 * t + 2], np.int32),
                "mask": rng.integers(0, 2, size=4).astype(np.bool_)})
  return out


def mixed_reference(name, trajectory, every):
  """Brute force, float64: floats averaged then cast to their dtype, the rest live."""
  floats = ("w", "scale")
  if name == "ema":  # AVERAGERS["ema"]: beta 0.8, debiased
    columns = {n: ema_reference([p[n] for p in trajectory], beta=0.8, every=every,
                                start_step=0, debias=True) for n in floats}
  else:  # AVERAGERS["lawa"]: k = 3
    columns = {n: lawa_reference([p[n] for p in trajectory], k=3, every=every,
                                 start_step=0) for n in floats}
  out = []
  for t, live in enumerate(trajectory):
    tree = dict(live)
    for n in floats:
      if columns[n][t] is not None:
        tree[n] = np.asarray(columns[n][t]).astype(MIXED[n][1])
    out.append(tree)
  return out


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("name", sorted(AVERAGERS))
def test_mixed_dtype_tree_matches_numpy(name, where):
  """float32 + bfloat16 + int32 + bool: floats averaged in float32 and returned in their
  dtype; the int and bool leaves come back live (not a floored mean, not a rounded
  one), and the state holds nothing for them."""
  trajectory = mixed_trajectory(5, 11)
  averager = AVERAGERS[name](where)
  got, state = run_jit(averager, trajectory)
  want = mixed_reference(name, trajectory, every=2)
  for t, (g, w) in enumerate(zip(got, want)):
    for leaf in MIXED:
      assert g[leaf].dtype == np.dtype(MIXED[leaf][1]), (t, leaf)
    np.testing.assert_allclose(g["w"], w["w"], rtol=2e-6, atol=2e-6, err_msg=f"step {t}")
    # bfloat16: the float32 mean, rounded once (8 significant bits).
    np.testing.assert_allclose(np.float64(g["scale"]), np.float64(w["scale"]),
                               rtol=2**-8, err_msg=f"step {t}")
    np.testing.assert_array_equal(g["count"], trajectory[t]["count"])
    np.testing.assert_array_equal(g["mask"], trajectory[t]["mask"])
  stored = state.ema if name == "ema" else state.survivor_sum
  assert stored["count"] is None and stored["mask"] is None
  assert stored["w"].dtype == stored["scale"].dtype == jnp.float32


def test_integer_and_boolean_means_are_not_taken():
  """The case that was wrong: the LAWA mean of [1, 2] and [4, 7] came back [2, 4], and
  a mean of False and True (0.5) came back True. Now the live values come back."""
  averager = wa.lawa(2, every=1)
  first = {"n": jnp.asarray([1, 2], jnp.int32), "b": jnp.asarray(False),
           "x": jnp.asarray(1.0)}
  second = {"n": jnp.asarray([4, 7], jnp.int32), "b": jnp.asarray(True),
            "x": jnp.asarray(2.0)}
  state = averager.update(averager.update(averager.init(first), first), second)
  live = {"n": jnp.asarray([5, 6], jnp.int32), "b": jnp.asarray(False),
          "x": jnp.asarray(9.0)}
  out = averager.average(state, live)
  assert out["n"].tolist() == [5, 6] and out["n"].dtype == jnp.int32
  assert out["b"].tolist() is False and out["b"].dtype == jnp.bool_
  assert float(out["x"]) == 1.5  # the floating leaf is averaged

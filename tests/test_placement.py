"""Where the averaging state lives, and what a step moves: the placement contract.

* `init` puts every leaf exactly where `state_shardings` says, so the README's recipe
  (a jitted step that donates the state, with those shardings as out- and
  in-shardings) runs in every placement: run in a subprocess, where jax aborting
  the process fails the test instead of killing the suite.
* A donated update allocates no state-sized temporary (no copy of the ring or sum).
* With `host`, a LAWA push moves one snapshot to the host and one slot back per
  pass (counted in the program lowered for a GPU), whatever k.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import weight_averaging as wa
from weight_averaging import placement as placement_lib

PLACEMENTS = ["replicated", "sharded", "host"]
AVERAGERS = {"ema": lambda where, every=1: wa.ema(0.9, every=every, placement=where),
             "lawa": lambda where, every=1: wa.lawa(5, every=every, placement=where)}
RECIPE = os.path.join(os.path.dirname(__file__), "fixtures", "placement_recipe.py")
HOST_REASON = (f"jax {jax.__version__}'s {jax.default_backend()} backend has no pinned_host "
               "memory: 'host' falls back to device memory (the recipe still runs)")


def host_available():
  return placement_lib.host().available


def placed(averager, params):
  """The abstract state with its shardings, as a jitted step sees it."""
  state = jax.eval_shape(averager.init, params)
  shardings = averager.state_shardings(state)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)


@pytest.mark.parametrize("name", sorted(AVERAGERS))
@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_init_is_where_state_shardings_says(name, where, jitted):
  params = {"w": jnp.ones((3, 5)), "b": jnp.ones((7,), jnp.bfloat16)}
  averager = AVERAGERS[name](where)
  init = jax.jit(averager.init) if jitted else averager.init
  state = init(params)
  shardings = averager.state_shardings(state)
  for leaf, sharding in zip(jax.tree_util.tree_leaves(state),
                            jax.tree_util.tree_leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    assert (getattr(leaf.sharding, "memory_kind", None)
            == getattr(sharding, "memory_kind", None) or sharding.memory_kind is None)


def test_host_keeps_only_the_bulk_on_the_host():
  if not host_available():
    pytest.skip(HOST_REASON)
  params = {"w": jnp.ones((3, 5))}
  for averager, bulk in ((AVERAGERS["ema"]("host"), "ema"), (AVERAGERS["lawa"]("host"), "ring")):
    state = averager.init(params)
    for field, value in zip(state._fields, state):
      kinds = {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(value)}
      assert kinds == ({"pinned_host"} if field == bulk else {"device"}), field


@pytest.mark.parametrize("where", PLACEMENTS)
def test_readme_recipe_runs_donated_in_a_subprocess(where):
  """EMA and LAWA, with and without in-shardings, every step where the shardings say."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
      + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  run = subprocess.run([sys.executable, RECIPE, where], capture_output=True, text=True,
                       timeout=600, env=env)
  output = run.stdout + run.stderr
  assert run.returncode == 0, f"exit status {run.returncode}:\n{output[-4000:]}"
  oks = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
  assert len(oks) == 4, output[-4000:]
  if where == "host" and not host_available():
    assert "pinned_host" in output  # the fallback says so


@pytest.mark.parametrize("every", [1, 2], ids=["no-gate", "cond"])
@pytest.mark.parametrize("name", sorted(AVERAGERS))
@pytest.mark.parametrize("where", PLACEMENTS)
def test_donated_update_allocates_no_state_sized_temporary(name, where, every):
  """A sampling step updates the state in place: no copy of the average, ring or sum."""
  params = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32),
            "b": jax.ShapeDtypeStruct((48,), jnp.float32)}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("averaging",))
  averager = AVERAGERS[name](placement_lib.get(where, mesh=mesh), every)
  state = placed(averager, params)
  compiled = jax.jit(averager.update, donate_argnums=0,
                     out_shardings=averager.state_shardings(state)).lower(
                         state, params).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip(f"jax {jax.__version__} reports no memory analysis")
  param_bytes = (64 * 48 + 48) * 4
  assert analysis.temp_size_in_bytes < param_bytes / 4, analysis


@pytest.mark.parametrize("every", [1, 2], ids=["no-gate", "cond"])
@pytest.mark.parametrize("k", [2, 16])
def test_host_lawa_moves_one_slot_each_way(k, every):
  """The bytes moved between memory kinds do not grow with k (they were 3k + 3 slots)."""
  if not host_available():
    pytest.skip(HOST_REASON)
  params = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32),
            "b": jax.ShapeDtypeStruct((48,), jnp.bfloat16)}
  slot = 64 * 48 * 4 + 48 * 2  # one snapshot, in the params' dtypes
  averager = wa.lawa(k, every=every, placement="host")
  state = placed(averager, params)
  try:
    update = placement_lib.memory_transfers(
        averager.update, state, params, donate_argnums=0,
        out_shardings=averager.state_shardings(state))
  except TypeError as e:  # no `lowering_platforms` in this jax
    pytest.skip(f"jax {jax.__version__} cannot lower for another platform: {e}")
  # The new snapshot goes out; the slot the next push evicts comes back, and the
  # exact re-sum every k pushes streams one slot per loop iteration (counted once).
  assert update == {"pinned_host": slot, "device": 2 * slot}, update
  average = placement_lib.memory_transfers(averager.average, state, params)
  assert average == {"device": slot}, average


@pytest.mark.parametrize("every", [1, 2], ids=["no-gate", "cond"])
def test_host_ema_moves_the_average_once_each_way(every):
  if not host_available():
    pytest.skip(HOST_REASON)
  params = {"w": jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)}
  averager = wa.ema(0.9, every=every, placement="host")
  state = placed(averager, params)
  ema_bytes = 64 * 48 * 4  # kept in float32
  update = placement_lib.memory_transfers(averager.update, state, params, donate_argnums=0,
                                          out_shardings=averager.state_shardings(state))
  assert update == {"device": ema_bytes, "pinned_host": ema_bytes}, update
  assert placement_lib.memory_transfers(averager.average, state, params) == {
      "device": ema_bytes}


def test_offloaded_leaves_follow_the_state_type():
  state = wa.LawaState(step=0, count=0, ring={"w": np.zeros((2, 3))},
                       survivor_sum={"w": np.zeros(3)})
  assert placement_lib.offloaded_leaves(state) == wa.LawaState(
      step=False, count=False, ring={"w": True}, survivor_sum={"w": False})
  # Any other pytree: everything but the scalars.
  assert placement_lib.offloaded_leaves({"a": np.zeros(3), "n": np.int32(0)}) == {
      "a": True, "n": False}

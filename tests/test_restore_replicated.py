"""Resuming through the official runner's restore, which adds a device axis to every tree.

AlgoPerf's JAX restore (``algoperf/checkpoint_utils.py``, `replicate_checkpoint`)
passes the optimizer state's first element, the params and the model state through
``flax.jax_utils.replicate``; the next call is ``update_params``. The loop of
`test_submissions` runs a submission, checkpoints after an eval as the runner does
(element 0 of ``optimizer_state``, the params and model state it evaluated), restores
in the runner's layout, re-attaches a fresh ``init_optimizer_state``'s runtime and
trains on. The reference is the same run uninterrupted: the live params of every
step, the evaluated params and the final state (optimizer, averages) must be equal
bit for bit.

Layouts: ``device``: ``flax.jax_utils.replicate`` of the host arrays (what the runner
does), over the run's devices or (``all``) every local device as the runner's default;
``host``: the same as host arrays (its ``device_get``); under pmap ``fb2f492a`` (the
runner saves ``x[0]``, the state already has the device axis) and ``2c90454f`` (saved
as it is, replicated once more). The devices are the simulated CPU devices of
``conftest.py``, the first 1 or 2 of them, as `test_submissions` runs its multi-device
cases. The last test drives algoperf's own ``save_checkpoint`` and
``maybe_restore_checkpoint`` where algoperf is installed.
"""

import importlib.util

import jax
import numpy as np
import pytest

import test_submissions as ts
from weight_averaging.algoperf_api import restore

ALGORITHMS = ("nadamw", "nadamw_ema", "nadamw_lawa", "shampoo_lawa")
RESTORE_AFTER = 5  # an eval step: the runner checkpoints after evals


def _flax_replicate(tree, devices):
  jax_utils = pytest.importorskip("flax.jax_utils")
  return jax_utils.replicate(tree, devices)


def runner_restore(api, devices, tree, layout):
  """`tree` saved and restored by the runner in `layout` (module docstring)."""
  if api == "pmap" and layout == "fb2f492a":
    saved = jax.tree_util.tree_map(lambda x: np.array(np.asarray(x)[0]), tree)
  else:
    saved = jax.device_get(tree)  # flax writes host arrays and reads them back
  if layout == "host":
    return jax.tree_util.tree_map(
        lambda x: np.stack([np.asarray(x)] * len(devices)), saved)
  return _flax_replicate(saved, None if layout == "all" else devices)


def run(api, algorithm, num_devices, layout=None, restore_into="update_params",
        **overrides):
  """`ts.run`'s loop; with `layout`, saved after the eval at `RESTORE_AFTER` and resumed.

  restore_into: the first call after the restore, ``'update_params'`` (the runner's)
  or ``'prepare_for_eval'``. overrides: hyperparameters on top of `ts.hparams`'.
  """
  devices = jax.devices()[:num_devices]
  hp = ts.hparams(algorithm, **overrides)
  sub = ts.build(api, algorithm, devices)
  workload = ts.TinyWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  shapes = jax.tree_util.tree_map(np.shape, (params, model_state))
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  out = {"live": [], "evals": []}
  for step in range(ts.NUM_STEPS):
    rng = jax.random.PRNGKey(step)
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp,
        ts.place_batch(api, devices, ts.make_batch(step)), None, opt_state, [], step, rng)
    assert jax.tree_util.tree_map(np.shape, (params, model_state)) == shapes
    out["live"].append(ts.host(api, (params, model_state)))
    if step not in ts.EVAL_AT:
      continue
    opt_state, params, model_state = sub.prepare_for_eval(
        workload, params, None, model_state, hp, None, opt_state, [], step, None)
    out["evals"].append(ts.host(api, (params, model_state)))
    if step == RESTORE_AFTER and layout is not None:
      saved = [runner_restore(api, devices, tree, layout)
               for tree in (opt_state[0], params, model_state)]
      del opt_state, params, model_state
      sub = ts.build(api, algorithm, devices)
      workload = ts.TinyWorkload(api, devices)
      fresh = sub.init_optimizer_state(workload, *workload.init_model_fn(1), hp, None)
      opt_state, params, model_state = (saved[0], fresh[1]), saved[1], saved[2]
      if restore_into == "prepare_for_eval":
        opt_state, params, model_state = sub.prepare_for_eval(
            workload, params, None, model_state, hp, None, opt_state, [], step, None)
        assert jax.tree_util.tree_map(np.shape, (params, model_state)) == shapes
        out["evals"].append(ts.host(api, (params, model_state)))
  out["state"] = ts.host(api, opt_state[0])
  return out


_UNINTERRUPTED = {}


def uninterrupted(api, algorithm, num_devices, **overrides):
  key = (api, algorithm, num_devices, tuple(sorted(overrides.items())))
  if key not in _UNINTERRUPTED:
    _UNINTERRUPTED[key] = run(api, algorithm, num_devices, **overrides)
  return _UNINTERRUPTED[key]


def assert_same_run(got, want):
  for key in ("live", "evals"):
    assert len(got[key]) == len(want[key]), key
    for t, (a, b) in enumerate(zip(got[key], want[key])):
      for x, y in zip(ts.leaves(a), ts.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{key} {t}")
  assert (jax.tree_util.tree_structure(got["state"])
          == jax.tree_util.tree_structure(want["state"]))
  for x, y in zip(ts.leaves(got["state"]), ts.leaves(want["state"])):
    np.testing.assert_array_equal(x, y)


CASES = ([("jit", a, n, "device") for a in ALGORITHMS for n in (1, 2)]
         + [("jit", a, 2, "host") for a in ALGORITHMS]
         + [("jit", "nadamw_lawa", 2, "all"), ("jit", "nadamw_ema", 1, "all")]
         + [("pmap", a, 2, layout) for a in ("nadamw_ema", "shampoo_lawa")
            for layout in ("fb2f492a", "2c90454f")])


@pytest.mark.parametrize("api,algorithm,num_devices,layout", CASES)
def test_resume_after_the_runners_restore_equals_the_uninterrupted_run(
    api, algorithm, num_devices, layout):
  got = run(api, algorithm, num_devices, layout)
  assert_same_run(got, uninterrupted(api, algorithm, num_devices))


@pytest.mark.parametrize("api,layout", [("jit", "device"), ("pmap", "fb2f492a")])
def test_the_averaged_model_state_resumes_too(api, layout):
  """``averaging_model_state='average'``: the live model state is in the stash, the
  evaluated one averaged; both come back through the restore."""
  got = run(api, "nadamw_ema", 2, layout, averaging_model_state="average")
  want = uninterrupted(api, "nadamw_ema", 2, averaging_model_state="average")
  assert_same_run(got, want)
  # The evaluated model state is the average, not the live one.
  assert float(got["evals"][-1][1]["calls"]) != float(got["live"][-1][1]["calls"])


@pytest.mark.parametrize("api,layout", [("jit", "device"), ("pmap", "2c90454f")])
def test_a_restore_into_prepare_for_eval_returns_the_same_average(api, layout):
  got = run(api, "nadamw_lawa", 2, layout, restore_into="prepare_for_eval")
  want = uninterrupted(api, "nadamw_lawa", 2)
  step = list(ts.EVAL_AT).index(RESTORE_AFTER)
  want = dict(want, evals=want["evals"][:step + 1] + want["evals"][step:])
  assert_same_run(got, want)


def test_a_tree_in_neither_layout_names_the_leaf_and_both_shapes():
  devices = jax.devices()[:2]
  sub = ts.build("jit", "nadamw_ema", devices)
  workload = ts.TinyWorkload("jit", devices)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, ts.hparams(
      "nadamw_ema"), None)
  state = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * 2), opt_state[0])
  bad = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * 2), params)
  bad["out"]["bias"] = np.zeros((3, 3), np.float32)  # neither (3,) nor (2, 3)
  with pytest.raises(ValueError, match=r"restored params leaf \['out'\]\['bias'\] has "
                     r"shape \(3, 3\); this submission expects \(3,\) \(as initialised\) "
                     r"or \(2, 3\)"):
    sub.update_params(workload, bad, None, model_state, None,
                      ts.place_batch("jit", devices, ts.make_batch(0)), None,
                      (state, opt_state[1]), [], 0, jax.random.PRNGKey(0))


def test_device_axis_recognises_each_layout():
  want = restore.shapes({"a": np.zeros((3, 2)), "b": np.zeros(())})
  assert restore.device_axis({"a": np.zeros((3, 2)), "b": np.zeros(())}, want, "x") == 0
  assert restore.device_axis({"a": np.zeros((1, 3, 2)), "b": np.zeros(1)}, want, "x") == 1
  assert restore.device_axis({"a": np.zeros((4, 3, 2)), "b": np.zeros(4)}, want, "x") == 4
  with pytest.raises(ValueError, match=r"model state leaf \['b'\] has shape \(3,\); "
                     r"this submission expects \(\) \(as initialised\) or \(4,\)"):
    restore.device_axis({"a": np.zeros((4, 3, 2)), "b": np.zeros(3)}, want, "model state")
  with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(4,\); this submission "
                     r"expects \(\) \(as initialised\) or \(n,\)"):
    restore.device_axis({"a": np.zeros((3, 2)), "b": np.zeros(4)}, want, "x")
  with pytest.raises(ValueError, match="has 1 arrays where this submission initialised 2"):
    restore.device_axis({"a": np.zeros((3, 2))}, want, "x")
  stripped, found = restore.strip_device_axis(
      {"a": np.arange(12.0).reshape(2, 3, 2), "b": np.ones(2)}, want, "x")
  assert found and stripped["a"].shape == (3, 2) and stripped["b"].shape == ()


@pytest.fixture
def flax_msgpack_checkpoints():
  """flax's own msgpack checkpoints for the test, its orbax default restored after.

  With orbax (flax 0.10.7's default) the runner's restore cannot run at all:
  ``flax_checkpoints.restore_checkpoint`` gives back ``None`` for the target's
  ``'eval_results': None``, and ``checkpoint_utils.py`` line 127 (algoperf 2c90454f)
  calls ``.items()`` on it. That is upstream's, before any submission code runs.
  """
  flax = pytest.importorskip("flax")
  before = flax.config.flax_use_orbax_checkpointing
  flax.config.update("flax_use_orbax_checkpointing", False)
  yield
  flax.config.update("flax_use_orbax_checkpointing", before)


@pytest.mark.skipif(importlib.util.find_spec("algoperf") is None,
                    reason="needs algoperf (its checkpoint_utils)")
@pytest.mark.parametrize("algorithm", ["nadamw_lawa", "shampoo_ema"])
def test_algoperfs_own_save_and_restore(tmp_path, algorithm, flax_msgpack_checkpoints):
  """algoperf's `save_checkpoint` after an eval, `maybe_restore_checkpoint`, train on."""
  checkpoint_utils = pytest.importorskip("algoperf.checkpoint_utils")
  api = "jit" if importlib.util.find_spec("algoperf.jax_sharding_utils") else "pmap"
  devices = jax.local_devices()  # the runner's: every local device
  hp = ts.hparams(algorithm)
  want = uninterrupted(api, algorithm, len(devices))
  sub = ts.build(api, algorithm, devices)
  workload = ts.TinyWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  evals = []
  for step in range(ts.NUM_STEPS):
    if step == RESTORE_AFTER + 1:
      checkpoint_utils.save_checkpoint(
          "jax", opt_state, params, model_state, {"accumulated_submission_time": 1.0},
          [(s, {"loss": 0.0}) for s in ts.EVAL_AT[:3]], step, 0, str(tmp_path), False)
      sub = ts.build(api, algorithm, devices)
      workload = ts.TinyWorkload(api, devices)
      fresh_params, fresh_model_state = workload.init_model_fn(1)
      fresh = sub.init_optimizer_state(workload, fresh_params, fresh_model_state, hp, None)
      opt_state, params, model_state, _, _, restored_step, preemptions = (
          checkpoint_utils.maybe_restore_checkpoint(
              "jax", fresh, fresh_params, fresh_model_state, {}, [], 0, 0, str(tmp_path)))
      assert (restored_step, preemptions) == (step, 1)
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp,
        ts.place_batch(api, devices, ts.make_batch(step)), None, opt_state, [], step,
        jax.random.PRNGKey(step))
    for x, y in zip(ts.leaves(ts.host(api, (params, model_state))),
                    ts.leaves(want["live"][step])):
      np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    if step in ts.EVAL_AT:
      opt_state, params, model_state = sub.prepare_for_eval(
          workload, params, None, model_state, hp, None, opt_state, [], step, None)
      evals.append(ts.host(api, (params, model_state)))
  assert_same_run(dict(want, evals=evals, state=ts.host(api, opt_state[0])), want)

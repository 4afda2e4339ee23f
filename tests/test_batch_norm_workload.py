"""The embedded batch-norm workload `teacher_student_bn`, against NumPy references.

The reference forward pass is written out below in float64: ``Dense -> normalise ->
scale, shift -> ReLU`` per hidden layer with the batch's moments (training) or the
running ones (eval), and the momentum update of the running statistics.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

pytest.importorskip("flax")

from weight_averaging import runner, workloads  # noqa: E402
from weight_averaging.studies import configs, workload_facts  # noqa: E402
from weight_averaging.workloads import bn_mlp  # noqa: E402
from weight_averaging.workloads import teacher_student as ts  # noqa: E402
from weight_averaging.workloads import teacher_student_bn as tsb  # noqa: E402

NAME = "teacher_student_bn"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, EVAL = ts.ForwardPassMode.TRAIN, ts.ForwardPassMode.EVAL


def numpy_forward(params, batch_stats, x, train):
  """Logits and the new running statistics, in float64."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), batch_stats)
  h, new_stats = np.asarray(x, np.float64), {}
  for i in range(len(tsb.HIDDEN)):
    h = h @ p[f"dense_{i}"]["kernel"]
    bn, old = p[f"batch_norm_{i}"], stats[f"batch_norm_{i}"]
    if train:
      mean, var = h.mean(0), h.var(0)   # the biased variance
      m = bn_mlp.BN_MOMENTUM
      new_stats[f"batch_norm_{i}"] = {"mean": m * old["mean"] + (1 - m) * mean,
                                      "var": m * old["var"] + (1 - m) * var}
    else:
      mean, var = old["mean"], old["var"]
    h = (h - mean) / np.sqrt(var + bn_mlp.BN_EPSILON) * bn["scale"] + bn["bias"]
    h = np.maximum(h, 0.0)
  return h @ p["output"]["kernel"] + p["output"]["bias"], new_stats


def unreplicated(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[0], tree)


def random_statistics(batch_stats, seed=0):
  """Running statistics far from the initial (0, 1), so that using them shows."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: (rng.uniform(0.5, 3.0, np.shape(a)) if np.all(np.asarray(a) == 1)
                 else rng.normal(0, 3.0, np.shape(a))).astype(np.float32), batch_stats)


@pytest.mark.parametrize("api", ["jit", "pmap"])
def test_model_state_is_flax_batch_stats(api):
  workload = workloads.get_workload(NAME, api=api)
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
  lead = (jax.local_device_count(),) if api == "pmap" else ()
  assert list(model_state) == ["batch_stats"]
  assert (bn_mlp.BN_MOMENTUM, bn_mlp.BN_EPSILON) == (0.9, 1e-5)   # AlgoPerf ResNet's
  layers = [f"batch_norm_{i}" for i in range(len(tsb.HIDDEN))]
  assert sorted(model_state["batch_stats"]) == layers
  for layer, width in zip(layers, tsb.HIDDEN):
    stats = model_state["batch_stats"][layer]
    assert sorted(stats) == ["mean", "var"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(lead + (width,)))
    np.testing.assert_array_equal(stats["var"], np.ones(lead + (width,)))
  shapes = jax.tree_util.tree_map(lambda s: s.shape_tuple, workload.param_shapes,
                                  is_leaf=lambda s: isinstance(s, ts.ShapeTuple))
  assert jax.tree_util.tree_map(lambda a: tuple(a.shape), params) == \
      jax.tree_util.tree_map(lambda s: lead + s, shapes, is_leaf=lambda s: isinstance(s, tuple))
  assert shapes["dense_0"]["kernel"] == (ts.INPUT_DIM, tsb.HIDDEN[0])
  assert shapes["output"]["kernel"] == (tsb.HIDDEN[-1], ts.NUM_CLASSES)
  # One parameter type per parameter, and the output layer is recognised.
  types = workload.model_params_types
  assert jax.tree_util.tree_structure(types) == \
      jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda _: 0, shapes,
                                   is_leaf=lambda s: isinstance(s, tuple)))
  assert types["batch_norm_0"]["scale"] == ts.ParameterType.BATCH_NORM_SCALE
  assert workload.is_output_params(("output", "kernel"))
  assert not workload.is_output_params(("dense_0", "kernel"))


def test_eval_uses_running_statistics_whatever_the_batch():
  workload = workloads.get_workload(NAME, api="jit")
  params, model_state = jax.device_get(workload.init_model_fn(jax.random.PRNGKey(1)))
  model_state = {"batch_stats": random_statistics(model_state["batch_stats"])}
  x = tsb.split_data("validation")[0][:48]
  apply = jax.jit(lambda p, s, x: workload.model_fn(p, {"inputs": x}, s, EVAL, None, False))
  logits, same_state = apply(params, model_state, x)
  assert same_state is model_state or jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: np.array_equal(a, b), same_state, model_state))
  expected, _ = numpy_forward(params, model_state["batch_stats"], x, train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  # An example's logits do not depend on the rest of its batch.
  for part in (x[:1], x[7:8], x[::-1], x[10:30]):
    alone, _ = apply(params, model_state, part)
    ref, _ = numpy_forward(params, model_state["batch_stats"], part, train=False)
    np.testing.assert_allclose(alone, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(apply(params, model_state, x[::-1])[0], logits[::-1],
                             rtol=1e-5, atol=1e-5)
  # eval_model reads the same statistics: other statistics, another loss.
  base = workload.eval_model(4096, params, model_state, None)
  fresh = workload.eval_model(4096, params, workload.init_model_fn(
      jax.random.PRNGKey(1))[1], None)
  assert base["validation/loss"] != pytest.approx(fresh["validation/loss"], abs=1e-3)


def test_a_jit_train_step_moves_the_statistics_by_the_global_batch():
  workload = workloads.get_workload(NAME, api="jit")
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(2))
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  x = tsb.split_data("train")[0][:64]
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
  step = jax.jit(lambda p, s, x: workload.model_fn(p, {"inputs": x}, s, TRAIN, None, True))
  old_stats = random_statistics(jax.device_get(model_state["batch_stats"]))
  logits, new_state = step(params, {"batch_stats": old_stats}, sharded)
  host_params = jax.device_get(params)
  expected_logits, expected = numpy_forward(host_params, old_stats, x, True)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-3, atol=1e-3)
  assert list(new_state) == ["batch_stats"]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                         jax.device_get(new_state["batch_stats"]), expected)
  # Without update_batch_norm: the running statistics, and the state unchanged.
  logits, same = jax.jit(lambda p, s, x: workload.model_fn(
      p, {"inputs": x}, s, TRAIN, None, False))(params, model_state, sharded)
  np.testing.assert_allclose(logits, numpy_forward(
      host_params, jax.device_get(model_state["batch_stats"]), x, False)[0],
      rtol=1e-4, atol=1e-4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(same),
                         jax.device_get(model_state))


def test_pmap_devices_share_the_global_batch_statistics():
  workload = workloads.get_workload(NAME, api="pmap")
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(3))
  n = jax.local_device_count()
  assert n > 1, "conftest simulates several devices"
  x = tsb.split_data("train")[0][:16 * n]
  step = jax.pmap(lambda p, s, x: workload.model_fn(p, {"inputs": x}, s, TRAIN, None, True),
                  axis_name=tsb.PMAP_AXIS)
  logits, new_state = step(params, model_state, x.reshape(n, 16, -1))
  expected_logits, expected = numpy_forward(
      unreplicated(params), unreplicated(model_state["batch_stats"]), x, True)
  np.testing.assert_allclose(np.asarray(logits).reshape(16 * n, -1), expected_logits,
                             rtol=1e-3, atol=1e-3)
  for d in range(n):   # every replica holds the global batch's statistics
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a)[d], b, rtol=1e-4, atol=1e-4),
        new_state["batch_stats"], expected)


def test_data_are_deterministic_and_on_their_own_scale():
  inputs, targets = tsb.split_data("train")
  tsb.split_data.cache_clear()
  tsb.input_transform.cache_clear()
  again, again_targets = tsb.split_data("train")
  np.testing.assert_array_equal(inputs, again)
  np.testing.assert_array_equal(targets, again_targets)
  z, labels = ts.split_data("train")
  scale, shift = tsb.input_transform()
  np.testing.assert_array_equal(targets, labels)
  np.testing.assert_allclose(inputs, z * scale + shift, rtol=1e-6, atol=1e-5)
  assert scale.min() >= 0.1 and scale.max() <= 10 and scale.max() / scale.min() > 10
  np.testing.assert_allclose(inputs.mean(0), shift, atol=0.1)
  assert np.abs(shift).max() > 5   # shifted well away from zero
  for split in ("validation", "test"):
    assert not np.array_equal(tsb.split_data(split)[0][:10], inputs[:10])
  workload = workloads.get_workload(NAME, api="jit")
  # The batches come from these inputs, the same for the same key.
  first = [next(workload.input_queue(jax.random.PRNGKey(5), 32)) for _ in range(2)]
  np.testing.assert_array_equal(first[0]["inputs"], first[1]["inputs"])
  rows = [np.flatnonzero((inputs == row).all(1)) for row in np.asarray(first[0]["inputs"])]
  assert all(len(r) == 1 for r in rows)
  np.testing.assert_array_equal(first[0]["targets"], targets[np.concatenate(rows)])


@pytest.mark.parametrize("api", ["jit", "pmap"])
def test_a_few_nadamw_steps_reduce_the_loss(tmp_path, api):
  [result] = runner.run_experiment(
      workload_name=NAME, api=api,
      submission_path=os.path.join(REPO, "submissions", api, "nadamw", "submission.py"),
      tuning_search_space=os.path.join(REPO, "tuning_search_spaces", "embedded",
                                       "nadamw.json"),
      experiment_dir=str(tmp_path), experiment_name="bn", rng_seed=1, max_global_steps=60,
      eval_every_steps=20, save_checkpoints=False)
  losses = [row["validation/loss"] for row in result.eval_results]
  assert [row["global_step"] for row in result.eval_results] == [20, 40, 60]
  assert losses[0] < np.log(ts.NUM_CLASSES) and losses[-1] < losses[0] - 0.1, losses


def test_dropout_is_refused_by_name():
  workload = workloads.get_workload(NAME, api="jit")
  with pytest.raises(ValueError, match="dropout_rate=0.1.*no dropout"):
    workload.init_model_fn(jax.random.PRNGKey(0), dropout_rate=0.1)
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(0), dropout_rate=0.0)
  with pytest.raises(ValueError, match="dropout_rate"):
    workload.model_fn(params, {"inputs": jnp.zeros((2, ts.INPUT_DIM))}, model_state, EVAL,
                      None, False, dropout_rate=0.2)


def test_without_flax_the_error_names_the_remedy(monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "weight_averaging.workloads.bn_mlp", None)
  workload = tsb.TeacherStudentBNWorkload()
  assert workload.step_hint == 2000   # the class and its facts need no flax
  with pytest.raises(ImportError, match="pip install flax"):
    workload.init_model_fn(jax.random.PRNGKey(0))


def test_registered_with_its_facts_and_study_config():
  assert workloads.WORKLOADS[NAME] is tsb.TeacherStudentBNWorkload
  facts = workload_facts.facts(NAME)
  assert (facts.metric, facts.validation_target, facts.test_target, facts.minimize,
          facts.strict, facts.step_hint) == ("loss", 1.453, 1.440, True, True, 2000)
  config = configs.load(NAME)
  assert config.runner == "embedded" and config.target.validation == 1.453
  assert config.optimizers["nadamw"].hyperparameters == configs.official_points(
      config, "nadamw")[0]

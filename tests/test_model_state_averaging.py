"""``averaging_model_state``: the batch-norm statistics evaluated live or averaged.

A tiny flax.linen model with ``nn.BatchNorm`` (``model_state`` is flax's
``batch_stats`` collection, as on AlgoPerf's ResNet, Conformer and DeepSpeech) runs
through the builder in the runner's loop: evals at some steps, training on from
what ``prepare_for_eval`` returned. The references are independent: the model
states the run produced, recorded after every step, averaged in NumPy (float64) at
the sampling steps, and the same run with the option absent.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weight_averaging import algoperf_api

nn = pytest.importorskip("flax.linen")
jax_utils = pytest.importorskip("flax.jax_utils")

APIS = ("jit", "pmap")
AVERAGED = ("nadamw_ema", "nadamw_lawa")
BASE = dict(learning_rate=0.05, one_minus_beta1=0.1, beta2=0.99, weight_decay=0.0,
            warmup_factor=0.1, label_smoothing=0.0, dropout_rate=0.0)
AVERAGING = dict(averaging_every=2, averaging_start_step=1, ema_beta=0.6, lawa_k=3)
STEP_HINT, NUM_STEPS, GLOBAL_BATCH, NUM_DEVICES = 20, 11, 8, 2
EVAL_AT = (0, 4, 5, 8, 10)


def hparams(algorithm, **overrides):
  values = dict(BASE, **(AVERAGING if algorithm in AVERAGED else {}), **overrides)
  values = {k: v for k, v in values.items() if v is not None}
  return collections.namedtuple("Hyperparameters", sorted(values))(**values)


class Net(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense; under pmap the statistics are the global batch's."""

  axis_name: object = None

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     axis_name=self.axis_name)(x)
    return nn.Dense(3)(nn.relu(x))


class BatchNormWorkload:
  """The AlgoPerf Workload members the builder uses; ``model_state`` = ``batch_stats``.

  with_counter: the model state also holds an int32 count of training calls (an
  integer leaf, which averaging must pass through live).
  """

  step_hint = STEP_HINT
  metrics_logger = None

  def __init__(self, api, devices, with_counter=False):
    self.api, self.devices, self.with_counter = api, devices, with_counter
    self.net = Net(axis_name="batch" if api == "pmap" else None)

  def init_model_fn(self, seed):
    variables = self.net.init(jax.random.PRNGKey(seed), jnp.zeros((2, 5)), train=False)
    model_state = {"batch_stats": variables["batch_stats"]}
    if self.with_counter:
      model_state["calls"] = jnp.zeros([], jnp.int32)
    return place(self.api, self.devices, variables["params"]), place(
        self.api, self.devices, model_state)

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm):
    del mode, rng
    stats = {"batch_stats": model_state["batch_stats"]}
    if not update_batch_norm:
      return self.net.apply({"params": params, **stats}, batch["inputs"], train=False), (
          model_state)
    logits, new = self.net.apply({"params": params, **stats}, batch["inputs"], train=True,
                                 mutable=["batch_stats"])
    new = dict(new)
    if self.with_counter:
      new["calls"] = model_state["calls"] + 1
    return logits, new

  def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
    del label_smoothing
    per_example = -jnp.sum(jax.nn.one_hot(label_batch, 3)
                           * jax.nn.log_softmax(logits_batch), axis=-1)
    mask = jnp.ones_like(per_example) if mask_batch is None else mask_batch
    return {"summed": jnp.sum(per_example * mask), "n_valid_examples": jnp.sum(mask)}


def place(api, devices, tree):
  if api == "pmap":
    return jax_utils.replicate(tree, devices)  # what AlgoPerf's pmap workloads do
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def make_batch(api, devices, step):
  rng = np.random.default_rng(500 + step)
  # Inputs far from zero mean and unit scale: the statistics move over the run.
  batch = {"inputs": (3.0 + 2.0 * rng.normal(size=(GLOBAL_BATCH, 5))).astype(np.float32),
           "targets": rng.integers(0, 3, size=GLOBAL_BATCH).astype(np.int32)}
  if api == "pmap":
    n = len(devices)
    return jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  return jax.device_put(batch, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch")))


def host(api, tree):
  if api == "pmap":
    return jax.tree_util.tree_map(lambda x: np.array(x[0]), tree)
  return jax.tree_util.tree_map(np.array, tree)


def build(api, algorithm, devices):
  make_averager = {"nadamw_ema": algoperf_api.ema_from_hyperparameters,
                   "nadamw_lawa": algoperf_api.lawa_from_hyperparameters}.get(algorithm)
  return algoperf_api.build_submission(algoperf_api.nadamw_from_hyperparameters,
                                       make_averager, api=api, devices=devices)


def run(api, algorithm, hp, workload_cls=BatchNormWorkload, **workload_kw):
  """The runner's loop; the live and the evaluated params and model states."""
  devices = jax.devices()[:NUM_DEVICES]
  sub = build(api, algorithm, devices)
  workload = workload_cls(api, devices, **workload_kw)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  out = collections.defaultdict(list)
  for step in range(NUM_STEPS):
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp, make_batch(api, devices, step), None,
        opt_state, [], step, jax.random.PRNGKey(step))
    out["live"].append(host(api, (params, model_state)))
    if step in EVAL_AT:
      opt_state, params, model_state = sub.prepare_for_eval(
          workload, params, None, model_state, hp, None, opt_state, [], step, None)
      out["evals"].append(host(api, (params, model_state)))
  out["state"] = opt_state[0]
  return out


def brute_force(algorithm, trees, upto):
  """EMA or LAWA (float64) of `trees` sampled at the averaging steps up to `upto`."""
  every, start = AVERAGING["averaging_every"], AVERAGING["averaging_start_step"]
  sampled = [[np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(trees[t])]
             for t in range(upto + 1) if t >= start and t % every == 0]
  if not sampled:
    return jax.tree_util.tree_leaves(trees[upto])
  if algorithm == "nadamw_lawa":
    window = sampled[-AVERAGING["lawa_k"]:]
    return [np.mean(xs, axis=0) for xs in zip(*window)]
  beta, avg = AVERAGING["ema_beta"], sampled[0]
  for s in sampled[1:]:
    avg = [beta * a + (1 - beta) * x for a, x in zip(avg, s)]
  return avg


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@functools.lru_cache(maxsize=None)
def cached(api, algorithm, mode):
  overrides = {} if mode is None else {"averaging_model_state": mode}
  return run(api, algorithm, hparams(algorithm, **overrides))


@pytest.mark.parametrize("algorithm", AVERAGED)
@pytest.mark.parametrize("api", APIS)
def test_average_is_the_mean_of_the_sampled_model_states(api, algorithm):
  got = cached(api, algorithm, "average")
  live_states = [m for _, m in got["live"]]
  for step, (params, model_state) in zip(EVAL_AT, got["evals"]):
    want = brute_force(algorithm, live_states, step)
    for a, b in zip(jax.tree_util.tree_leaves(model_state), want):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=f"eval {step}")
    want = brute_force(algorithm, [p for p, _ in got["live"]], step)
    for a, b in zip(jax.tree_util.tree_leaves(params), want):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=f"eval {step}")
  # The averaged statistics differ from the live ones: the option changes the eval.
  assert not np.allclose(jax.tree_util.tree_leaves(got["evals"][-1][1])[0],
                         jax.tree_util.tree_leaves(got["live"][EVAL_AT[-1]][1])[0])


@pytest.mark.parametrize("algorithm", AVERAGED)
@pytest.mark.parametrize("api", APIS)
def test_averaging_the_model_state_never_changes_training(api, algorithm):
  """After every eval the run trains on from the live params *and* statistics."""
  averaged, live = cached(api, algorithm, "average"), cached(api, algorithm, "live")
  for a, b in zip(averaged["live"], live["live"]):
    assert_trees_equal(a, b)


@pytest.mark.parametrize("algorithm", AVERAGED)
@pytest.mark.parametrize("api", APIS)
def test_live_is_the_default_and_unchanged(api, algorithm):
  """'live' and the option absent: the same run, state and evals, bit for bit."""
  absent, live = cached(api, algorithm, None), cached(api, algorithm, "live")
  for key in ("live", "evals"):
    for a, b in zip(absent[key], live[key]):
      assert_trees_equal(a, b)
  assert_trees_equal(host(api, absent["state"]), host(api, live["state"]))
  # The eval's model state is the live one, and the averager holds the params alone.
  for step, (_, model_state) in zip(EVAL_AT, live["evals"]):
    assert_trees_equal(model_state, live["live"][step][1])
  params = live["live"][0][0]
  assert (jax.tree_util.tree_structure(live["state"].stash)
          == jax.tree_util.tree_structure(params))
  make = {"nadamw_ema": algoperf_api.ema_from_hyperparameters,
          "nadamw_lawa": algoperf_api.lawa_from_hyperparameters}[algorithm]
  averager = make(hparams(algorithm), algoperf_api.averaging_config(hparams(algorithm)),
                  algoperf_api.resolve_placement("replicated", "jit"))
  assert (jax.tree_util.tree_structure(live["state"].averager)
          == jax.tree_util.tree_structure(averager.init(params)))


class PlainNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))


class StatelessWorkload(BatchNormWorkload):
  """No batch norm: ``model_state`` is `empty` (None or {}), as most workloads have."""

  def __init__(self, api, devices, empty=None):
    super().__init__(api, devices)
    self.empty, self.net = empty, PlainNet()

  def init_model_fn(self, seed):
    params = self.net.init(jax.random.PRNGKey(seed), jnp.zeros((2, 5)), train=False)
    return place(self.api, self.devices, params["params"]), self.empty

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm):
    assert model_state is None if self.empty is None else model_state == {}
    return self.net.apply({"params": params}, batch["inputs"], train=True), model_state


@pytest.mark.parametrize("empty", [None, {}], ids=["none", "empty_dict"])
@pytest.mark.parametrize("api", APIS)
def test_no_model_state_to_average(api, empty):
  got = run(api, "nadamw_lawa", hparams("nadamw_lawa", averaging_model_state="average"),
            StatelessWorkload, empty=empty)
  assert all(m == empty for _, m in got["evals"])
  want = brute_force("nadamw_lawa", [p for p, _ in got["live"]], EVAL_AT[-1])
  for a, b in zip(jax.tree_util.tree_leaves(got["evals"][-1][0]), want):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("api", APIS)
def test_integer_model_state_leaves_pass_through_live(api):
  got = run(api, "nadamw_ema", hparams("nadamw_ema", averaging_model_state="average"),
            with_counter=True)
  for step, (_, model_state) in zip(EVAL_AT, got["evals"]):
    assert model_state["calls"].dtype == np.int32
    assert int(model_state["calls"]) == step + 1  # live, not a mean of counts
  assert [int(m["calls"]) for _, m in got["live"]] == list(range(1, NUM_STEPS + 1))


@pytest.mark.parametrize("value", ["averaged", "Live", 1, True])
def test_a_bad_value_names_the_hyperparameter(value):
  devices = jax.devices()[:1]
  workload = BatchNormWorkload("jit", devices)
  params, model_state = workload.init_model_fn(0)
  with pytest.raises(ValueError, match=re.escape(
      f"hyperparameter 'averaging_model_state' must be one of ('live', 'average'), "
      f"got {value!r}")):
    build("jit", "nadamw_ema", devices).init_optimizer_state(
        workload, params, model_state,
        hparams("nadamw_ema", averaging_model_state=value), None)

"""The twelve submissions (NadamW, Shampoo; plain, EMA, LAWA; jit, pmap) in a runner loop.

The loop does what `submission_runner.py` does with a submission: init, then per
step `data_selection` and `update_params`; at eval steps `prepare_for_eval`, an eval
of the params it returns, and training continues *from those params*; checkpoints
are saved and restored with each API's convention (jit: arrays as they are; pmap:
``x[0]`` of every leaf on save, replicated again on restore).
"""

import collections
import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging import algoperf_api
from weight_averaging import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APIS = ("jit", "pmap")
ALGORITHMS = ("nadamw", "nadamw_ema", "nadamw_lawa")
SHAMPOO_ALGORITHMS = ("shampoo", "shampoo_ema", "shampoo_lawa")
ALL_ALGORITHMS = ALGORITHMS + SHAMPOO_ALGORITHMS
AVERAGED = tuple(a for a in ALL_ALGORITHMS if a.endswith(("_ema", "_lawa")))
DEVICE_COUNTS = (1, 4)

BASE = dict(learning_rate=0.02, one_minus_beta1=0.1, beta2=0.99, weight_decay=0.1,
            warmup_factor=0.1, label_smoothing=0.1, dropout_rate=0.0)
# Small nu, k and a start step so that a 13-step run samples, wraps the LAWA ring
# and has evals before and after the first sample.
AVERAGING = dict(averaging_every=2, averaging_start_step=1, ema_beta=0.6, lawa_k=3)
# Meta's recipe with roots every 2 steps from step 3, so that a 13-step run
# preconditions, reuses stale roots and recomputes them. The tiny params merge
# into vectors of 35 and 21 entries whose statistics gain one rank per step: with
# the recipe's ridge of 1e-8 their roots would scale float32 rounding of the
# gradient 10^4-fold, so the comparisons below use a ridge of 1e-3.
SHAMPOO = dict(shampoo_preset="meta", preconditioning_every=2, matrix_epsilon=1e-3,
               start_preconditioning_step=3, momentum=0.5)
STEP_HINT = 20
NUM_STEPS = 13
EVAL_AT = (0, 4, 5, 9, 12)  # step 0 is always eligible in the runner
GLOBAL_BATCH = 8

SHAPES = {"hidden": {"kernel": (5, 7), "bias": (7,)},
          "out": {"kernel": (7, 3), "bias": (3,)}}


def base_optimizer(algorithm):
  return algorithm.split("_")[0]


def hparams(algorithm, **overrides):
  values = dict(BASE)
  if base_optimizer(algorithm) == "shampoo":
    values.update(SHAMPOO)
  if algorithm in AVERAGED:
    values.update(AVERAGING)
  values.update(overrides)
  values = {k: v for k, v in values.items() if v is not None}
  # The runner hands a namedtuple (halton.generate_search).
  return collections.namedtuple("Hyperparameters", sorted(values))(**values)


def load(api, algorithm):
  return importlib.import_module(f"submissions.{api}.{algorithm}.submission")


# ----------------------------------------------------------------------------
# A tiny workload with the AlgoPerf Workload members the submissions use.


class ShapeTuple:
  def __init__(self, shape):
    self.shape_tuple = tuple(shape)


def _mlp(params, x):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def _loss(labels, logits, mask, label_smoothing):
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(labels, num_classes)
  target = one_hot * (1 - label_smoothing) + label_smoothing / num_classes
  per_example = -jnp.sum(target * jax.nn.log_softmax(logits), axis=-1)
  mask = jnp.ones_like(per_example) if mask is None else mask
  per_example = per_example * mask
  return {"summed": jnp.sum(per_example), "n_valid_examples": jnp.sum(mask),
          "per_example": per_example}


class TinyWorkload:
  """An MLP classifier; a call counter stands in for batch-norm statistics."""

  step_hint = STEP_HINT
  metrics_logger = None

  def __init__(self, api, devices):
    self.api, self.devices = api, devices
    self.param_shapes = jax.tree_util.tree_map(
        ShapeTuple, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    self.model_params_types = jax.tree_util.tree_map(
        lambda _: "weight", SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    self.dropout_rates = []

  def init_model_fn(self, seed):
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: (rng.normal(size=s) / math.sqrt(s[0])).astype(np.float32), SHAPES,
        is_leaf=lambda x: isinstance(x, tuple))
    model_state = {"calls": np.zeros([], np.float32)}
    return place(self.api, self.devices, params), place(self.api, self.devices,
                                                        model_state)

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm,
               dropout_rate):
    del mode, rng
    self.dropout_rates.append(dropout_rate)
    new_state = {"calls": model_state["calls"] + 1} if update_batch_norm else model_state
    return _mlp(params, batch["inputs"]), new_state

  def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
    return _loss(label_batch, logits_batch, mask_batch, label_smoothing)


def make_batch(step):
  rng = np.random.default_rng(1000 + step)
  weights = np.ones(GLOBAL_BATCH, np.float32)
  weights[step % GLOBAL_BATCH] = 0.0  # a padded example, as in ogbg
  return {"inputs": rng.normal(size=(GLOBAL_BATCH, 5)).astype(np.float32),
          "targets": rng.integers(0, 3, size=GLOBAL_BATCH).astype(np.int32),
          "weights": weights}


def replicate(tree, devices):
  """pmap layout: a leading device axis (what `flax.jax_utils.replicate` does)."""
  n = len(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put_sharded([np.asarray(x)] * n, devices)
      if hasattr(jax, "device_put_sharded") else np.broadcast_to(
          np.asarray(x), (n,) + np.shape(x)).copy(), tree)


def place(api, devices, tree):
  if api == "pmap":
    return replicate(tree, devices)
  mesh = Mesh(np.asarray(devices), ("batch",))
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def place_batch(api, devices, batch):
  if api == "pmap":
    n = len(devices)
    return jax.tree_util.tree_map(
        lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
  mesh = Mesh(np.asarray(devices), ("batch",))
  return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch")))


def host(api, tree):
  """The runner-visible value of a tree, on the host (device 0's copy under pmap)."""
  if api == "pmap":
    return jax.tree_util.tree_map(lambda x: np.array(x[0]), tree)
  return jax.tree_util.tree_map(np.array, tree)


def save_restore(api, devices, tree):
  """The runner's checkpoint round trip for `api` (flax serialises host arrays)."""
  if api == "pmap":
    saved = jax.tree_util.tree_map(lambda x: np.array(np.asarray(x)[0]), tree)
    return replicate(saved, devices)
  return jax.tree_util.tree_map(np.array, tree)


def buffer_pointers(tree):
  pointers = set()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      for shard in leaf.addressable_shards:
        pointers.add(shard.data.unsafe_buffer_pointer())
  return pointers


def build(api, algorithm, devices):
  """The submission's builder call, on `devices` (the files use every device)."""
  make_averager = (algoperf_api.ema_from_hyperparameters if algorithm.endswith("_ema")
                   else algoperf_api.lawa_from_hyperparameters
                   if algorithm.endswith("_lawa") else None)
  make_optimizer = {"nadamw": algoperf_api.nadamw_from_hyperparameters,
                    "shampoo": algoperf_api.shampoo_from_hyperparameters}[
                        base_optimizer(algorithm)]
  return algoperf_api.build_submission(make_optimizer, make_averager, api=api,
                                       devices=devices)


def run(api, algorithm, num_devices, hp=None, checkpoint_after=None,
        double_prepare=True, self_tuning=False):
  """The runner loop; returns the live trajectory, the evals and the final state.

  self_tuning: the runner hands ``hyperparameters=None`` (`hp` is ignored).

  checkpoint_after: after the eval at this step the run is saved, everything is
  dropped, and it resumes from the checkpoint with a freshly initialised submission
  (as `maybe_restore_checkpoint` does).
  """
  devices = jax.devices()[:num_devices]
  sub = build(api, algorithm, devices)
  hp = None if self_tuning else (hp or hparams(algorithm))
  workload = TinyWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp,
                                       jax.random.PRNGKey(0))
  live, evals, model_states = [], [], []
  queue = iter([place_batch(api, devices, make_batch(s)) for s in range(NUM_STEPS)])
  for step in range(NUM_STEPS):
    rng = jax.random.PRNGKey(step)
    batch = sub.data_selection(workload, queue, opt_state, params, model_state, hp,
                               step, rng)
    opt_state, params, model_state = sub.update_params(
        workload, params, workload.model_params_types, model_state, hp, batch,
        "softmax_cross_entropy", opt_state, [], step, rng, train_state={})
    live.append(host(api, params))
    model_states.append(host(api, model_state))
    if step not in EVAL_AT:
      continue
    for _ in range(2 if double_prepare and step % 2 else 1):
      old_state = opt_state[0]  # kept alive, so its buffers cannot be reused
      opt_state, params, model_state = sub.prepare_for_eval(
          workload, params, workload.model_params_types, model_state, hp,
          "softmax_cross_entropy", opt_state, [], step, rng)
      if algorithm in AVERAGED:
        # Fresh buffers: the next update_params donates them with the state.
        assert not buffer_pointers(params) & buffer_pointers(opt_state[0])
        assert not buffer_pointers(params) & buffer_pointers(old_state)
      del old_state
    evals.append((step, host(api, params)))
    # The runner evaluates what prepare_for_eval returned (and trains on from it).
    x = jnp.asarray(make_batch(99)["inputs"])
    assert np.isfinite(np.asarray(_mlp(host(api, params), x))).all()
    if step == checkpoint_after:
      saved = (save_restore(api, devices, opt_state[0]),
               save_restore(api, devices, params),
               save_restore(api, devices, model_state))
      del opt_state, params, model_state
      sub = build(api, algorithm, devices)
      workload = TinyWorkload(api, devices)
      fresh_params, fresh_model_state = workload.init_model_fn(1)
      fresh = sub.init_optimizer_state(workload, fresh_params, fresh_model_state, hp,
                                       jax.random.PRNGKey(0))
      opt_state = (saved[0], fresh[1])  # the runner re-attaches update_fn
      params, model_state = saved[1], saved[2]
  return dict(live=live, evals=evals, state=host(api, opt_state[0]),
              model_states=model_states, workload=workload)


_CACHE = {}


def cached_run(api, algorithm, num_devices):
  key = (api, algorithm, num_devices)
  if key not in _CACHE:
    _CACHE[key] = run(api, algorithm, num_devices)
  return _CACHE[key]


# ----------------------------------------------------------------------------
# Independent references.


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def reference_nadamw_trajectory(num_devices):
  """Plain NadamW in NumPy (float64 moments) on gradients from an independent loss."""
  hp = BASE
  b1, b2, eps = 1 - hp["one_minus_beta1"], hp["beta2"], 1e-8
  lr, wd, warm = hp["learning_rate"], hp["weight_decay"], hp["warmup_factor"]
  del num_devices
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s) / math.sqrt(s[0])).astype(np.float32), SHAPES,
      is_leaf=lambda x: isinstance(x, tuple))

  def mean_loss(p, batch):
    out = _loss(batch["targets"], _mlp(p, batch["inputs"]), batch["weights"],
                hp["label_smoothing"])
    return out["summed"] / out["n_valid_examples"]

  grad_fn = jax.jit(jax.grad(mean_loss))
  flat, treedef = jax.tree_util.tree_flatten(params)
  mu = [np.zeros(x.shape) for x in flat]
  nu = [np.zeros(x.shape) for x in flat]
  warmup = int(warm * STEP_HINT)
  trajectory = []
  for t in range(NUM_STEPS):
    grads = leaves(grad_fn(treedef.unflatten(flat), make_batch(t)))
    if t < warmup:
      eta = lr * t / warmup
    else:
      decay = max(STEP_HINT - warmup, 1)
      eta = lr * 0.5 * (1 + math.cos(math.pi * min(t - warmup, decay) / decay))
    new = []
    for i, (p, g) in enumerate(zip(flat, grads)):
      g = g.astype(np.float64)
      mu[i] = b1 * mu[i] + (1 - b1) * g
      nu[i] = b2 * nu[i] + (1 - b2) * g * g
      m_hat = (b1 * mu[i] + (1 - b1) * g) / (1 - b1 ** (t + 1))
      v_hat = nu[i] / (1 - b2 ** (t + 1))
      step = m_hat / (np.sqrt(v_hat) + eps) + wd * p
      new.append((p - eta * step).astype(np.float32))
    flat = new
    trajectory.append(treedef.unflatten(flat))
  return trajectory


def brute_force_average(algorithm, live, upto):
  """The average after step `upto` of the live trajectory, from scratch (float64)."""
  every, start = AVERAGING["averaging_every"], AVERAGING["averaging_start_step"]
  sampled = [leaves(live[t]) for t in range(upto + 1) if t >= start and t % every == 0]
  if not sampled:
    return leaves(live[upto])  # nothing sampled yet: the live params
  if algorithm.endswith("_lawa"):
    window = sampled[-AVERAGING["lawa_k"]:]
    return [np.mean([s[i].astype(np.float64) for s in window], axis=0)
            for i in range(len(window[0]))]
  beta = AVERAGING["ema_beta"]
  avg = [x.astype(np.float64) for x in sampled[0]]
  for s in sampled[1:]:
    avg = [beta * a + (1 - beta) * x for a, x in zip(avg, s)]
  return avg


# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
@pytest.mark.parametrize("api", APIS)
def test_plain_nadamw_matches_numpy_reference(api, num_devices):
  got = cached_run(api, "nadamw", num_devices)
  want = reference_nadamw_trajectory(num_devices)
  for t, (g, w) in enumerate(zip(got["live"], want)):
    for a, b in zip(leaves(g), leaves(w)):
      # float32 training vs float64 moments; with 4 devices the gradient sum is
      # also reduced in another order.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"step {t}")
  # The plain submission's prepare_for_eval is the identity.
  for step, params in got["evals"]:
    for a, b in zip(leaves(params), leaves(got["live"][step])):
      np.testing.assert_array_equal(a, b)


# Shampoo runs with 4 devices only here; its 1-device run is compared with the
# 4-device ones in test_shampoo_runs_alike_on_one_device_jit_and_pmap.
@pytest.mark.parametrize("api,algorithm,num_devices", [
    (api, algorithm, n) for api in APIS for algorithm in AVERAGED for n in DEVICE_COUNTS
    if n == 4 or base_optimizer(algorithm) == "nadamw"])
def test_averaging_matches_brute_force_and_never_changes_training(api, algorithm,
                                                                  num_devices):
  got = cached_run(api, algorithm, num_devices)
  plain = cached_run(api, base_optimizer(algorithm), num_devices)
  # Averaging never changes training: the same program computes the params, and
  # the averager only reads them, so the trajectories agree bit for bit.
  for t, (a, b) in enumerate(zip(got["live"], plain["live"])):
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_array_equal(x, y, err_msg=f"step {t}")
  # Model state passes through live (never averaged, never reset by an eval).
  assert [float(m["calls"]) for m in got["model_states"]] == list(
      range(1, NUM_STEPS + 1))
  assert [s for s, _ in got["evals"]] == list(EVAL_AT)
  for step, params in got["evals"]:
    want = brute_force_average(algorithm, got["live"], step)
    for a, b in zip(leaves(params), want):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=f"eval {step}")
  assert int(np.asarray(got["state"].holding)) == 1  # the last call was an eval


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
@pytest.mark.parametrize("api", APIS)
def test_resume_equals_uninterrupted_run(api, algorithm):
  whole = cached_run(api, algorithm, 4)
  resumed = run(api, algorithm, 4, checkpoint_after=5)
  for a, b in zip(whole["live"], resumed["live"]):
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_array_equal(x, y)
  for (s1, a), (s2, b) in zip(whole["evals"], resumed["evals"]):
    assert s1 == s2
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(leaves(whole["state"]), leaves(resumed["state"])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("placement", ["sharded", "host"])
@pytest.mark.parametrize("algorithm", ALGORITHMS[1:])
def test_jit_placements_give_the_replicated_numbers(algorithm, placement):
  hp = hparams(algorithm, averaging_placement=placement)
  got = run("jit", algorithm, 4, hp=hp, checkpoint_after=4)
  want = cached_run("jit", algorithm, 4)
  for (_, a), (_, b) in zip(got["evals"], want["evals"]):
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  for a, b in zip(got["live"], want["live"]):
    for x, y in zip(leaves(a), leaves(b)):
      # The partitioned program of 'sharded' is fused differently, which moves the
      # live params by an ulp now and then: equal to float32 rounding only.
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["sharded", "host"])
def test_pmap_refuses_placements_its_checkpoints_cannot_keep(placement):
  devices = jax.devices()
  sub = build("pmap", "nadamw_lawa", devices)
  workload = TinyWorkload("pmap", devices)
  params, model_state = workload.init_model_fn(0)
  with pytest.raises(ValueError, match=f"'averaging_placement' = '{placement}'"):
    sub.init_optimizer_state(workload, params, model_state,
                             hparams("nadamw_lawa", averaging_placement=placement),
                             jax.random.PRNGKey(0))


def test_prepare_for_eval_after_restore_keeps_live_params():
  """A checkpoint written after an eval resumes into prepare_for_eval, not a step."""
  devices = jax.devices()
  for api in APIS:
    sub = build(api, "nadamw_ema", devices)
    workload = TinyWorkload(api, devices)
    params, model_state = workload.init_model_fn(0)
    hp = hparams("nadamw_ema", averaging_start_step=0, averaging_every=1)
    opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
    batch = place_batch(api, devices, make_batch(0))
    args = ("softmax_cross_entropy",)
    for step in range(3):
      opt_state, params, model_state = sub.update_params(
          workload, params, None, model_state, hp, batch, *args, opt_state, [], step,
          jax.random.PRNGKey(step))
    live = host(api, params)
    opt_state, averaged, model_state = sub.prepare_for_eval(
        workload, params, None, model_state, hp, *args, opt_state, [], 3, None)
    restored = (save_restore(api, devices, opt_state[0]),
                build(api, "nadamw_ema", devices).init_optimizer_state(
                    workload, params, model_state, hp, None)[1])
    opt_state, again, model_state = sub.prepare_for_eval(
        workload, save_restore(api, devices, averaged), None, model_state, hp, *args,
        restored, [], 3, None)
    for x, y in zip(leaves(host(api, again)), leaves(host(api, averaged))):
      np.testing.assert_array_equal(x, y)
    for x, y in zip(leaves(host(api, opt_state[0].stash)), leaves(live)):
      np.testing.assert_array_equal(x, y)
    assert not np.allclose(leaves(host(api, again))[0], leaves(live)[0])


def test_dropout_and_label_smoothing_reach_the_model_and_loss():
  got = cached_run("jit", "nadamw_ema", 4)
  assert set(got["workload"].dropout_rates) == {0.0}


def test_module_level_api():
  import inspect
  for api in APIS:
    for algorithm in ALL_ALGORITHMS:
      module = load(api, algorithm)
      for name in ("get_batch_size", "init_optimizer_state", "update_params",
                   "prepare_for_eval", "data_selection"):
        assert callable(getattr(module, name)), (api, algorithm, name)
      assert "train_state" in inspect.signature(module.update_params).parameters
      assert module.get_batch_size("ogbg") == 512
      assert module.get_batch_size("finewebedu_lm") == 64
      assert module.get_batch_size("cifar") == 16384
      with pytest.raises(ValueError):
        module.get_batch_size("ogbg_gelu")  # the runner then retries "ogbg"


BAD = [
    ("learning_rate", None), ("learning_rate", -1.0), ("learning_rate", "0.1"),
    ("one_minus_beta1", 0.0), ("one_minus_beta1", 1.5), ("beta2", 1.0),
    ("weight_decay", -0.1), ("warmup_factor", 1.5), ("label_smoothing", 1.0),
    ("dropout_rate", -0.1), ("grad_clip", 0.0), ("grad_clip", True),
    ("averaging_every", 0), ("averaging_every", 64.5), ("averaging_every", "64"),
    ("averaging_every", True), ("averaging_start_step", -1),
    ("averaging_placement", "gpu"), ("averaging_placement", 1),
    ("ema_beta", 1.0), ("ema_beta", -0.2), ("ema_beta", float("nan")),
    ("ema_beta", "0.9"), ("lawa_k", 0), ("lawa_k", 2.5),
]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_hyperparameters_name_themselves(name, value):
  algorithm = ("nadamw_ema" if name == "ema_beta" else
               "nadamw_lawa" if name == "lawa_k" else "nadamw_lawa")
  hp = hparams(algorithm, **{name: value}) if value is not None else hparams(
      algorithm, **{name: None})
  devices = jax.devices()
  sub = build("jit", algorithm, devices)
  workload = TinyWorkload("jit", devices)
  params, model_state = workload.init_model_fn(0)
  with pytest.raises(ValueError, match=name):
    sub.init_optimizer_state(workload, params, model_state, hp, None)


def test_good_hyperparameter_forms():
  hp = algoperf_api.hyperparameters
  # Halton hands out floats: an integral one is read as the integer.
  assert hp.averaging_config({"averaging_every": 64.0}).every == 64
  assert type(hp.averaging_config({"averaging_every": 64.0}).every) is int
  assert hp.averaging_config({"averaging_every": np.int64(3)}).every == 3
  assert hp.lawa_config({"lawa_k": 20.0}) == (20,)
  assert hp.ema_config({"ema_beta": 0.2}).beta == 0.2  # not int()
  cfg = hp.averaging_config({})
  assert cfg == (algoperf_api.DEFAULT_AVERAGING_EVERY, 0, "auto", "live")
  assert (algoperf_api.DEFAULT_AVERAGING_EVERY, algoperf_api.DEFAULT_LAWA_K,
          algoperf_api.DEFAULT_EMA_BETA) == (64, 20, 0.9)
  # Self-tuning: no hyperparameters, the reference's self-tuning point.
  assert hp.nadamw_config(None).learning_rate == pytest.approx(0.0017486387539278373)
  with pytest.raises(ValueError, match="api"):
    algoperf_api.build_submission(algoperf_api.nadamw_from_hyperparameters, api="tpu")


@pytest.mark.parametrize("api", APIS)
def test_integral_floats_run_as_their_integers(api):
  """A linear search-space range hands out ``2.0``: the run is the one with ``2``."""
  floats = hparams("nadamw_lawa", averaging_every=2.0, averaging_start_step=1.0,
                   lawa_k=3.0)
  got, want = run(api, "nadamw_lawa", 1, hp=floats), cached_run(api, "nadamw_lawa", 1)
  assert [s for s, _ in got["evals"]] == [s for s, _ in want["evals"]] == list(EVAL_AT)
  for (_, params), (_, want_params) in zip(got["evals"], want["evals"]):
    for a, b in zip(leaves(params), leaves(want_params)):
      np.testing.assert_array_equal(a, b)
  # The state too: a ring of 3 slots, sampled at the same steps.
  assert jax.tree_util.tree_structure(got["state"]) == jax.tree_util.tree_structure(
      want["state"])
  for a, b in zip(leaves(got["state"]), leaves(want["state"])):
    np.testing.assert_array_equal(a, b)


def test_jit_host_placement_keeps_state_in_host_memory():
  from weight_averaging import placement as placement_lib
  devices = jax.devices()
  sub = build("jit", "nadamw_lawa", devices)
  workload = TinyWorkload("jit", devices)
  params, model_state = workload.init_model_fn(0)
  hp = hparams("nadamw_lawa", averaging_placement="host")
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  for step in range(3):
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp, place_batch("jit", devices,
                                                             make_batch(step)),
        None, opt_state, [], step, jax.random.PRNGKey(step))
    opt_state, params, model_state = sub.prepare_for_eval(
        workload, params, None, model_state, hp, None, opt_state, [], step, None)
  # Where the backend has pinned host memory (the CPU backend since jax 0.7.1) the
  # ring lives there and the running sum in device memory; elsewhere 'host' falls
  # back to device memory.
  want = ("pinned_host" if "pinned_host" in placement_lib.backend_memory_kinds()
          else None)
  buffers = jax.tree_util.tree_leaves(opt_state[0].averager.ring)
  assert buffers
  for leaf in buffers:
    kind = leaf.sharding.memory_kind
    assert kind == want or (want is None and kind != "pinned_host"), kind
  for leaf in jax.tree_util.tree_leaves(opt_state[0].averager.survivor_sum):
    assert leaf.sharding.memory_kind != "pinned_host"
  for leaf in jax.tree_util.tree_leaves(params):  # what the runner evaluates
    assert leaf.sharding.memory_kind != "pinned_host"


@pytest.mark.parametrize("api", APIS)
def test_the_step_compiles_once_across_evals_and_resume(api):
  devices = jax.devices()
  sub = build(api, "nadamw_ema", devices)
  workload = TinyWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  hp = hparams("nadamw_ema")
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  runtime = opt_state[1]
  for step in range(6):
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp,
        place_batch(api, devices, make_batch(step)), None, opt_state, [], step,
        jax.random.PRNGKey(step))
    if step % 2:
      opt_state, params, model_state = sub.prepare_for_eval(
          workload, params, None, model_state, hp, None, opt_state, [], step, None)
    if step == 3:
      # A resume into the same runtime: the state comes back as host arrays and is
      # placed by update_params; params and model state are placed as the runner's.
      opt_state = (save_restore(api, devices, opt_state[0]), runtime)
      params = place(api, devices, host(api, params))
      model_state = place(api, devices, host(api, model_state))
  if api == "jit":
    assert runtime._step._cache_size() == 1


class StatelessWorkload(TinyWorkload):
  """Most AlgoPerf JAX workloads: ``model_state`` is None."""

  def init_model_fn(self, seed):
    params, _ = super().init_model_fn(seed)
    return params, None

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm,
               dropout_rate):
    assert model_state is None
    logits, _ = super().model_fn(params, batch, {"calls": 0.0}, mode, rng,
                                 update_batch_norm, dropout_rate)
    return logits, None


@pytest.mark.parametrize("api", APIS)
def test_model_state_none(api):
  devices = jax.devices()
  sub = build(api, "nadamw_lawa", devices)
  workload = StatelessWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  hp = hparams("nadamw_lawa")
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  for step in range(4):
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp,
        place_batch(api, devices, make_batch(step)), None, opt_state, [], step,
        jax.random.PRNGKey(step))
    assert model_state is None
    opt_state, params, model_state = sub.prepare_for_eval(
        workload, params, None, model_state, hp, None, opt_state, [], step, None)
    assert model_state is None


# ----------------------------------------------------------------------------
# Distributed Shampoo through the same glue.


def reference_optimizer_trajectory(make_optimizer, hp):
  """`make_optimizer`'s transform applied directly on one device, on the mean gradient.

  No glue: an independent loss, `jax.grad`, `optax.apply_updates` in a Python loop.
  """
  params = TinyWorkload("jit", jax.devices()[:1]).init_model_fn(0)[0]
  params = jax.tree_util.tree_map(np.asarray, params)

  def mean_loss(p, batch):
    out = _loss(batch["targets"], _mlp(p, batch["inputs"]), batch["weights"],
                hp.label_smoothing)
    return out["summed"] / out["n_valid_examples"]

  optimizer = make_optimizer(hp, STEP_HINT)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(mean_loss)(params, batch)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for t in range(NUM_STEPS):
    params, state = step(params, state, make_batch(t))
    trajectory.append(jax.tree_util.tree_map(np.asarray, params))
  return trajectory


def test_shampoo_submission_is_the_optimizer_on_the_mean_gradient():
  got = cached_run("jit", "shampoo", 1)["live"]
  hp = hparams("shampoo")
  want = reference_optimizer_trajectory(algoperf_api.shampoo_from_hyperparameters, hp)
  for t, (a, b) in enumerate(zip(got, want)):
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
  # The roots matter: without preconditioning (the graft alone) the run departs.
  graft_only = reference_optimizer_trajectory(
      algoperf_api.shampoo_from_hyperparameters,
      hparams("shampoo", start_preconditioning_step=10 ** 6))
  for t in range(3):  # identical before start_preconditioning_step
    for x, y in zip(leaves(got[t]), leaves(graft_only[t])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  gap = max(np.max(np.abs(x - y)) for x, y in zip(leaves(got[-1]),
                                                   leaves(graft_only[-1])))
  assert gap > 1e-3


@pytest.mark.parametrize("preset", ["meta", "google"])
def test_shampoo_runs_alike_on_one_device_jit_and_pmap(preset):
  """The roots are split over the devices (mesh under jit, axis under pmap)."""
  overrides = {} if preset == "meta" else dict(
      shampoo_preset="google", momentum=None, block_size=4)
  hp = hparams("shampoo_lawa", **overrides)
  runs = {(api, n): run(api, "shampoo_lawa", n, hp=hp)
          for api, n in (("jit", 1), ("jit", 4), ("pmap", 4))}
  one = runs[("jit", 1)]
  for key, other in runs.items():
    for t, (a, b) in enumerate(zip(one["live"], other["live"])):
      for x, y in zip(leaves(a), leaves(b)):
        # The gradient is summed in another order over 4 devices: float32 rounding.
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=f"{key} {t}")
    for (s1, a), (s2, b) in zip(one["evals"], other["evals"]):
      for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=f"{key} {s1}")


def test_shampoo_step_hint_factor_shortens_the_schedule():
  got = run("jit", "shampoo", 1, hp=hparams("shampoo", step_hint_factor=0.5))["live"]
  # The rate reaches 0 at step 10 = 0.5 * STEP_HINT: no move from then on.
  assert not np.array_equal(leaves(got[8])[0], leaves(got[9])[0])
  for t in range(10, NUM_STEPS):
    for x, y in zip(leaves(got[t]), leaves(got[9])):
      np.testing.assert_array_equal(x, y, err_msg=f"step {t}")


def _search_space(name):
  return runner.load_search_space(os.path.join(REPO, "tuning_search_spaces", name),
                                  num_trials=5)


def test_shampoo_search_spaces_hold_both_recipes():
  hp = algoperf_api.hyperparameters
  meta = [hp.shampoo_config(p) for p in _search_space("shampoo.json")]
  assert [c.preset for c in meta] == ["meta"] * 5
  for c in meta:  # Meta's fixed settings
    assert (c.transform["block_size"], c.transform["merge_dims_threshold"],
            c.transform["preconditioning_every"], c.transform["matrix_epsilon"],
            c.transform["relative_matrix_epsilon"], c.transform["graft_per_block"]) == (
                1024, 1024, 100, 1e-8, False, True)
  # Point 3: no first moment, SGD grafting, Nesterov momentum 0.9685.
  assert meta[2].transform["beta1"] == 0.0
  assert meta[2].transform["graft_type"] == "sgd"
  assert not meta[2].transform["use_nadam"]
  assert meta[2].transform["momentum"] == pytest.approx(0.9685)
  # Point 4: inverse root override 2, momentum 0.5; point 2: schedule over 0.6 T.
  assert meta[3].transform["exponent_override"] == 2
  assert meta[3].transform["momentum"] == 0.5
  assert meta[1].schedule.step_hint_factor == 0.6
  assert [c.transform["graft_type"] for c in meta] == ["adam", "adam", "sgd", "adam",
                                                       "adam"]
  google = [hp.shampoo_config(p) for p in _search_space("shampoo_google.json")]
  for point, c in zip(_search_space("shampoo_google.json"), google):
    assert c.preset == "google"
    assert c.transform["momentum"] == pytest.approx(1 - point["one_minus_beta1"])
    assert c.transform["beta1"] == 0.0
    assert c.transform["graft_type"] == "rmsprop_normalized"
    assert (c.transform["preconditioning_every"],
            c.transform["start_preconditioning_step"]) == (20, 101)
    assert 1e-4 <= c.learning_rate <= 1e-2


def test_every_search_space_file_validates():
  hp = algoperf_api.hyperparameters
  recipes = algoperf_api.recipes
  placement = algoperf_api.resolve_placement("replicated", "jit")
  paths = sorted(glob.glob(os.path.join(REPO, "tuning_search_spaces", "**", "*.json"),
                           recursive=True))
  assert len(paths) == 15  # nadamw*, shampoo*, shampoo_google*, embedded/*
  for path in paths:
    name = os.path.basename(path)[:-len(".json")]
    for point in runner.load_search_space(path, num_trials=5):
      optimizer = {"nadamw": recipes.nadamw_from_hyperparameters,
                   "shampoo": recipes.shampoo_from_hyperparameters}[base_optimizer(name)]
      assert optimizer(point, 1000) is not None
      algoperf_api.names.check_known(point)
      if name.endswith("_ema"):
        averager = recipes.ema_from_hyperparameters(
            point, hp.averaging_config(point, step_hint=1000), placement)
        assert averager.placement is not None
        assert "ema_beta" in point, path
      elif name.endswith("_lawa"):
        averager = recipes.lawa_from_hyperparameters(
            point, hp.averaging_config(point, step_hint=1000), placement)
        assert averager.placement is not None
        assert "lawa_k" in point, path


BAD_SHAMPOO = [
    ("shampoo_preset", "adam"), ("shampoo_preset", None), ("graft_type", "lion"),
    ("momentum", 1.0), ("use_nadam", "yes"), ("exponent_override", -1),
    ("step_hint_factor", 0.0), ("block_size", 0), ("root_method", "svd"),
    ("preconditioning_every", 2.5), ("start_preconditioning_step", -2),
    ("one_minus_beta1", 0.0), ("beta2", 1.0), ("matrix_epsilon", 0.0),
]


@pytest.mark.parametrize("name,value", BAD_SHAMPOO)
def test_bad_shampoo_hyperparameters_name_themselves(name, value):
  values = hparams("shampoo")._asdict()
  values[name] = value
  with pytest.raises(ValueError, match=name):
    algoperf_api.shampoo_from_hyperparameters(values, STEP_HINT)


def test_google_recipe_refuses_meta_only_hyperparameters():
  values = dict(hparams("shampoo")._asdict(), shampoo_preset="google")
  with pytest.raises(ValueError, match="'momentum' belongs to shampoo_preset 'meta'"):
    algoperf_api.shampoo_config(values)
  del values["momentum"]
  assert algoperf_api.shampoo_config(values).transform["momentum"] == pytest.approx(
      1 - BASE["one_minus_beta1"])


# ----------------------------------------------------------------------------
# Averaging windows as fractions of the step hint.


@pytest.mark.parametrize("api", APIS)
def test_fractions_run_as_their_steps(api):
  """On a step hint of 20, every fraction 0.1 is nu = round(2.0) = 2 and start fraction
  0.05 is ceil(1.0) = 1: the run is the one with averaging_every=2, start step 1."""
  fractions = hparams("nadamw_lawa", averaging_every=None, averaging_start_step=None,
                      averaging_every_fraction=0.1, averaging_start_fraction=0.05)
  got, want = run(api, "nadamw_lawa", 1, hp=fractions), cached_run(api, "nadamw_lawa", 1)
  for (s1, params), (s2, want_params) in zip(got["evals"], want["evals"]):
    assert s1 == s2
    for a, b in zip(leaves(params), leaves(want_params)):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves(got["state"]), leaves(want["state"])):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# Self-tuning: hyperparameters=None is one fixed, documented point.


def self_tuning_point(algorithm):
  """The documented point: the optimizer's, plus the averaging window and the averager's."""
  api_ = algoperf_api
  point = dict(api_.SELF_TUNING_NADAMW if base_optimizer(algorithm) == "nadamw"
               else api_.SELF_TUNING_SHAMPOO)
  if algorithm in AVERAGED:
    point.update(api_.SELF_TUNING_AVERAGING)
    point.update(api_.SELF_TUNING_EMA if algorithm.endswith("_ema")
                 else api_.SELF_TUNING_LAWA)
  return collections.namedtuple("Hyperparameters", sorted(point))(**point)


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_self_tuning_runs_the_documented_point(algorithm):
  got = run("jit", algorithm, 1, self_tuning=True)
  want = run("jit", algorithm, 1, hp=self_tuning_point(algorithm))
  for (s1, a), (s2, b) in zip(got["evals"], want["evals"]):
    assert s1 == s2
    for x, y in zip(leaves(a), leaves(b)):
      np.testing.assert_array_equal(x, y)
  # Averaging is on (nu = max(1, round(0.0005 * 20)) = 1): the eval params differ
  # from the live ones after the second step.
  step, params = got["evals"][-1]
  differs = any(not np.array_equal(x, y)
                for x, y in zip(leaves(params), leaves(got["live"][step])))
  assert differs == (algorithm in AVERAGED)
  # NadamW's and Shampoo's dropout 0.1 reached the model.
  assert set(got["workload"].dropout_rates) == {0.1}


def test_self_tuning_points_are_the_shipped_ones():
  """Shampoo's self-tuning point is Meta's point 1 of shampoo.json, NadamW's the
  baseline's point 5, and every shipped averaged search space uses the self-tuning
  window (its fractions, k and beta) in every point."""
  assert _search_space("shampoo.json")[0] == algoperf_api.SELF_TUNING_SHAMPOO
  nadamw_5 = _search_space("nadamw.json")[4]
  assert nadamw_5 == algoperf_api.SELF_TUNING_NADAMW
  for name in ("nadamw_ema", "nadamw_lawa", "shampoo_ema", "shampoo_lawa",
               "shampoo_google_ema", "shampoo_google_lawa"):
    window = dict(algoperf_api.SELF_TUNING_AVERAGING)
    window.update(algoperf_api.SELF_TUNING_EMA if name.endswith("_ema")
                  else algoperf_api.SELF_TUNING_LAWA)
    for point in _search_space(name + ".json"):
      assert {k: point[k] for k in window} == window, name
      assert "averaging_every" not in point and "averaging_start_step" not in point


# ----------------------------------------------------------------------------
# Mixed-dtype params through the builder: float32 params with a bfloat16 scalar (as
# the LM's attention scales), plus an int32 counter and a bool mask.


class MixedWorkload(TinyWorkload):
  """The tiny MLP with a bfloat16 scale, an int32 counter and a bool mask in its params."""

  def init_model_fn(self, seed):
    params, model_state = super().init_model_fn(seed)
    extra = {"scale": np.asarray(1.0, jnp.bfloat16), "count": np.asarray([0, 7], np.int32),
             "mask": np.asarray([True] * 6 + [False])}
    return dict(params, **place(self.api, self.devices, extra)), model_state

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm,
               dropout_rate):
    del mode, rng, dropout_rate
    new_state = {"calls": model_state["calls"] + 1} if update_batch_norm else model_state
    gate = params["mask"].astype(jnp.float32) * params["scale"].astype(jnp.float32)
    h = jnp.tanh(batch["inputs"] @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    offset = 0.0 * jnp.sum(params["count"]).astype(jnp.float32)
    return (h * gate) @ params["out"]["kernel"] + params["out"]["bias"] + offset, new_state


def mixed_reference(algorithm, live, upto):
  """`brute_force_average` on the floating leaves, each cast to its dtype; the rest live."""
  floating = {k: v for k, v in live[upto].items() if k not in ("count", "mask")}
  want = brute_force_average(algorithm, [{k: p[k] for k in floating} for p in live], upto)
  tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(floating), want)
  tree = jax.tree_util.tree_map(lambda w, x: np.asarray(w).astype(x.dtype), tree, floating)
  return dict(tree, count=live[upto]["count"], mask=live[upto]["mask"])


@pytest.mark.parametrize("api,algorithm", [("jit", "nadamw_ema"), ("jit", "nadamw_lawa"),
                                           ("jit", "shampoo_lawa"), ("pmap", "nadamw_lawa")])
def test_mixed_dtype_params_through_the_builder(api, algorithm):
  devices = jax.devices()
  sub = build(api, algorithm, devices)
  hp = hparams(algorithm)
  workload = MixedWorkload(api, devices)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp, None)
  live, floored = [], []
  for step in range(NUM_STEPS):
    if step - 1 not in EVAL_AT:
      # The counter changes between steps (not right after an eval: then the step
      # trains from the stashed live params, not from the container it is handed).
      params = dict(params, count=place(api, devices,
                                        np.asarray([step, 3 * step], np.int32)))
    opt_state, params, model_state = sub.update_params(
        workload, params, None, model_state, hp, place_batch(api, devices, make_batch(step)),
        None, opt_state, [], step, jax.random.PRNGKey(step))
    live.append(host(api, params))
    if step not in EVAL_AT:
      continue
    opt_state, params, model_state = sub.prepare_for_eval(
        workload, params, None, model_state, hp, None, opt_state, [], step, None)
    got, want = host(api, params), mixed_reference(algorithm, live, step)
    assert {k: np.asarray(got[k]).dtype for k in ("scale", "count", "mask")} == {
        "scale": np.dtype(jnp.bfloat16), "count": np.int32, "mask": np.bool_}
    np.testing.assert_array_equal(got["count"], live[step]["count"])  # live, not a mean
    floored.append(not np.array_equal(np.mean([p["count"] for p in live[:step + 1]],
                                              axis=0).astype(np.int32), got["count"]))
    np.testing.assert_array_equal(got["mask"], [True] * 6 + [False])
    for key in ("hidden", "out"):
      for a, b in zip(leaves(got[key]), leaves(want[key])):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=f"eval {step}")
    np.testing.assert_allclose(np.float64(got["scale"]), np.float64(want["scale"]),
                               rtol=2**-8, err_msg=f"eval {step}")
  assert any(floored)  # a mean of the counters would have been another number
  # The scale trained (it is a param); the counter and mask were never trained.
  assert float(live[-1]["scale"]) != 1.0
  assert live[-1]["scale"].dtype == jnp.bfloat16
  averager_state = host(api, opt_state[0].averager)
  assert averager_state[2 if algorithm.endswith("_ema") else 3]["count"] is None


class _RecordingLogger:
  def __init__(self):
    self.rows = []

  def append_scalar_metrics(self, metrics, global_step):
    self.rows.append((global_step, dict(metrics)))


def test_loss_goes_to_the_logger_the_runner_attaches_after_init():
  """The official runner attaches a trial's metrics logger after `init_optimizer_state`
  (and a new one each trial): the step-100 loss must reach the one attached now."""
  devices = jax.devices()[:1]
  sub = build("jit", "nadamw", devices)
  hp = hparams("nadamw")
  workload = TinyWorkload("jit", devices)
  params, model_state = workload.init_model_fn(0)
  opt_state = sub.init_optimizer_state(workload, params, model_state, hp,
                                       jax.random.PRNGKey(0))
  first, second = _RecordingLogger(), _RecordingLogger()
  workload.metrics_logger = first
  batch = place_batch("jit", devices, make_batch(0))
  for step, logger in ((99, first), (100, first), (200, second)):
    workload.metrics_logger = logger
    opt_state, params, model_state = sub.update_params(
        workload, params, workload.model_params_types, model_state, hp, batch,
        "softmax_cross_entropy", opt_state, [], step, jax.random.PRNGKey(step))
  assert [s for s, _ in first.rows] == [100] and [s for s, _ in second.rows] == [200]
  loss, grad_norm = first.rows[0][1]["loss"], first.rows[0][1]["grad_norm"]
  assert np.isfinite(loss) and loss > 0 and grad_norm > 0

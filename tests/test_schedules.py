"""Learning-rate schedules (shorter, annealing less, no decay, linear, WSD): every step
against its closed form in NumPy, the recipes on them, and the default bit for bit as
before (the reference warmup + cosine, built here the way the recipes built it)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weight_averaging import algoperf_api
from weight_averaging.algoperf_api import recipes, schedules
from weight_averaging.optimizers import common
from weight_averaging.optimizers import nadamw as nadamw_lib
from weight_averaging.optimizers import shampoo as shampoo_lib

hp = algoperf_api.hyperparameters


def closed_form(steps, lr, warmup_factor, step_hint, kind="cosine", step_hint_factor=1.0,
                end_factor=0.0, cooldown_fraction=0.2, wsd_decay="linear"):
  """The rate at each of `steps`, in float64, written out piece by piece."""
  s = np.asarray(steps, np.float64)
  horizon = max(1, int(np.round(step_hint * step_hint_factor)))
  warm = int(warmup_factor * horizon)
  eta_min = end_factor * lr
  if kind == "wsd":
    start = max(warm, horizon - max(1, int(np.round(cooldown_fraction * horizon))))
    kind = wsd_decay
  else:
    start = warm
  length = max(horizon - start, 1)
  u = np.clip((s - start) / length, 0.0, 1.0)
  if kind == "cosine":
    decay = eta_min + (lr - eta_min) * 0.5 * (1.0 + np.cos(np.pi * u))
  elif kind == "linear":
    decay = lr - (lr - eta_min) * u
  else:  # constant
    decay = np.full_like(s, lr)
  rate = np.where(s < start, lr, decay)  # the stable phase of wsd; else start == warm
  return np.where(s < warm, lr * s / max(warm, 1), rate)


def rates(schedule, n):
  return np.asarray(schedule(jnp.arange(n, dtype=jnp.int32)), np.float64)


CASES = [
    dict(kind="cosine"),
    dict(kind="cosine", step_hint_factor=0.25),
    dict(kind="cosine", end_factor=0.5),
    dict(kind="cosine", step_hint_factor=0.05, end_factor=0.01),
    dict(kind="linear"),
    dict(kind="linear", step_hint_factor=0.5, end_factor=0.1),
    dict(kind="constant"),
    dict(kind="constant", step_hint_factor=0.5),
    dict(kind="wsd"),
    dict(kind="wsd", cooldown_fraction=0.1, wsd_decay="cosine", end_factor=0.1),
    dict(kind="wsd", cooldown_fraction=1.0),  # the decay starts right after the warmup
    dict(kind="wsd", cooldown_fraction=0.99, step_hint_factor=0.5),  # clipped at the warmup
    dict(kind="wsd", cooldown_fraction=0.001),  # one step of cooldown
    dict(kind="cosine", end_factor=1.0),  # no decay at all
]


@pytest.mark.parametrize("warmup_factor,step_hint", [(0.1, 200), (0.0, 37), (0.02, 52000),
                                                     (1.0, 10), (0.05, 1)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_step_matches_the_closed_form(case, warmup_factor, step_hint):
  lr = 0.003
  n = step_hint + 50
  got = rates(common.lr_schedule(lr, warmup_factor, step_hint, **case), n)
  want = closed_form(np.arange(n), lr, warmup_factor, step_hint, **case)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * lr)


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_one_count_at_a_time_is_the_same_rate(case):
  """As an optimizer calls it: one scalar int32 count under jit."""
  schedule = common.lr_schedule(0.003, 0.1, 200, **case)
  one = jax.jit(schedule)
  want = rates(schedule, 260)
  for s in (0, 5, 19, 20, 21, 100, 160, 199, 200, 259):
    assert float(one(jnp.int32(s))) == pytest.approx(want[s], rel=1e-6, abs=1e-12)


def test_the_shapes_the_paper_asks_for():
  """Shorter schedule, anneal less, no decay, WSD: the values that define each."""
  lr, hint = 1.0, 1000
  shorter = rates(common.lr_schedule(lr, 0.1, hint, step_hint_factor=0.25), hint)
  assert shorter[25] == pytest.approx(1.0) and np.all(np.abs(shorter[250:]) <= 1e-12)
  half = rates(common.lr_schedule(lr, 0.1, hint, end_factor=0.5), hint + 10)
  assert half[hint:] == pytest.approx(0.5) and half[100:].min() == pytest.approx(0.5)
  flat = rates(common.lr_schedule(lr, 0.1, hint, kind="constant"), 3 * hint)
  assert np.all(flat[100:] == lr)
  wsd = rates(common.lr_schedule(lr, 0.1, hint, kind="wsd", cooldown_fraction=0.2), hint + 1)
  assert np.all(wsd[100:801] == lr) and wsd[900] == pytest.approx(0.5) and wsd[hint] == 0.0


def old_reference_schedule(lr, warmup_factor, horizon):
  """The schedule both recipes built before `lr_schedule`: the same optax calls."""
  warmup_steps = int(warmup_factor * horizon)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps),
       optax.cosine_decay_schedule(lr, max(horizon - warmup_steps, 1), alpha=0.0)],
      [warmup_steps])


@pytest.mark.parametrize("warmup_factor,step_hint,factor", [
    (0.1, 200, 1.0), (0.02, 52000, 1.0), (0.0, 7, 1.0), (0.05, 18094, 0.6), (1.0, 10, 1.0)])
def test_the_default_is_the_old_schedule_bit_for_bit(warmup_factor, step_hint, factor):
  horizon = max(1, int(round(step_hint * factor)))
  want = rates(old_reference_schedule(0.0017486387539278373, warmup_factor, horizon),
               step_hint + 20)
  for schedule in (
      common.lr_schedule(0.0017486387539278373, warmup_factor, step_hint,
                         step_hint_factor=factor),
      common.warmup_cosine_schedule(0.0017486387539278373, warmup_factor, horizon)):
    np.testing.assert_array_equal(rates(schedule, step_hint + 20), want)


# ----------------------------------------------------------------------------
# The recipes: the schedule they read is the one the optimizer runs.

STEP_HINT = 20
NUM_STEPS = 30
NADAMW = dict(hp.SELF_TUNING_NADAMW, learning_rate=0.01, warmup_factor=0.1)
SHAMPOO = dict(hp.SELF_TUNING_SHAMPOO, learning_rate=0.01, warmup_factor=0.1,
               preconditioning_every=2, start_preconditioning_step=2, block_size=4)


def _problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(6, 8)).astype(np.float32) * 0.3,
            "b1": np.zeros((8,), np.float32),
            "w2": rng.normal(size=(8, 3)).astype(np.float32) * 0.3}
  batches = [(rng.normal(size=(16, 6)).astype(np.float32),
              rng.normal(size=(16, 3)).astype(np.float32)) for _ in range(NUM_STEPS)]
  return params, batches


def _loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)


def trajectory(optimizer):
  """The params after each of `NUM_STEPS` steps of `optimizer` on a small regression."""
  params, batches = _problem()
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = optimizer.update(jax.grad(_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for x, y in batches:
    params, state = step(params, state, x, y)
    out.append(np.concatenate([np.asarray(v).ravel() for _, v in sorted(params.items())]))
  return np.stack(out)


def by_hand(name, point, schedule):
  """The optimizer of `point` built directly on `schedule`, without the recipe."""
  if name == "nadamw":
    cfg = hp.nadamw_config(point)
    return nadamw_lib.nadamw(schedule, b1=1.0 - cfg.one_minus_beta1, b2=cfg.beta2,
                             eps=nadamw_lib.EPS, weight_decay=cfg.weight_decay,
                             grad_clip=cfg.grad_clip)
  cfg = hp.shampoo_config(point)
  return optax.chain(shampoo_lib.scale_by_shampoo(**cfg.transform),
                     optax.scale_by_learning_rate(schedule))


RECIPES = {"nadamw": (recipes.nadamw_from_hyperparameters, NADAMW),
           "shampoo": (recipes.shampoo_from_hyperparameters, SHAMPOO)}
DEFAULTS = {"lr_schedule": "cosine", "step_hint_factor": 1.0, "lr_end_factor": 0.0}


@functools.lru_cache(maxsize=None)
def default_trajectory(name):
  """The recipe's default run, built by hand on the old schedule."""
  _, base = RECIPES[name]
  return trajectory(by_hand(name, base, old_reference_schedule(0.01, 0.1, STEP_HINT)))


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("given", ["absent", "explicit", "null"])
def test_recipes_default_trajectory_is_unchanged_bit_for_bit(name, given):
  make, base = RECIPES[name]
  point = {k: v for k, v in base.items() if k != "step_hint_factor"}
  if given == "explicit":
    point.update(DEFAULTS)
  elif given == "null":
    point.update({k: None for k in DEFAULTS})
  np.testing.assert_array_equal(trajectory(make(point, STEP_HINT)),
                                default_trajectory(name))


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("case", [
    dict(lr_schedule="constant"), dict(step_hint_factor=0.5, lr_end_factor=0.1),
    dict(lr_schedule="linear", lr_end_factor=0.5),
    dict(lr_schedule="wsd", cooldown_fraction=0.3, wsd_decay="cosine")],
    ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_recipes_run_the_schedule_they_read(name, case):
  """Against the closed form as a table the optimizer looks its rate up in."""
  make, base = RECIPES[name]
  point = dict(base, **case)
  keys = {"lr_schedule": "kind", "lr_end_factor": "end_factor"}
  table = jnp.asarray(closed_form(np.arange(NUM_STEPS + 1), 0.01, 0.1, STEP_HINT,
                                  **{keys.get(k, k): v for k, v in case.items()}),
                      jnp.float32)
  got = trajectory(make(point, STEP_HINT))
  want = trajectory(by_hand(name, point, lambda count: table[count]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(got[-1] - default_trajectory(name)[-1])) > 1e-4  # the schedule changed the run


def test_the_new_names_are_known_and_read():
  point = dict(NADAMW, lr_schedule="wsd", step_hint_factor=0.5, lr_end_factor=0.1,
               cooldown_fraction=0.2, wsd_decay="cosine")
  known = algoperf_api.names.known_names()
  assert {"lr_schedule", "step_hint_factor", "lr_end_factor", "cooldown_fraction",
          "wsd_decay"} <= known
  algoperf_api.names.check_known(point)  # no error
  with hp.recording() as read:
    hp.nadamw_config(point)
  assert set(point) <= read
  cfg = hp.shampoo_config(dict(SHAMPOO, **{k: point[k] for k in point if k not in NADAMW}))
  assert cfg.schedule == schedules.ScheduleConfig(
      kind="wsd", step_hint_factor=0.5, end_factor=0.1, cooldown_fraction=0.2,
      wsd_decay="cosine")
  assert hp.nadamw_config(None).schedule == schedules.ScheduleConfig()
  assert hp.shampoo_config(None).schedule == schedules.ScheduleConfig()


def test_every_combination_of_the_reader_builds():
  """Every schedule with every valid companion builds a schedule that starts at 0."""
  for kind, end in itertools.product(("cosine", "linear", "wsd"), (None, 0.0, 0.5, 1.0)):
    point = dict(NADAMW, lr_schedule=kind, lr_end_factor=end)
    schedule = recipes.learning_rate_schedule(hp.nadamw_config(point), 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(100)) == pytest.approx(0.01 * (end or 0.0), abs=1e-9)

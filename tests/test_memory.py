"""The memory plan and ``averaging_placement: 'auto'``.

* The bytes per device `memory` counts equal closed forms written here (LAWA: k
  snapshots in the params' dtypes and a float32 sum; EMA: one float32 copy; ``sharded``:
  ``ceil(n / N)`` of each leaf; ``host``: the ring or average off the device), and the
  bytes of real states on simulated devices, through the builder too.
* ``'auto'`` picks each of the three placements for made-up memory sizes, logs one line
  with the numbers, and without a reported limit (the CPU) keeps ``'replicated'``.
* Every shipped configuration fits the leaderboard's machine, but the one the pmap API
  cannot fit, which its config says.
"""

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging.algoperf_api import builder, memory, recipes
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.studies import configs, memory_plan, workload_facts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGER = "weight_averaging.algoperf_api.memory"

# float32 leaves of 91 and 5 elements (not multiples of 3 or 4: padding), a bfloat16
# scalar (the LM's attention scales) and an int32 leaf (never averaged).
SHAPES = {"w": ((13, 7), jnp.float32), "b": ((5,), jnp.float32),
          "s": ((), jnp.bfloat16), "n": ((3,), jnp.int32)}
FLOATING = [(91, 4), (5, 4), (1, 2)]   # (elements, itemsize) of the averaged leaves
PARAM_BYTES = 91 * 4 + 5 * 4 + 1 * 2 + 3 * 4
COUNTERS = 8                           # step and count, int32
K = 5


def abstract_params():
  return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in SHAPES.items()}


def real_params():
  return {k: jnp.ones(s, d) for k, (s, d) in SHAPES.items()}


def make(name, placement, k=K):
  return (averagers.ema(0.9, placement=placement) if name == "ema"
          else averagers.lawa(k, every=1, placement=placement))


def closed_form(name, placement, n, k=K):
  """``(device, host)`` bytes per device, by hand."""
  per = (lambda e: math.ceil(e / n)) if placement == "sharded" else (lambda e: e)
  f32_copy = sum(per(e) * 4 for e, _ in FLOATING)        # sums and EMA: float32
  own_copy = sum(per(e) * size for e, size in FLOATING)  # LAWA's snapshots: own dtype
  bulk = f32_copy if name == "ema" else k * own_copy
  rest = COUNTERS + (0 if name == "ema" else f32_copy)
  return (rest, bulk) if placement == "host" else (rest + bulk, 0)


def per_device(tree):
  """``{device id: [device bytes, pinned host bytes]}`` of the real arrays in `tree`."""
  out = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    slot = 1 if getattr(leaf.sharding, "memory_kind", None) == "pinned_host" else 0
    for shard in leaf.addressable_shards:
      out.setdefault(shard.device.id, [0, 0])[slot] += shard.data.nbytes
  return out


# ----------------------------------------------------------------------------
# Counting.


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("where", placement_lib.PLACEMENTS)
@pytest.mark.parametrize("name", ["ema", "lawa"])
def test_averaging_bytes_equal_the_closed_form_and_real_states(name, where, n):
  got = memory.averaging_bytes(lambda p: make(name, p), abstract_params(), where, n)
  assert got == closed_form(name, where, n)
  if where == "host" and not placement_lib.host().available:
    return  # the real state falls back to device memory here; the closed form stands
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("averaging",))
  state = make(name, placement_lib.get(where, mesh=mesh)).init(real_params())
  counted = per_device(state)
  assert sorted(counted) == [d.id for d in jax.devices()[:n]]
  for device, (device_bytes, host_bytes) in counted.items():
    assert (device_bytes, host_bytes) == got, device


def test_footprints_of_a_submission():
  params = abstract_params()
  optimizer = recipes.nadamw_from_hyperparameters(None, 100)
  moments = 2 * sum(e * size for e, size in FLOATING)  # mu and nu in the params' dtypes
  got = memory.footprints(params, optimizer, lambda p: make("lawa", p),
                          placement_lib.PLACEMENTS, 4)
  for where, f in got.items():
    device, host = closed_form("lawa", where, 4)
    assert f.params == f.stash == PARAM_BYTES
    assert f.optimizer - moments in (0, 4, 8)  # plus optax's step counters, if any
    assert (f.averaging, f.host) == (device, host)
    assert f.device == PARAM_BYTES * 2 + f.optimizer + device
  real = optimizer.init(averagers.floating_part(real_params()))
  assert got["replicated"].optimizer == sum(x.nbytes for x in jax.tree_util.tree_leaves(real))
  plain = memory.footprints(params, optimizer, None, ("replicated",), 4)["replicated"]
  assert (plain.averaging, plain.stash, plain.device) == (0, 0, PARAM_BYTES + plain.optimizer)


# ----------------------------------------------------------------------------
# Deciding.


def lawa_totals(n=4, k=20):
  """Device bytes per placement of NadamW + LAWA(k) on `SHAPES`, by hand."""
  moments = 2 * sum(e * size for e, size in FLOATING)
  optimizer = recipes.nadamw_from_hyperparameters(None, 100)
  extra = memory.tree_bytes(jax.eval_shape(optimizer.init, averagers.floating_part(
      abstract_params()))) - moments  # optax's counters
  return {w: 2 * PARAM_BYTES + moments + extra + closed_form("lawa", w, n, k)[0]
          for w in placement_lib.PLACEMENTS}


def decide(limit, api="jit", host_available=True, environ=None, params=None):
  return memory.placement_for(
      "auto", api, abstract_params() if params is None else params,
      recipes.nadamw_from_hyperparameters(None, 100), lambda p: make("lawa", p, k=20),
      jax.devices(), limit=limit, environ=environ, host_available=host_available)


def test_auto_picks_each_placement_for_made_up_memory_sizes(caplog):
  totals = lawa_totals()
  assert totals["host"] < totals["sharded"] < totals["replicated"]
  budget = lambda total: math.ceil(total / memory.FRACTION)  # the smallest limit that fits
  caplog.set_level(logging.INFO, logger=LOGGER)
  assert decide(10**12) == "replicated"
  assert decide(budget(totals["replicated"])) == "replicated"
  assert decide(budget(totals["replicated"]) - 2) == "sharded"
  assert decide(budget(totals["sharded"])) == "sharded"
  assert decide(budget(totals["sharded"]) - 2) == "host"
  assert decide(budget(totals["host"])) == "host"
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert decide(budget(totals["host"]) - 2) == "host"  # none fits: the fewest bytes
  # Without pinned host memory 'host' is no candidate: the fewest bytes are sharded's.
  assert decide(budget(totals["sharded"]) - 2, host_available=False) == "sharded"
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 2
  assert all("none fits" in w and "lawa_k" in w for w in warnings)
  assert decide(None) == "replicated"  # unknown memory: assumed to fit
  assert memory.placement_for("sharded", "jit", None, None, None) == "sharded"  # as given


def test_under_pmap_auto_is_replicated_and_warns_when_it_does_not_fit(caplog):
  caplog.set_level(logging.INFO, logger=LOGGER)
  pmapped = placement_lib.pmap_replicate(real_params())  # leading device axis
  assert decide(10**12, api="pmap", params=pmapped) == "replicated"
  assert decide(1000, api="pmap", params=pmapped) == "replicated"
  first, second = caplog.records
  assert first.levelno == logging.INFO
  assert second.levelno == logging.WARNING
  assert "pmap API has only 'replicated'" in second.getMessage()
  assert f"total {memory.human(lawa_totals()['replicated'])}" in second.getMessage()


def test_the_decision_is_one_line_with_the_numbers(caplog):
  totals = lawa_totals()
  limit = math.ceil(totals["sharded"] / memory.FRACTION)
  caplog.set_level(logging.INFO, logger=LOGGER)
  decide(limit)
  [record] = caplog.records
  line = record.getMessage()
  assert "\n" not in line
  assert line.startswith("averaging_placement 'auto' -> 'sharded' on 4 device(s)")
  assert f"params {memory.human(PARAM_BYTES)}" in line
  assert f"stash {memory.human(PARAM_BYTES)}" in line
  for where in ("replicated", "sharded"):
    assert f"{where} {memory.human(closed_form('lawa', where, 4, 20)[0])}" in line
    assert f"(total {memory.human(totals[where])})" in line
  assert f"budget {memory.human(memory.FRACTION * limit)}" in line
  assert f"x {memory.human(limit)} (given)" in line


def test_fallback_and_override_of_the_device_limit(caplog):
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  limit, source = memory.device_limit(device, environ={})
  if stats and stats.get("bytes_limit"):
    assert limit == stats["bytes_limit"]
  else:  # the CPU: nothing reported, so 'auto' keeps the state replicated
    assert limit is None and "reports no memory_stats()" in source
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert decide("device", environ={}) == "replicated"
    assert "assuming replicated fits" in caplog.records[-1].getMessage()

  class Gpu:
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 3 * 2**30, "bytes_in_use": 0}

  assert memory.device_limit(Gpu(), environ={}) == (3 * 2**30, "gpu memory_stats()"
                                                    "['bytes_limit']")
  env = {memory.DEVICE_BYTES_ENV: "40GiB"}
  assert memory.device_limit(Gpu(), environ=env) == (40 * 2**30,
                                                     f"${memory.DEVICE_BYTES_ENV}")
  assert decide("device", environ={memory.DEVICE_BYTES_ENV: "1000"}) == "host"
  for text, want in (("16 GB", 16 * 10**9), ("1.5e9", 1_500_000_000), ("512MiB", 2**29)):
    assert memory.parse_bytes(text) == want
  for bad in ("abc", "0", "-5", "12 parsecs", "inf"):
    with pytest.raises(ValueError, match=memory.DEVICE_BYTES_ENV):
      memory.parse_bytes(bad)
  with pytest.raises(ValueError, match="decided from the state's bytes"):
    placement_lib.get("auto")


# ----------------------------------------------------------------------------
# Through the builder: the state a submission allocates is the one planned.


class Workload:
  step_hint = 100
  metrics_logger = None

  def model_fn(self, params, batch, model_state, mode, rng, update_batch_norm):
    del batch, mode, rng, update_batch_norm
    return params["w"], model_state

  def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
    raise NotImplementedError  # init_optimizer_state does not call it


@pytest.mark.parametrize("api,limit,want", [
    ("jit", None, "replicated"), ("jit", "budget:sharded", "sharded"),
    ("jit", "budget:host", "host"), ("pmap", "1000", "replicated")])
def test_the_builder_allocates_the_planned_state(api, limit, want, monkeypatch, caplog):
  devices = jax.devices()
  totals = lawa_totals(n=len(devices))
  if limit is None:
    monkeypatch.delenv(memory.DEVICE_BYTES_ENV, raising=False)
  else:
    if limit.startswith("budget:"):
      limit = str(math.ceil(totals[limit.split(":")[1]] / memory.FRACTION))
    monkeypatch.setenv(memory.DEVICE_BYTES_ENV, limit)
  if want == "host" and not placement_lib.host().available:
    want = "sharded"  # no pinned_host here: 'host' is no candidate, the fewest bytes
  sub = builder.build_submission(recipes.nadamw_from_hyperparameters,
                                 recipes.lawa_from_hyperparameters, api=api)
  params = real_params()
  if api == "pmap":
    params = placement_lib.pmap_replicate(params)
  else:
    params = jax.device_put(params, NamedSharding(builder.batch_mesh(), PartitionSpec()))
  hparams = dict(hp.SELF_TUNING_NADAMW, lawa_k=20, averaging_every=1)
  caplog.set_level(logging.INFO, logger=LOGGER)
  state, runtime = sub.init_optimizer_state(Workload(), params, None, hparams, None)
  assert runtime.averager.placement.name == want
  [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
  assert f"'auto' -> '{want}'" in line
  # Every device holds the planned optimizer, averaging and stash bytes (+ the flag).
  planned = memory.footprints(memory.abstract(params, device_axis=api == "pmap"),
                              runtime.optimizer, lambda p: make("lawa", p, k=20),
                              (want,), len(devices))[want]
  counted = per_device(state)
  assert len(counted) == len(devices)
  for device_bytes, host_bytes in counted.values():
    assert device_bytes == planned.optimizer + planned.averaging + planned.stash + 4
    if placement_lib.host().available and api == "jit":
      assert host_bytes == planned.host


def test_averaged_batch_statistics_are_planned_too(monkeypatch):
  """Under averaging_model_state='average' the averager and the stash hold (params,
  model_state): the plan counts both, and the built state has exactly those bytes."""
  monkeypatch.delenv(memory.DEVICE_BYTES_ENV, raising=False)
  sub = builder.build_submission(recipes.nadamw_from_hyperparameters,
                                 recipes.lawa_from_hyperparameters, api="jit")
  mesh = NamedSharding(builder.batch_mesh(), PartitionSpec())
  params = jax.device_put(real_params(), mesh)
  model_state = jax.device_put({"batch_stats": {"mean": jnp.zeros((64,)),
                                                "var": jnp.ones((64,))}}, mesh)
  hparams = dict(hp.SELF_TUNING_NADAMW, lawa_k=20, averaging_every=1,
                 averaging_model_state="average")
  state, runtime = sub.init_optimizer_state(Workload(), params, model_state, hparams, None)
  lawa = lambda p: make("lawa", p, k=20)
  plan = lambda tracked: memory.footprints(
      memory.abstract(params), runtime.optimizer, lawa, ("replicated",), len(jax.devices()),
      tracked)["replicated"]
  with_stats = plan(memory.abstract((params, model_state)))
  assert with_stats.stash == PARAM_BYTES + 2 * 64 * 4
  assert with_stats.averaging > plan(None).averaging
  for device_bytes, _ in per_device(state).values():
    assert device_bytes == with_stats.optimizer + with_stats.averaging + with_stats.stash + 4
  # A device that holds the replicated average of the params but not of the pair: 'auto'
  # must not pick replicated.
  limit = (plan(None).device + with_stats.device) / 2 / memory.FRACTION
  monkeypatch.setenv(memory.DEVICE_BYTES_ENV, str(int(limit)))
  _, runtime = sub.init_optimizer_state(Workload(), params, model_state, hparams, None)
  assert runtime.averager.placement.name != "replicated"


def test_with_several_processes_process_0_decides(tmp_path):
  """2 processes x 2 CPU devices whose limits disagree (1 B and 10 GB) run one program."""
  from weight_averaging.runner import distributed  # pylint: disable=import-outside-toplevel
  if distributed.multiprocess_cpu_unsupported() is not None:
    pytest.skip(distributed.multiprocess_cpu_unsupported())
  want = "host" if placement_lib.host().available else "sharded"  # the fewest bytes
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  run = subprocess.run(
      [sys.executable, "-m", "weight_averaging.runner.launch", "--num_processes", "2",
       "--devices_per_process", "2", "--timeout_s", "240", "--", "env",
       f"{memory.DEVICE_BYTES_ENV}=1e{{process_id}}0", sys.executable, "-m",
       "weight_averaging.runner", "--submission_path=submissions/jit/nadamw_lawa/submission.py",
       "--tuning_search_space=tuning_search_spaces/embedded/nadamw_lawa.json",
       f"--experiment_dir={tmp_path}", "--experiment_name=auto", "--max_global_steps=4",
       "--eval_every_steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  lines = [line for line in (run.stdout + run.stderr).splitlines() if "'auto' ->" in line]
  assert lines and all(f"'auto' -> '{want}'" in line and "process 0 decides" in line
                       for line in lines), lines
  assert any("0.6 x 9.31 GiB" in line for line in lines)  # process 1 alone: replicated


# ----------------------------------------------------------------------------
# The plan on the real workloads.


def test_the_lm_shapes_are_its_published_size():
  leaves = memory_plan.lm_shapes()
  assert sum(math.prod(s) for s, _ in leaves) == 252_815_372  # "252.8M params"
  assert [d for _, d in leaves].count("bfloat16") == 12
  assert sum(math.prod(s) * (2 if d == "bfloat16" else 4) for s, d in leaves) == 1_011_261_464
  shipped = memory_plan.load_shapes("finewebedu_lm")
  assert sorted((x.shape, str(x.dtype)) for x in shipped) == sorted(
      (tuple(s), d) for s, d in leaves)


def test_every_workload_has_its_shapes_file():
  for workload in workload_facts.ALGOPERF_WORKLOADS:
    with open(os.path.join(memory_plan.SHAPES_DIR, f"{workload}.json")) as f:
      raw = json.load(f)
    leaves = memory_plan.load_shapes(workload)
    assert raw["num_params"] == sum(math.prod(x.shape) for x in leaves)
    assert raw["bytes"] == memory.tree_bytes(leaves)
    assert raw["source"]
  assert memory.tree_bytes(memory_plan.load_shapes("criteo1tb")) > 4_194_304 * 128 * 4
  with pytest.raises(ValueError, match="--write_shapes"):
    memory_plan.load_shapes("mnist")


def test_plan_rows_against_the_closed_form():
  """WMT's LAWA fits replicated on an A100; Criteo's is sharded over the four."""
  a100 = memory_plan.HARDWARE[memory_plan.LEADERBOARD]
  wmt = memory_plan.plan_row("wmt", "nadamw_lawa", a100.name)
  p = memory.tree_bytes(memory_plan.load_shapes("wmt"))
  assert wmt.placement == "replicated" and wmt.fits
  assert (wmt.footprint.params, wmt.footprint.stash) == (p, p)
  assert wmt.footprint.optimizer - 2 * p in (0, 4, 8)
  assert wmt.footprint.averaging == 21 * p + COUNTERS
  assert wmt.limit == int(0.75 * 40 * 2**30)
  criteo = memory_plan.plan_row("criteo1tb", "nadamw_lawa", a100.name)
  leaves = memory_plan.load_shapes("criteo1tb")
  sharded = sum(21 * math.ceil(math.prod(x.shape) / 4) * 4 for x in leaves) + COUNTERS
  assert criteo.placement == "sharded" and criteo.fits
  assert criteo.footprint.averaging == sharded
  assert criteo.limit == int(0.80 * 40 * 2**30)
  pmap = memory_plan.plan_row("criteo1tb", "nadamw_lawa", a100.name, api="pmap")
  assert pmap.placement == "replicated" and not pmap.fits


def test_every_shipped_configuration_fits_the_leaderboard_machine():
  rows = memory_plan.shipped_plans()
  whats = {what for what, _ in rows}
  assert {f"tuning_search_spaces/{n} ({api})" for n in os.listdir(configs.SEARCH_SPACE_DIR)
          if n.endswith(".json") for api in configs.APIS} <= whats
  assert "workloads_config/criteo1tb.json (pmap)" in whats
  unfit = {(r.workload, r.submission, r.api) for _, r in rows if not r.fits}
  assert unfit == {(w, s, "pmap") for w, s in memory_plan.PMAP_DOES_NOT_FIT}
  notes = configs.load("criteo1tb").path
  with open(notes) as f:
    text = json.load(f)["notes"]
  assert "pmap DOES NOT FIT" in text and "jit API" in text
  # Without 'auto' (the old default, replicated everywhere) LAWA on Criteo would not fit.
  point = dict(hp.SELF_TUNING_NADAMW, lawa_k=20, averaging_every=5,
               averaging_placement="replicated")
  replicated = memory_plan.plan_row("criteo1tb", "nadamw_lawa", memory_plan.LEADERBOARD,
                                    point)
  assert not replicated.fits


def test_the_script_prints_the_table(capsys):
  spec = importlib.util.spec_from_file_location(
      "memory_plan_script", os.path.join(REPO, "scripts", "memory_plan.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main(["--workloads", "criteo1tb", "--hardware", "4x A100 40 GB"]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| criteo1tb")]
  assert len(rows) == 6
  assert [r.split("|")[-2].strip() for r in rows] == [
      "-", "replicated", "sharded", "-", "replicated", "sharded"]


def test_the_readme_holds_the_scripts_table():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  rows = memory_plan.plan(["criteo1tb", "finewebedu_lm"])
  for line in memory_plan.table(rows):
    if line.startswith("| criteo1tb") or line.startswith("| finewebedu_lm"):
      assert line in readme, line


@pytest.mark.skipif(importlib.util.find_spec("algoperf") is None,
                    reason="needs algoperf (the shapes files are generated from it)")
def test_the_shapes_files_are_algoperfs():
  """Each shipped file equals ``jax.eval_shape`` of algoperf's own ``init_model_fn``."""
  code = ("import json; from weight_averaging.studies import memory_plan as m; "
          "print(json.dumps({w: m.algoperf_shapes(w) for w in %r}))"
          % [w for w in workload_facts.ALGOPERF_WORKLOADS if w != "finewebedu_lm"])
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert run.returncode == 0, run.stderr[-3000:]
  for workload, leaves in json.loads(run.stdout.splitlines()[-1]).items():
    shipped = memory_plan.load_shapes(workload)
    assert sorted((x.shape, str(x.dtype)) for x in shipped) == sorted(
        (tuple(s), d) for s, d in leaves), workload


@pytest.mark.parametrize("optimizer", ["nadamw", "shampoo"])
def test_the_step_formula_bounds_xlas_analysis(optimizer):
  """`step_bytes`' temporaries bound XLA's compile-time analysis of the donated step on
  OGBG's real shapes (the tightest workload for Shampoo: its root chunks dominate; for
  Shampoo within a factor 2); the gradients are the step's float32 input."""
  params = memory_plan.load_shapes("ogbg")
  measured = memory_plan.workload_step_memory("ogbg", optimizer, params=params)
  if measured.argument == 0:
    pytest.skip("this backend has no compile-time memory analysis")
  grads, temp = memory_plan.step_bytes(optimizer, params)
  assert measured.temp <= temp, (measured, temp)
  assert optimizer == "nadamw" or temp <= 2 * measured.temp, (measured, temp)
  f = memory_plan.plan_row("ogbg", optimizer, memory_plan.LEADERBOARD).footprint
  assert measured.argument == f.params + f.optimizer + grads
  assert measured.peak == measured.argument + measured.output - measured.alias + measured.temp

"""Cost of averaging in a training step: memory traffic, LAWA's cost in k, device bytes.

Prints three tables and writes them as JSON (``--output``):

1. For a ~50M-parameter pytree, the bytes one training step reads and writes beyond
   the same step without averaging, from the compiled program's ``cost_analysis()``,
   in units of the params' size, per averager, gate and placement (4 simulated
   devices; per-device programs, so ``sharded`` should show about 1/4). The bound for
   an EMA sampling step is 2.0: read and write the average once (the new params are
   already in registers from the optimizer update when the step is fused).
2. LAWA's measured time to push a snapshot (amortised over whole ring cycles,
   median and worst) and to read the mean for k = 2, 10, 50 (one device): the
   amortised and median costs should not grow with k.
3. Device bytes of the averaging state per placement: ``sharded`` holds 1/N.

Run: ``python benchmarks/averaging.py`` (``make bench``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import weight_averaging as wa
from weight_averaging import placement as placement_lib


def param_tree(num_params: int, leaf_side: int = 2048):
  """Square float32 leaves (plus one remainder vector) totalling `num_params`."""
  leaves = {}
  per_leaf = leaf_side * leaf_side
  for i in range(num_params // per_leaf):
    leaves[f"layer{i:02d}"] = jax.ShapeDtypeStruct((leaf_side, leaf_side), jnp.float32)
  if num_params % per_leaf:
    leaves["rest"] = jax.ShapeDtypeStruct((num_params % per_leaf,), jnp.float32)
  return leaves


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def bytes_accessed(fn, *args, **jit_kwargs) -> float:
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["bytes accessed"])


def sgd(params, grads):
  return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)


def traffic_table(num_params: int):
  """Extra bytes per step over plain SGD, in param-sizes (cost_analysis)."""
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      param_tree(num_params))
  size = tree_bytes(params)
  base = bytes_accessed(sgd, params, params, donate_argnums=0)
  rows = []
  configs = [("ema", "cond", lambda p, g: wa.ema(0.9, every=1, placement=p, gate=g)),
             ("ema", "mask", lambda p, g: wa.ema(0.9, every=1, placement=p, gate=g)),
             ("lawa k=10", "cond", lambda p, g: wa.lawa(10, every=1, placement=p, gate=g)),
             ("lawa k=10", "mask", lambda p, g: wa.lawa(10, every=1, placement=p, gate=g))]
  placements = ["replicated", "sharded"]
  if placement_lib.host().available:
    placements.append("host")
  for name, gate, make in configs:
    for where in placements:
      averager = make(placement_lib.get(where, mesh=mesh), gate)
      state = jax.eval_shape(averager.init, params)
      shardings = averager.state_shardings(state)
      state = jax.tree_util.tree_map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          state, shardings)

      def step(params, grads, state):
        params = sgd(params, grads)
        return params, averager.update(state, params)

      total = bytes_accessed(step, params, params, state, donate_argnums=(0, 2),
                             out_shardings=(replicated, shardings))
      rows.append({"averager": name, "gate": gate, "placement": where,
                   "extra_param_sizes_per_device": (total - base) / size})
  return size, rows


def timed(fn, *args, repeats: int = 7) -> float:
  """Median wall time of `fn(*args)` in seconds (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def lawa_cost_table(num_params: int, ks=(2, 10, 50)):
  """Measured push and mean time per k on one device (no donation: state reused)."""
  device = jax.devices()[0]
  one_device = placement_lib.replicated(mesh=Mesh(np.asarray([device]), ("batch",)))
  params = jax.device_put(
      jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), param_tree(num_params)),
      device)
  rows = []
  for k in ks:
    averager = wa.lawa(k, every=1, placement=one_device)
    state = jax.jit(averager.init)(params)
    # Fill the ring so pushes also subtract the oldest snapshot.
    update = jax.jit(averager.update, donate_argnums=0)
    for _ in range(k + 1):
      state = update(state, params)
    # A training step donates the state, so the ring is updated in place. Every
    # k-th push also re-sums the ring (drift control): time whole cycles.
    pushes = k * max(1, -(-20 // k))
    times = []
    for _ in range(pushes):
      start = time.perf_counter()
      state = jax.block_until_ready(update(state, params))
      times.append(time.perf_counter() - start)
    mean = jax.jit(averager.average)
    rows.append({"k": k, "push_ms_amortised": 1e3 * statistics.mean(times),
                 "push_ms_median": 1e3 * statistics.median(times),
                 "push_ms_max": 1e3 * max(times),
                 "mean_ms": 1e3 * timed(mean, state, params)})
    del state
  return rows


def device_bytes_table(num_params: int):
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  param_tree(num_params))
  size = tree_bytes(params)
  rows = []
  placements = ["replicated", "sharded"] + (
      ["host"] if placement_lib.host().available else [])
  for where in placements:
    for name, make in (("ema", lambda p: wa.ema(0.9, placement=p)),
                       ("lawa k=4", lambda p: wa.lawa(4, every=1, placement=p))):
      averager = make(where)
      state = averager.placement.put(jax.jit(averager.init)(params))
      on_device = [
          sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
              for s in leaf.addressable_shards
              if s.device == d and leaf.sharding.memory_kind != "pinned_host")
          for d in jax.devices()]
      rows.append({"averager": name, "placement": where,
                   "device_bytes_per_device_over_param_size":
                       [round(b / size, 3) for b in on_device]})
      del state
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_params", type=int, default=50_331_648)
  parser.add_argument("--timing_params", type=int, default=10_485_760,
                      help="params for the measured LAWA timings (k=50 holds 50 copies)")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} devices; "
        f"memory kinds {sorted(placement_lib.backend_memory_kinds())}")

  size, traffic = traffic_table(args.num_params)
  print(f"\n1. Extra memory traffic of one sampling step over plain SGD "
        f"({args.num_params / 1e6:.1f}M params = {size / 2**20:.0f} MiB), param-sizes per "
        f"device.\n   From cost_analysis(), which adds up every branch of a cond (LAWA's "
        f"every-k-pushes re-sum included) and leaves collectives out:")
  print(f"{'averager':<12}{'gate':<6}{'placement':<12}{'extra':>8}")
  for r in traffic:
    print(f"{r['averager']:<12}{r['gate']:<6}{r['placement']:<12}"
          f"{r['extra_param_sizes_per_device']:>8.2f}")

  lawa = lawa_cost_table(args.timing_params)
  print(f"\n2. LAWA push and mean on one device ({args.timing_params / 1e6:.1f}M params):")
  print(f"{'k':>4}{'push ms (amortised)':>21}{'median':>8}{'max':>8}{'mean ms':>9}")
  for r in lawa:
    print(f"{r['k']:>4}{r['push_ms_amortised']:>21.1f}{r['push_ms_median']:>8.1f}"
          f"{r['push_ms_max']:>8.1f}{r['mean_ms']:>9.1f}")

  placed = device_bytes_table(args.num_params // 8)
  print(f"\n3. Device bytes of the averaging state per device, in param-sizes "
        f"({args.num_params // 8 / 1e6:.1f}M params, {jax.device_count()} devices):")
  for r in placed:
    print(f"{r['averager']:<10}{r['placement']:<12}"
          f"{r['device_bytes_per_device_over_param_size']}")

  if args.output:
    with open(args.output, "w") as f:
      json.dump({"jax": jax.__version__, "traffic": traffic, "lawa": lawa,
                 "device_bytes": placed}, f, indent=2)


if __name__ == "__main__":
  main()

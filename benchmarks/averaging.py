"""Cost of averaging in a training step: memory traffic, LAWA push time, bytes, transfers.

Prints four tables and writes them as JSON (``--output``):

1. For a ~50M-parameter pytree, the bytes one training step reads and writes beyond
   the same step without averaging, from the compiled program's ``cost_analysis()``,
   in units of the params' size, per averager, gate and placement (4 simulated
   devices; per-device programs, so ``sharded`` should show about 1/4). The bound for
   an EMA sampling step is 2.0: read and write the average once (the new params are
   already in registers from the optimizer update when the step is fused).
2. LAWA's measured time to push a snapshot (median, and amortised over whole ring
   cycles) and to read the mean for k = 2, 10, 40 (one device), against the time
   of the 5 param-sizes a push must move at this machine's copy bandwidth: the
   costs should not grow with k and stay within about 1.5x of that traffic.
3. Device bytes of the averaging state per placement: ``sharded`` holds 1/N.
4. ``host``: the bytes one update and one ``average`` move between memory kinds,
   in param-sizes, from the program lowered for a GPU (`placement.memory_transfers`;
   a loop body counts once): they should not grow with k.

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


def copy_step(params):
  """A function doing one in-place read-and-write of `params` (2 param-sizes of traffic).

  This machine's copy bandwidth on the same arrays: the memory-traffic limit that
  averaging costs are measured against.
  """
  bump = jax.jit(lambda t: jax.tree_util.tree_map(lambda a: a + 1.0, t), donate_argnums=0)
  box = [jax.block_until_ready(bump(jax.tree_util.tree_map(jnp.copy, params)))]

  def step():
    box[0] = jax.block_until_ready(bump(box[0]))

  return step


def push_seconds(averager, params, k: int, donate: bool = True, repeats: int = 5):
  """Median and amortised seconds of one LAWA push, and of one copy timed between pushes.

  The state is placed by a jitted `init` with the averager's shardings and updated
  by a jitted `update` with them as out-shardings, donated unless ``donate=False``
  (then every push writes a fresh ring). Each run times whole ring cycles (at least
  20 pushes), so the amortised figure includes the exact re-sum every k pushes; a
  copy of the params runs after each push, so both see the same load on a shared
  machine. Returns medians over `repeats` runs.
  """
  shardings = averager.state_shardings(jax.eval_shape(averager.init, params))
  state = jax.jit(averager.init, out_shardings=shardings)(params)
  update = jax.jit(averager.update, out_shardings=shardings,
                   donate_argnums=0 if donate else ())
  copy = copy_step(params)
  for _ in range(k + 1):  # fill the ring, so pushes also evict
    state = update(state, params)
  jax.block_until_ready(state)
  pushes = k * max(1, -(-20 // k))
  medians, means, copies = [], [], []
  for _ in range(repeats):
    times, copy_times = [], []
    for _ in range(pushes):
      start = time.perf_counter()
      state = jax.block_until_ready(update(state, params))
      times.append(time.perf_counter() - start)
      start = time.perf_counter()
      copy()
      copy_times.append(time.perf_counter() - start)
    medians.append(statistics.median(times))
    means.append(statistics.mean(times))
    copies.append(statistics.median(copy_times))
  return statistics.median(medians), statistics.median(means), statistics.median(copies)


def lawa_cost_table(num_params: int, ks=(2, 10, 40), placements=("replicated", "host"),
                    donate: bool = True, repeats: int = 5):
  """LAWA push time per placement and k on one device, against its memory traffic.

  A push must read the new params, write one slot, read the slot the next push
  evicts and read and write the running sum: 5 param-sizes, i.e. 2.5 copies.
  Each push is timed as ``every=1`` runs it (no gate: every step samples) and
  through the `lax.cond` gate that ``every > 1`` uses (``start_step=1``: the same
  pushes, one step later).
  """
  device = jax.devices()[0]
  mesh = Mesh(np.asarray([device]), ("batch",))
  params = jax.device_put(
      jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), param_tree(num_params)),
      device)
  rows = []
  for where in placements:
    if where == "host" and not placement_lib.host().available:
      continue
    for k, gate in ((k, gate) for k in ks for gate in ("none", "cond")):
      averager = wa.lawa(k, every=1, start_step=int(gate == "cond"),
                         placement=placement_lib.get(where, mesh=mesh))
      median, amortised, copy = push_seconds(averager, params, k, donate, repeats)
      mean = jax.jit(averager.average)
      state = jax.jit(averager.init, out_shardings=averager.state_shardings(
          jax.eval_shape(averager.init, params)))(params)
      rows.append({"placement": where, "k": k, "gate": gate, "donated": donate,
                   "push_ms_median": 1e3 * median, "push_ms_amortised": 1e3 * amortised,
                   "traffic_ms": 1e3 * 2.5 * copy,
                   "median_over_traffic": median / (2.5 * copy),
                   "amortised_over_traffic": amortised / (2.5 * copy),
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


def transfer_table(num_params: int, ks=(2, 10, 40)):
  """Param-sizes one update and one `average` move into each memory kind (``host``)."""
  params = param_tree(num_params)
  size = tree_bytes(params)
  rows = []
  for name, make in [("ema", lambda k: wa.ema(0.9, placement="host"))] + [
      (f"lawa k={k}", lambda k=k: wa.lawa(k, every=1, placement="host")) for k in ks]:
    averager = make(None) if name == "ema" else make()
    state = jax.eval_shape(averager.init, params)
    shardings = averager.state_shardings(state)
    state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    update = placement_lib.memory_transfers(averager.update, state, params,
                                            donate_argnums=0, out_shardings=shardings)
    average = placement_lib.memory_transfers(averager.average, state, params)
    rows.append({"averager": name,
                 "update_to_host": update.get("pinned_host", 0) / size,
                 "update_to_device": update.get("device", 0) / size,
                 "average_to_device": average.get("device", 0) / size})
  return rows


def _ints(text):
  return tuple(int(x) for x in text.split(","))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_params", type=int, default=50_331_648)
  parser.add_argument("--timing_params", type=int, default=4_194_304,
                      help="params for the measured LAWA timings (k=40 holds 40 copies)")
  parser.add_argument("--ks", type=_ints, default=(2, 10, 40))
  parser.add_argument("--placements", default="replicated,host")
  parser.add_argument("--no_donate", action="store_true",
                      help="time pushes without donating the state (a fresh ring each)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tables", default="traffic,lawa,bytes,transfers",
                      help="which of traffic, lawa, bytes, transfers to run")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  tables = set(args.tables.split(","))
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} devices; "
        f"memory kinds {sorted(placement_lib.backend_memory_kinds())}; "
        f"load average {os.getloadavg()[0]:.1f}")
  results = {"jax": jax.__version__, "load_average": os.getloadavg()[0]}

  if "traffic" in tables:
    size, traffic = traffic_table(args.num_params)
    results["traffic"] = traffic
    print(f"\n1. Extra memory traffic of one sampling step over plain SGD "
          f"({args.num_params / 1e6:.1f}M params = {size / 2**20:.0f} MiB), param-sizes per "
          f"device.\n   From cost_analysis(), which adds up every branch of a cond (LAWA's "
          f"every-k-pushes re-sum included) and leaves collectives out:")
    print(f"{'averager':<12}{'gate':<6}{'placement':<12}{'extra':>8}")
    for r in traffic:
      print(f"{r['averager']:<12}{r['gate']:<6}{r['placement']:<12}"
            f"{r['extra_param_sizes_per_device']:>8.2f}")

  if "lawa" in tables:
    lawa = lawa_cost_table(args.timing_params, args.ks, args.placements.split(","),
                           donate=not args.no_donate, repeats=args.repeats)
    results["lawa"] = lawa
    print(f"\n2. LAWA push and mean on one device ({args.timing_params / 1e6:.1f}M params, "
          f"{'not ' if args.no_donate else ''}donated), medians of {args.repeats} runs; "
          f"traffic: the time of 5 param-sizes at this machine's copy bandwidth, "
          f"measured between the pushes:")
    print(f"{'placement':<12}{'k':>4}{'gate':>6}{'push ms median':>16}{'amortised':>11}"
          f"{'traffic ms':>12}{'x traffic':>11}{'amortised':>11}{'mean ms':>9}")
    for r in lawa:
      print(f"{r['placement']:<12}{r['k']:>4}{r.get('gate', ''):>6}{r['push_ms_median']:>16.1f}"
            f"{r['push_ms_amortised']:>11.1f}{r['traffic_ms']:>12.1f}"
            f"{r['median_over_traffic']:>11.2f}{r['amortised_over_traffic']:>11.2f}"
            f"{r['mean_ms']:>9.1f}")

  if "bytes" in tables:
    placed = device_bytes_table(args.num_params // 8)
    results["device_bytes"] = placed
    print(f"\n3. Device bytes of the averaging state per device, in param-sizes "
          f"({args.num_params // 8 / 1e6:.1f}M params, {jax.device_count()} devices):")
    for r in placed:
      print(f"{r['averager']:<10}{r['placement']:<12}"
            f"{r['device_bytes_per_device_over_param_size']}")

  if "transfers" in tables and placement_lib.host().available:
    moved = transfer_table(args.timing_params, args.ks)
    results["transfers"] = moved
    print("\n4. 'host': param-sizes moved per update and per average, from the program "
          "lowered for a GPU (a loop body counts once):")
    print(f"{'averager':<12}{'update to host':>16}{'to device':>11}{'average':>9}")
    for r in moved:
      print(f"{r['averager']:<12}{r['update_to_host']:>16.2f}{r['update_to_device']:>11.2f}"
            f"{r['average_to_device']:>9.2f}")

  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

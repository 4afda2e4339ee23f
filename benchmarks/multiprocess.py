"""Device bytes of a 'sharded' averaging state per process, for 1, 2 and 4 processes.

Each run starts N processes on localhost with `weight_averaging.runner.launch` (M simulated
CPU devices each, one `jax.distributed` mesh over all N * M devices), builds EMA and
LAWA states with ``placement='sharded'`` for a params pytree, and has every process
report the bytes its own devices hold (`placement.device_bytes`). With the state
split over all devices, a process holds ``M / (N * M)`` of it, so per device the
bytes fall as 1 / (total devices) and per process as 1 / N.

Prints a table and writes it as JSON (``--output``). Run:
``python benchmarks/multiprocess.py [--processes 1 2 4] [--devices_per_process 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(out_dir: str, num_params: int, lawa_k: int) -> None:
  """One process of a run: build the states, write this process's device bytes."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from weight_averaging.runner import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.config_from(), timeout_s=120)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import weight_averaging as wa  # pylint: disable=g-import-not-at-top
  from weight_averaging import placement  # pylint: disable=g-import-not-at-top

  side = int(num_params ** 0.5)
  params = {"w": jax.ShapeDtypeStruct((side, side), jnp.float32),
            "b": jax.ShapeDtypeStruct((max(1, num_params - side * side),), jnp.float32)}
  param_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  report = {"process": jax.process_index(), "num_processes": jax.process_count(),
            "num_devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "param_bytes": param_bytes, "jax": jax.__version__}
  for name, averager in (("ema", wa.ema(0.9, placement="sharded")),
                         ("lawa", wa.lawa(lawa_k, 1, placement="sharded"))):
    zeros = jax.jit(lambda: jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), params))
    shardings = averager.state_shardings(jax.eval_shape(averager.init, params))
    state = jax.jit(lambda: averager.init(zeros()), out_shardings=shardings)()
    per_device = placement.device_bytes(state)
    report[name] = {"process_bytes": sum(per_device), "device_bytes": per_device}
  with open(os.path.join(out_dir, f"p{jax.process_index()}.json"), "w") as f:
    json.dump(report, f)


def measure(num_processes: int, devices_per_process: int, num_params: int,
            lawa_k: int) -> dict:
  """Launches one run; returns the per-process reports."""
  with tempfile.TemporaryDirectory() as out:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    subprocess.run(
        [sys.executable, "-m", "weight_averaging.runner.launch", "--num_processes",
         str(num_processes), "--devices_per_process", str(devices_per_process),
         "--timeout_s", "600", "--", sys.executable, os.path.abspath(__file__),
         "--child", out, "--params", str(num_params), "--lawa_k", str(lawa_k)],
        check=True, cwd=ROOT, env=env)
    reports = []
    for p in range(num_processes):
      with open(os.path.join(out, f"p{p}.json")) as f:
        reports.append(json.load(f))
    return reports


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--params", type=int, default=1_000_000)
  parser.add_argument("--lawa_k", type=int, default=10)
  parser.add_argument("--output", default=None, help="write the figures as JSON here")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.params, args.lawa_k)
    return
  rows = []
  for n in args.processes:
    reports = measure(n, args.devices_per_process, args.params, args.lawa_k)
    for name in ("ema", "lawa"):
      per_process = [r[name]["process_bytes"] for r in reports]
      per_device = [b for r in reports for b in r[name]["device_bytes"]]
      rows.append({"averager": name, "num_processes": n,
                   "num_devices": reports[0]["num_devices"],
                   "param_bytes": reports[0]["param_bytes"],
                   "process_bytes_max": max(per_process),
                   "device_bytes_max": max(per_device),
                   "jax": reports[0]["jax"]})
  first = {r["averager"]: r for r in rows if r["num_processes"] == rows[0]["num_processes"]}
  print(f"jax {rows[0]['jax']}: 'sharded' averaging state, {args.params / 1e6:.1f}M "
        f"float32 params, {args.devices_per_process} CPU devices per process "
        f"(EMA: 1 param-size; LAWA k={args.lawa_k}: k + 1 param-sizes)")
  print(f"{'averager':<9}{'procs':>6}{'devices':>8}{'MB/process':>12}{'MB/device':>11}"
        f"{'x first':>9}{'expected':>10}")
  for r in rows:
    base = first[r["averager"]]
    r["ratio_to_first"] = r["process_bytes_max"] / base["process_bytes_max"]
    r["expected_ratio"] = base["num_devices"] / r["num_devices"]
    print(f"{r['averager']:<9}{r['num_processes']:>6}{r['num_devices']:>8}"
          f"{r['process_bytes_max'] / 1e6:>12.3f}{r['device_bytes_max'] / 1e6:>11.3f}"
          f"{r['ratio_to_first']:>9.3f}{r['expected_ratio']:>10.3f}")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"devices_per_process": args.devices_per_process, "params": args.params,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()

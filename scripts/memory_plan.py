"""Prints each submission's device memory per workload and machine, and what 'auto' picks.

  python scripts/memory_plan.py [--hardware="4x A100 40 GB" ...] [--workloads=wmt ...]
  python scripts/memory_plan.py --shipped      # every shipped configuration on the leaderboard's machine
  python scripts/memory_plan.py --write_shapes # regenerate workloads_config/param_shapes/ (needs algoperf)
  python scripts/memory_plan.py --step_memory --workloads=wmt  # XLA's analysis of the optimizer step

Bytes per device of the params, the optimizer state, the averaging state (in the
placement ``averaging_placement: auto`` picks) and the stash, at each submission's
self-tuning point (LAWA k = 20), jit API. The definitions are in
``weight_averaging/studies/memory_plan.py`` and ``weight_averaging/algoperf_api/memory.py``.
"""

import argparse
import os
import sys

try:
  import weight_averaging  # pylint: disable=unused-import
except ImportError:   # run from a checkout without the package installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from weight_averaging.algoperf_api import catalog, memory
from weight_averaging.studies import memory_plan, workload_facts


def write_shapes(directory: str) -> None:
  """One JSON per workload: algoperf's where it has the workload, the LM's config else."""
  os.makedirs(directory, exist_ok=True)
  for workload in workload_facts.ALGOPERF_WORKLOADS:
    if workload == "finewebedu_lm":
      leaves, source = memory_plan.lm_shapes(), memory_plan.LM_SOURCE
    else:
      leaves = memory_plan.algoperf_shapes(workload)
      source = ("algoperf 2c90454f: jax.eval_shape of the jax workload's init_model_fn "
                "(scripts/memory_plan.py --write_shapes)")
    path = os.path.join(directory, f"{workload}.json")
    with open(path, "w") as f:
      f.write(memory_plan.shapes_json(workload, leaves, source))
    print(f"wrote {path}")


def print_step_memory(workloads) -> None:
  """XLA's compile-time analysis of each optimizer's step (self-tuning point) against
  `memory_plan.step_bytes`' prediction, in GiB."""
  gib = lambda n: f"{n / 2**30:.2f}"
  print("| workload | optimizer | params | optimizer state | temporaries (XLA) | "
        "predicted | peak (XLA) |\n|---|---|---:|---:|---:|---:|---:|")
  for workload in workloads:
    params = memory_plan.load_shapes(workload)
    for optimizer in ("nadamw", "shampoo"):
      m = memory_plan.workload_step_memory(workload, optimizer, params=params)
      grads, temp = memory_plan.step_bytes(optimizer, params)
      p = memory.tree_bytes(params)
      print(f"| {workload} | {optimizer} | {gib(p)} | {gib(m.argument - p - grads)} | "
            f"{gib(m.temp)} | {gib(temp)} | {gib(m.peak)} |", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hardware", nargs="+", default=list(memory_plan.HARDWARE),
                      choices=list(memory_plan.HARDWARE))
  parser.add_argument("--workloads", nargs="+",
                      default=list(workload_facts.ALGOPERF_WORKLOADS),
                      choices=list(workload_facts.ALGOPERF_WORKLOADS))
  parser.add_argument("--submissions", nargs="+", default=list(catalog.NAMES),
                      choices=list(catalog.NAMES))
  parser.add_argument("--shipped", action="store_true",
                      help=f"check every shipped configuration on {memory_plan.LEADERBOARD}")
  parser.add_argument("--write_shapes", action="store_true",
                      help=f"write {memory_plan.SHAPES_DIR} (needs algoperf)")
  parser.add_argument("--step_memory", action="store_true",
                      help="XLA's compile-time analysis of each optimizer's step on "
                      "--workloads (a compile each: slow) against the plan's formula")
  args = parser.parse_args(argv)
  if args.step_memory:
    print_step_memory(args.workloads)
    return 0
  if args.write_shapes:
    write_shapes(memory_plan.SHAPES_DIR)
    return 0
  if args.shipped:
    bad = 0
    for what, r in memory_plan.shipped_plans():
      known = r.api == "pmap" and (r.workload, r.submission) in memory_plan.PMAP_DOES_NOT_FIT
      if not r.fits:
        bad += not known
        print(f"{'known, documented' if known else 'DOES NOT FIT'}: {what} {r.workload} "
              f"{r.submission} {r.placement}: {memory.human(r.footprint.device)} > "
              f"{memory.human(memory.FRACTION * r.limit)}")
    print(f"{bad} shipped configuration(s) that do not fit on {memory_plan.LEADERBOARD}")
    return 1 if bad else 0
  rows = memory_plan.plan(args.workloads, args.submissions, args.hardware)
  print("\n".join(memory_plan.table(rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

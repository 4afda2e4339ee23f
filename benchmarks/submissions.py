"""Cost of averaging in an AlgoPerf submission's step, and of prepare_for_eval.

For a wider student on the embedded workload (``--hidden``), through the package's
jit submissions and the embedded runner's calling convention:

* step time of nadamw_ema and nadamw_lawa relative to nadamw: rounds of
  interleaved runs (one block of steps per submission per round), the median of the
  per-round ratios; averaging every ``--every`` steps, as the paper recommends;
* ``prepare_for_eval`` time relative to one nadamw step, for LAWA k = 2, 20, 50.

Figures are printed and written as JSON (``--output``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from weight_averaging import algoperf_api, runner, workloads


def make(name, k=20, every=64):
  make_averager = {"nadamw": None,
                   "nadamw_ema": algoperf_api.ema_from_hyperparameters,
                   "nadamw_lawa": algoperf_api.lawa_from_hyperparameters}[name]
  submission = algoperf_api.build_submission(
      make_optimizer=algoperf_api.nadamw_from_hyperparameters,
      make_averager=make_averager, api="jit")
  point = {"dropout_rate": 0.0, "label_smoothing": 0.0, "learning_rate": 1e-3,
           "one_minus_beta1": 0.1, "beta2": 0.999, "weight_decay": 0.0,
           "warmup_factor": 0.05, "averaging_every": every, "ema_beta": 0.9,
           "lawa_k": k, "averaging_start_step": 0}
  return submission, runner.as_hyperparameters(point)


class Trainer:
  def __init__(self, workload, name, batch_size, **kw):
    self.workload = workload
    self.submission, self.hparams = make(name, **kw)
    rng = jax.random.PRNGKey(0)
    self.params, self.model_state = workload.init_model_fn(rng)
    self.state = self.submission.init_optimizer_state(
        workload, self.params, self.model_state, self.hparams, rng)
    self.queue = workload.input_queue(rng, batch_size)
    self.step = 0

  def train(self, steps):
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(self.queue)
      self.state, self.params, self.model_state = self.submission.update_params(
          self.workload, self.params, None, self.model_state, self.hparams, batch,
          None, self.state, [], self.step, jax.random.PRNGKey(self.step))
      self.step += 1
    jax.block_until_ready(self.params)
    return (time.perf_counter() - start) / steps

  def prepare(self):
    start = time.perf_counter()
    self.state, self.params, self.model_state = self.submission.prepare_for_eval(
        self.workload, self.params, None, self.model_state, self.hparams, None,
        self.state, [], self.step, jax.random.PRNGKey(0))
    jax.block_until_ready(self.params)
    return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--every", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps_per_round", type=int, default=128)
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  workload = workloads.get_workload(api="jit")
  workload = type(workload)(api="jit", hidden=tuple(args.hidden))
  num_params = sum(int(np.prod(s.shape_tuple))
                   for s in jax.tree_util.tree_leaves(workload.param_shapes,
                                                      is_leaf=lambda x: hasattr(x, "shape_tuple")))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s); "
        f"student {args.hidden}: {num_params / 1e6:.2f}M params, batch {args.batch_size}, "
        f"averaging every {args.every} steps")

  trainers = {name: Trainer(workload, name, args.batch_size, every=args.every)
              for name in ("nadamw", "nadamw_ema", "nadamw_lawa")}
  for t in trainers.values():  # compile and warm up
    t.train(args.every + 1)
  per_round = {name: [] for name in trainers}
  for _ in range(args.rounds):
    for name, t in trainers.items():
      per_round[name].append(t.train(args.steps_per_round))
  base = per_round["nadamw"]
  rows = {"step_ms": {n: 1e3 * statistics.median(v) for n, v in per_round.items()},
          "ratio_to_nadamw": {n: statistics.median(a / b for a, b in zip(v, base))
                              for n, v in per_round.items()}}
  print(f"\nStep time (median of {args.rounds} interleaved rounds of "
        f"{args.steps_per_round} steps):")
  for n in trainers:
    print(f"  {n:<12} {rows['step_ms'][n]:8.2f} ms   x{rows['ratio_to_nadamw'][n]:.3f}")

  step_s = statistics.median(base)
  rows["prepare_for_eval"] = []
  print("\nprepare_for_eval (LAWA), relative to one nadamw step:")
  for k in (2, 20, 50):
    t = Trainer(workload, "nadamw_lawa", args.batch_size, k=k, every=1)
    t.train(k + 2)
    t.prepare()  # compile
    times = []
    for _ in range(5):
      t.train(1)
      times.append(t.prepare())
    ms = 1e3 * statistics.median(times)
    rows["prepare_for_eval"].append({"k": k, "ms": ms, "in_steps": ms / 1e3 / step_s})
    print(f"  k={k:<3} {ms:8.2f} ms = {ms / 1e3 / step_s:.2f} steps")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()

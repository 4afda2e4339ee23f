"""The embedded runner's own overhead per step.

Times `--steps` steps of NadamW+LAWA on the embedded workload twice, interleaved
over `--rounds` rounds: through `runner.run_trial` (data selection, submission
time accounting, the loop) with no eval inside the timed window, and as a bare
loop calling the same submission's `update_params` on the same batches. Prints the
median per-step wall time of each and their ratio. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
from absl import logging

from weight_averaging import runner, workloads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  path = os.path.join(REPO, "submissions", "jit", "nadamw_lawa", "submission.py")
  point = {"dropout_rate": 0.0, "label_smoothing": 0.0, "learning_rate": 0.01,
           "one_minus_beta1": 0.1, "beta2": 0.999, "weight_decay": 0.0,
           "warmup_factor": 0.05, "averaging_every": 10, "lawa_k": 20}
  hparams = runner.as_hyperparameters(point)
  workload = workloads.get_workload(api="jit")
  workload.max_allowed_runtime_sec = float("inf")

  def through_runner(tmp):
    submission = runner.load_submission(path)
    start = time.perf_counter()
    # One eval, at the last step: the per-step cost below excludes it.
    result = runner.run_trial(workload, submission, hparams, log_dir=tmp, rng_seed=0,
                              max_global_steps=args.steps, eval_every_steps=args.steps,
                              save_checkpoints=False, stop_at_target=False)
    elapsed = time.perf_counter() - start
    eval_time = result.eval_results[-1]["accumulated_eval_time"]
    return (elapsed - eval_time) / args.steps

  def bare_loop():
    submission = runner.load_submission(path)
    rng = jax.random.PRNGKey(0)
    data_rng, opt_rng, model_rng, rng = jax.random.split(rng, 4)
    params, model_state = workload.init_model_fn(model_rng)
    state = submission.init_optimizer_state(workload, params, model_state, hparams, opt_rng)
    # The embedded workload is not in AlgoPerf's batch-size table: its default is used.
    queue = workload.input_queue(data_rng, workload.default_batch_size)
    start = time.perf_counter()
    for step in range(args.steps):
      state, params, model_state = submission.update_params(
          workload, params, None, model_state, hparams, next(queue), None, state, [], step,
          jax.random.fold_in(rng, step))
    jax.block_until_ready(params)
    return (time.perf_counter() - start) / args.steps

  with tempfile.TemporaryDirectory() as tmp:
    through_runner(os.path.join(tmp, "warm"))
    bare_loop()
    runs, bares = [], []
    for r in range(args.rounds):
      runs.append(through_runner(os.path.join(tmp, f"r{r}")))
      bares.append(bare_loop())
  ratio = statistics.median(a / b for a, b in zip(runs, bares))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s); "
        f"{args.steps} steps x {args.rounds} interleaved rounds (compilation included in both)")
  print(f"  runner loop  {1e3 * statistics.median(runs):7.3f} ms/step")
  print(f"  bare loop    {1e3 * statistics.median(bares):7.3f} ms/step")
  print(f"  runner / bare  x{ratio:.3f}")


if __name__ == "__main__":
  main()

"""Command line: ``python -m weight_averaging demo``.

The demo trains a small noisy regression problem with Adam at a constant learning
rate, the regime where averaging helps most visibly: the live weights bounce around
the optimum at the scale of the step size, while EMA and LAWA averages of the
trajectory sit much closer to it. It prints the held-out loss of the live weights
and of both averages as training goes on.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import weight_averaging as wa


def _regression_data(seed: int, num_train: int, num_eval: int, dim: int):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(dim,)).astype(np.float32)
  def split(n):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = x @ w_true + 0.5 * rng.normal(size=(n,)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)
  return split(num_train), split(num_eval)


def demo(seed: int = 0, steps: int = 2000, every: int = 8, out=sys.stdout) -> dict:
  """Trains once and records eval losses of live, EMA and LAWA weights."""
  (x_train, y_train), (x_eval, y_eval) = _regression_data(seed, 4096, 4096, 64)
  batch_size = 32
  optimizer = optax.adam(3e-2)
  averagers = {"ema": wa.ema(0.9, every=every), "lawa": wa.lawa(20, every=every)}

  def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  @jax.jit
  def step(params, opt_state, avg_states, key):
    idx = jax.random.randint(key, (batch_size,), 0, x_train.shape[0])
    grads = jax.grad(loss)(params, x_train[idx], y_train[idx])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    avg_states = {name: averagers[name].update(s, params)
                  for name, s in avg_states.items()}
    return params, opt_state, avg_states

  @jax.jit
  def evaluate(params, avg_states):
    losses = {"live": loss(params, x_eval, y_eval)}
    for name, s in avg_states.items():
      losses[name] = loss(averagers[name].average(s, params), x_eval, y_eval)
    return losses

  params = {"w": jnp.zeros((x_train.shape[1],)), "b": jnp.zeros(())}
  opt_state = optimizer.init(params)
  avg_states = {name: a.init(params) for name, a in averagers.items()}
  key = jax.random.PRNGKey(seed)
  history = []
  start = time.perf_counter()
  print(f"Adam at a constant learning rate on noisy linear regression; averaging every "
        f"{every} steps (EMA beta 0.9, LAWA k 20). Held-out MSE (noise floor 0.25):",
        file=out)
  print(f"{'step':>6} {'live':>9} {'EMA':>9} {'LAWA':>9}", file=out)
  for t in range(1, steps + 1):
    params, opt_state, avg_states = step(params, opt_state, avg_states,
                                         jax.random.fold_in(key, t))
    if t % (steps // 10) == 0:
      losses = {k: float(v) for k, v in evaluate(params, avg_states).items()}
      history.append({"step": t, **losses})
      print(f"{t:>6} {losses['live']:>9.4f} {losses['ema']:>9.4f} {losses['lawa']:>9.4f}",
            file=out)
  final = history[-1]
  print(f"Final held-out MSE: live {final['live']:.4f}, EMA {final['ema']:.4f} "
        f"({final['ema'] / final['live']:.0%} of live), LAWA {final['lawa']:.4f} "
        f"({final['lawa'] / final['live']:.0%} of live); "
        f"{time.perf_counter() - start:.1f}s.", file=out)
  return {"history": history}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m weight_averaging")
  commands = parser.add_subparsers(dest="command", required=True)
  demo_parser = commands.add_parser("demo", help="see averaging beat the live weights")
  demo_parser.add_argument("--seed", type=int, default=0)
  demo_parser.add_argument("--steps", type=int, default=2000)
  demo_parser.add_argument("--every", type=int, default=8)
  args = parser.parse_args(argv)
  if args.steps < 10:
    parser.error(f"--steps must be at least 10, got {args.steps}")
  if args.every < 1:
    parser.error(f"--every must be at least 1, got {args.every}")
  demo(seed=args.seed, steps=args.steps, every=args.every)
  return 0


if __name__ == "__main__":
  sys.exit(main())

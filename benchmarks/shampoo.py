"""Compile time and step time of Distributed Shampoo relative to NadamW.

For each parameter pytree and optimizer, one jitted step (optimizer update and
``apply_updates``) is compiled and timed:

* ``compile_s``: ``lower().compile()`` wall time (AlgoPerf counts compilation);
* ``step_s``: median time of a step that reuses the roots;
* ``root_step_s``: time of a step that recomputes them (``count % every == 0``);
* ``amortized_s``: ``step_s + (root_step_s - step_s) / every``, the mean step time
  over one recompute period;

and each Shampoo row is divided by NadamW's row on the same pytree. The goals of
issue 6 are a compile ratio within 3x and an amortized ratio within 1.5x on CPU.

Pytrees: ``embedded`` (the embedded workload's 32-64-64-10 student), ``mlp``
(784-1024-1024-10, a small-workload stand-in) and
``transformer`` (a ~50M-parameter transformer-shaped pytree: embedding, per layer
q/k/v/o kernels, a 4x MLP and layer-norm scales; the embedding exceeds
``skip_dim_gt`` and gets the graft only).

Whole training steps (``--workload``): the jit submissions ``nadamw`` and ``shampoo``
(Meta's recipe, roots every 20 and 100 steps) on the embedded workload's model
(``--hidden``, batch ``--batch_size``), through ``update_params``: the first call
(compilation included, as AlgoPerf counts it) and the mean step time over whole
recompute periods, each divided by NadamW's.

Run: ``python benchmarks/shampoo.py [--trees mlp transformer] [--workload] [--output out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from weight_averaging import algoperf_api, runner, workloads
from weight_averaging.optimizers import nadamw as nadamw_lib
from weight_averaging.optimizers import shampoo


def embedded_shapes():
  """The embedded workload's student MLP (32-64-64-10)."""
  dims = (32, 64, 64, 10)
  return {f"dense{i}": {"kernel": (a, b), "bias": (b,)}
          for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}


def mlp_shapes():
  dims = (784, 1024, 1024, 10)
  return {f"dense{i}": {"kernel": (a, b), "bias": (b,)}
          for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}


def transformer_shapes(num_layers=10, d_model=512, vocab=32000, mlp_ratio=4):
  shapes = {"embedding": (vocab, d_model), "final_norm": (d_model,)}
  for i in range(num_layers):
    shapes[f"layer{i:02d}"] = {
        "query": (d_model, d_model), "key": (d_model, d_model),
        "value": (d_model, d_model), "out": (d_model, d_model),
        "mlp_in": (d_model, mlp_ratio * d_model), "mlp_in_bias": (mlp_ratio * d_model,),
        "mlp_out": (mlp_ratio * d_model, d_model), "mlp_out_bias": (d_model,),
        "norm1": (d_model,), "norm2": (d_model,)}
  return shapes


TREES = {"embedded": embedded_shapes, "mlp": mlp_shapes, "transformer": transformer_shapes}


def optimizers():
  yield "nadamw", 1, nadamw_lib.nadamw(1e-3, weight_decay=0.1)
  for every in (20, 100):
    yield (f"shampoo google every={every}", every,
           shampoo.distributed_shampoo(1e-3, preset="google", preconditioning_every=every,
                                       start_preconditioning_step=0, weight_decay=0.1))
  for every in (20, 100):
    yield (f"shampoo meta every={every}", every,
           shampoo.distributed_shampoo(1e-3, preset="meta", preconditioning_every=every,
                                       weight_decay=0.1))


def _block(tree):
  jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def _with_count_zero(state):
  """The optimizer state with Shampoo's step count set to 0 (a root step next)."""
  if isinstance(state, shampoo.ScaleByShampooState):
    return state._replace(count=jnp.zeros_like(state.count))
  if isinstance(state, tuple) and not hasattr(state, "_fields"):
    return tuple(_with_count_zero(s) for s in state)
  return state


def measure(shapes, name, every, opt, repeats):
  rng = np.random.default_rng(0)
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02), shapes,
      is_leaf=is_shape)
  grads = jax.tree_util.tree_map(lambda p: p * 0.1 + 1e-3, params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start

  # Warm up, then time steps that reuse the roots (count % every != 0) ...
  params, state = compiled(params, state, grads)
  _block((params, state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = compiled(params, state, grads)
    _block(out)
    times.append(time.perf_counter() - start)
    params, state = out
  # ... and steps that recompute them: the count is reset to 0 before each.
  root_times = []
  for _ in range(repeats if every > 1 else 0):
    state = _with_count_zero(state)
    _block(state)
    start = time.perf_counter()
    out = compiled(params, state, grads)
    _block(out)
    root_times.append(time.perf_counter() - start)
    params, state = out
  step_s = statistics.median(times)
  root_step_s = statistics.median(root_times) if root_times else step_s
  amortized_s = step_s + (root_step_s - step_s) / every
  return dict(optimizer=name, every=every, compile_s=compile_s, step_s=step_s,
              root_step_s=root_step_s, amortized_s=amortized_s)


def measure_submission(workload, name, every, batch_size, periods):
  """First `update_params` (with compilation) and the mean step over `periods` x `every`."""
  make_optimizer = {"nadamw": algoperf_api.nadamw_from_hyperparameters,
                    "shampoo": algoperf_api.shampoo_from_hyperparameters}[name]
  submission = algoperf_api.build_submission(make_optimizer, api="jit")
  point = {"dropout_rate": 0.0, "label_smoothing": 0.0, "learning_rate": 1e-3,
           "one_minus_beta1": 0.1, "beta2": 0.999, "weight_decay": 0.0,
           "warmup_factor": 0.05}
  if name == "shampoo":
    point.update(shampoo_preset="meta", preconditioning_every=every,
                 start_preconditioning_step=every)
  hparams = runner.as_hyperparameters(point)
  rng = jax.random.PRNGKey(0)
  params, model_state = workload.init_model_fn(rng)
  state = submission.init_optimizer_state(workload, params, model_state, hparams, rng)
  queue = workload.input_queue(rng, batch_size)

  def train(first, steps):
    nonlocal state, params, model_state
    for step in range(first, first + steps):
      state, params, model_state = submission.update_params(
          workload, params, None, model_state, hparams, next(queue), None, state, [],
          step, jax.random.PRNGKey(step))
    jax.block_until_ready(params)

  start = time.perf_counter()
  train(0, 1)
  first_s = time.perf_counter() - start
  train(1, 2 * every - 1)  # past start_preconditioning_step, to a period boundary
  start = time.perf_counter()
  train(2 * every, periods * every)
  return dict(optimizer=name if name == "nadamw" else f"shampoo meta every={every}",
              every=every, first_call_s=first_s,
              amortized_s=(time.perf_counter() - start) / (periods * every))


def workload_rows(hidden, batch_size, periods):
  workload = workloads.get_workload(api="jit")
  workload = type(workload)(api="jit", hidden=tuple(hidden))
  rows = [measure_submission(workload, "nadamw", 20, batch_size, periods)]
  for every in (20, 100):
    rows.append(measure_submission(workload, "shampoo", every, batch_size, periods))
  print(f"\nembedded workload, student {list(hidden)}, batch {batch_size}: whole training "
        f"steps through update_params (jit), mean over {periods} recompute periods")
  print(f"{'submission':28s} {'first call s':>13s} {'amortized s':>12s} {'first x':>8s} "
        f"{'amortized x':>12s}")
  for row in rows:
    row["first_call_ratio"] = row["first_call_s"] / rows[0]["first_call_s"]
    row["amortized_ratio"] = row["amortized_s"] / rows[0]["amortized_s"]
    print(f"{row['optimizer']:28s} {row['first_call_s']:13.2f} {row['amortized_s']:12.5f} "
          f"{row['first_call_ratio']:8.2f} {row['amortized_ratio']:12.2f}", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", nargs="*", default=list(TREES), choices=list(TREES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--output", default=None, help="write the rows as JSON here")
  parser.add_argument("--workload", action="store_true",
                      help="also time whole training steps on the embedded workload")
  parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--periods", type=int, default=2)
  args = parser.parse_args()
  rows = []
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  for tree in args.trees:
    shapes = TREES[tree]()
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    n = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(shapes, is_leaf=is_shape))
    print(f"\n{tree}: {n / 1e6:.1f}M parameters")
    print(f"{'optimizer':28s} {'compile s':>10s} {'step s':>9s} {'root step s':>12s} "
          f"{'amortized s':>12s} {'compile x':>10s} {'amortized x':>12s}")
    base = None
    for name, every, opt in optimizers():
      row = dict(tree=tree, num_params=n, **measure(shapes, name, every, opt, args.repeats))
      base = base or row
      row["compile_ratio"] = row["compile_s"] / base["compile_s"]
      row["amortized_ratio"] = row["amortized_s"] / base["amortized_s"]
      rows.append(row)
      print(f"{name:28s} {row['compile_s']:10.2f} {row['step_s']:9.4f} "
            f"{row['root_step_s']:12.4f} {row['amortized_s']:12.4f} "
            f"{row['compile_ratio']:10.2f} {row['amortized_ratio']:12.2f}", flush=True)
  if args.workload:
    rows += [dict(tree="embedded_workload", **row)
             for row in workload_rows(args.hidden, args.batch_size, args.periods)]
  if args.output:
    with open(args.output, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

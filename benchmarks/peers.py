"""Weight averaging side by side: ours, the authors' scheme, optax and PyTorch's libraries.

One process, one parameter tree (square float32 leaves; ~50M params, and ~250M where
memory allows), one machine. Each implementation's cost is measured against its own
framework's plain optimizer step (AdamW on fixed gradients: JAX/optax and PyTorch),
in interleaved rounds (a block of plain steps, then the same block with averaging;
the median of the per-round differences), and against the memory-traffic limit: an
EMA update must read and write the average once (2 param-sizes), so the limit is the
time of one in-place read-and-write of the same arrays in that framework.

* ours: ``wa.ema`` and ``wa.lawa(k=20)`` in every placement (one device: ``sharded``
  is one shard; on the CPU backend ``host`` memory is the same RAM and XLA drops the
  transfers), fused into the jitted step, sampling every step and every 64 steps;
  ``prepare_for_eval`` is the jitted ``average``;
* the authors' scheme in JAX, as they built it in PyTorch: a host-RAM deque of k
  copies filled by blocking device-to-host copies, the mean recomputed from all k at
  every eval;
* optax's stateless ``incremental_update`` EMA in the jitted step;
* PyTorch on CPU: ``AveragedModel`` with ``get_ema_multi_avg_fn``, timm's
  ``ModelEmaV3`` (foreach lerp) and ema-pytorch's ``EMA``, against ``torch.optim.AdamW``.

Run in the benchmark's own environment (``make peers`` builds ``.venvs/peers`` with
torch, timm and ema-pytorch; they are never the package's requirements). Without
torch the PyTorch rows are skipped with a message. Prints a table; ``--output``
writes it as JSON.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import weight_averaging as wa

LEAF_SIDE = 2048
BETA, K = 0.999, 20


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def leaf_shapes(num_params: int):
  return [(LEAF_SIDE, LEAF_SIDE)] * max(1, num_params // LEAF_SIDE**2)


def interleaved(plain, averaged, steps: int, rounds: int, every: int = 1):
  """Per-step costs of averaging, from interleaved blocks of timed steps.

  `plain(n)` and `averaged(n)` run n steps and return each step's time; the
  averaged loop's first step (a warm-up) samples, then every `every`-th. Returns
  ``(sampled, skipped, plain)``: the median extra time of a sampling step and of a
  step that does not sample over the median plain step, and that plain step.
  """
  plain(1), averaged(1)  # compile and warm up; `averaged` has taken step 0
  base, sampled, skipped = [], [], []
  taken = 1
  for _ in range(rounds):
    base += plain(steps)
    for t in averaged(steps):
      (sampled if taken % every == 0 else skipped).append(t)
      taken += 1
  step = statistics.median(base)
  return (statistics.median(sampled) - step,
          statistics.median(skipped) - step if skipped else 0.0, step)


def timed_steps(step, n: int):
  """Runs `step()` n times, blocking on each; returns the times."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def median_time(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ----------------------------------------------------------------------------
# JAX.


class JaxLoop:
  """A jitted AdamW step on fixed gradients, optionally fused with an averaging update."""

  def __init__(self, shapes):
    self.optimizer = optax.adamw(1e-4)
    self.params = [jnp.full(s, 1.0 + i, jnp.float32) for i, s in enumerate(shapes)]
    self.grads = [jnp.full(s, 1e-3, jnp.float32) for s in shapes]
    self.opt_state = self.optimizer.init(self.params)

    def step(params, opt_state, grads):
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._step = step
    self.plain_step = jax.jit(step, donate_argnums=(0, 1))

  def plain(self, n: int):
    def step():
      self.params, self.opt_state = self.plain_step(self.params, self.opt_state, self.grads)
      jax.block_until_ready(self.params)

    return timed_steps(step, n)

  def fused(self, update, state, **jit_kwargs):
    """A block runner for ``step`` then ``state = update(state, params)`` in one program."""
    def step(params, opt_state, extra, grads):
      params, opt_state = self._step(params, opt_state, grads)
      return params, opt_state, update(extra, params)

    jitted = jax.jit(step, donate_argnums=(0, 1, 2), **jit_kwargs)
    box = [state]

    def step():
      self.params, self.opt_state, box[0] = jitted(self.params, self.opt_state, box[0],
                                                   self.grads)
      jax.block_until_ready((self.params, box[0]))

    return (lambda n: timed_steps(step, n)), box

  def copy_limit(self) -> float:
    """One in-place read-and-write of a param-sized tree (2 param-sizes)."""
    bump = jax.jit(lambda t: [x + 1.0 for x in t], donate_argnums=0)
    box = [[jnp.copy(p) for p in self.params]]

    def run():
      box[0] = jax.block_until_ready(bump(box[0]))

    return median_time(run, repeats=9)


def ours_row(loop: JaxLoop, averager, every: int, args):
  """Costs of one of ours; its state is freed on return."""
  shardings = averager.state_shardings(jax.eval_shape(averager.init, loop.params))
  state = jax.jit(averager.init, out_shardings=shardings)(loop.params)
  run, box = loop.fused(averager.update, state, out_shardings=(None, None, shardings))
  del state  # donated into `box`
  steps, rounds = (64, 5) if every == 64 else (args.steps, args.rounds)
  cost, skip, base = interleaved(loop.plain, run, steps, rounds, every)
  average = jax.jit(averager.average)
  eval_s = median_time(lambda: jax.block_until_ready(average(box[0], loop.params)))
  return {"every": every, "cost_s": cost, "skip_s": skip, "plain_step_s": base,
          "eval_s": eval_s}


def ours_rows(loop: JaxLoop, args, shapes):
  rows = []
  size = 4 * sum(int(np.prod(s)) for s in shapes)
  for name, make, extra in (("ours EMA", lambda p, e: wa.ema(BETA, every=e, placement=p), 1),
                            ("ours LAWA k=20", lambda p, e: wa.lawa(K, every=e, placement=p),
                             K + 1)):
    if extra * size > 0.5 * available_bytes():
      rows.append({"implementation": name, "skipped": f"needs {extra} param-sizes more"})
      continue
    for where in wa.placement.PLACEMENTS:
      for every in (1, 64) if len(shapes) * LEAF_SIDE**2 <= args.every64_max else (1,):
        row = ours_row(loop, make(where, every), every, args)
        rows.append(dict(row, implementation=name, placement=where, extra_param_sizes=extra))
        gc.collect()
  return rows


def optax_row(loop: JaxLoop, args):
  ema = [jnp.copy(p) for p in loop.params]
  run, box = loop.fused(lambda e, p: optax.incremental_update(p, e, 1.0 - BETA), ema)
  cost, _, base = interleaved(loop.plain, run, args.steps, args.rounds)
  del box
  return {"implementation": "optax incremental_update EMA", "placement": "device",
          "every": 1, "cost_s": cost, "skip_s": 0.0, "plain_step_s": base,
          "eval_s": 0.0, "extra_param_sizes": 1}


def authors_row(loop: JaxLoop, args, shapes):
  """A deque of k host copies, blocking device-to-host copies; mean of all k at eval."""
  size = 4 * sum(int(np.prod(s)) for s in shapes)
  if K * size > 0.5 * available_bytes():
    return {"implementation": "authors' deque (JAX)", "skipped": f"needs {K} param-sizes"}
  queue = collections.deque(maxlen=K)

  def step():
    loop.params, loop.opt_state = loop.plain_step(loop.params, loop.opt_state, loop.grads)
    # The PyTorch code's `p.detach().cpu().clone()`: a blocking copy to host RAM.
    queue.append([np.array(x, copy=True) for x in jax.device_get(loop.params)])

  cost, _, base = interleaved(loop.plain, lambda n: timed_steps(step, n), args.steps,
                              args.rounds)

  def prepare_for_eval():
    mean = [np.mean(np.stack([q[i] for q in queue]), axis=0) for i in range(len(shapes))]
    jax.block_until_ready(jax.device_put(mean))

  eval_s = median_time(prepare_for_eval, repeats=3)
  queue.clear()
  return {"implementation": "authors' deque (JAX)", "placement": "host RAM", "every": 1,
          "cost_s": cost, "skip_s": 0.0, "plain_step_s": base, "eval_s": eval_s,
          "extra_param_sizes": K}


def jax_rows(args, shapes):
  loop = JaxLoop(shapes)
  limit = loop.copy_limit()
  rows = ours_rows(loop, args, shapes) + [optax_row(loop, args), authors_row(loop, args, shapes)]
  for r in rows:
    r.update(framework=f"jax {jax.__version__}", limit_s=limit)
  del loop
  gc.collect()
  return rows


# ----------------------------------------------------------------------------
# PyTorch.


def torch_averagers(torch):
  """(name, make(model) -> update()) for the PyTorch implementations that import."""
  from torch.optim import swa_utils
  makers = [("torch AveragedModel EMA", lambda m: swa_utils.AveragedModel(
      m, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(BETA)), "update_parameters")]
  try:
    from timm.utils.model_ema import ModelEmaV3
    makers.append(("timm ModelEmaV3", lambda m: ModelEmaV3(m, decay=BETA), "update"))
  except ImportError as e:
    print(f"timm skipped: {e}")
  try:
    from ema_pytorch import EMA
    makers.append(("ema-pytorch EMA", lambda m: EMA(
        m, beta=BETA, update_after_step=0, update_every=1), "update"))
  except ImportError as e:
    print(f"ema-pytorch skipped: {e}")
  return makers


def torch_rows(args, shapes):
  try:
    import torch
  except ImportError:
    return [{"implementation": "PyTorch", "skipped": "torch is not installed: make peers"}]
  torch.set_num_threads(args.torch_threads)
  model = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.full(s, 1.0 + i)) for i, s in enumerate(shapes)])
  for p in model:
    p.grad = torch.full_like(p, 1e-3)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

  def plain(n: int):
    return timed_steps(optimizer.step, n)

  limit = torch_copy_limit(torch, model)
  rows = []
  for name, make, method in torch_averagers(torch):
    cost, base = torch_cost(name, make(model), method, model, optimizer, plain, args)
    rows.append({"implementation": name, "placement": "cpu", "every": 1, "cost_s": cost,
                 "skip_s": 0.0, "plain_step_s": base, "eval_s": 0.0,
                 "extra_param_sizes": 1, "framework": f"torch {torch.__version__}",
                 "limit_s": limit})
    gc.collect()
  return rows


def torch_copy_limit(torch, model) -> float:
  """One in-place read-and-write of a param-sized list of tensors (2 param-sizes)."""
  copies = [p.detach().clone() for p in model]
  with torch.no_grad():
    return median_time(lambda: torch._foreach_add_(copies, 1.0), repeats=9)


def torch_cost(name, averaged_model, method, model, optimizer, plain, args):
  """(averaging cost per step, plain step) for one PyTorch averager; freed on return."""
  update = getattr(averaged_model, method)
  takes_model = not name.startswith("ema-pytorch")  # EMA.update() knows its model

  def step():
    optimizer.step()
    update(model) if takes_model else update()

  cost, _, base = interleaved(plain, lambda n: timed_steps(step, n), args.steps, args.rounds)
  return cost, base


# ----------------------------------------------------------------------------


def print_table(num_params: int, rows):
  print(f"\n{num_params / 1e6:.0f}M float32 params ({4 * num_params / 2**20:.0f} MiB); "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"{'implementation':<30}{'placement':<12}{'every':>6}{'ms/sample':>11}"
        f"{'x step':>8}{'x limit':>9}{'skip ms':>9}{'eval ms':>9}{'memory':>8}")
  for r in rows:
    if "skipped" in r:
      print(f"{r['implementation']:<30}skipped: {r['skipped']}")
      continue
    print(f"{r['implementation']:<30}{r['placement']:<12}{r['every']:>6}"
          f"{1e3 * r['cost_s']:>11.1f}{r['cost_s'] / r['plain_step_s']:>8.2f}"
          f"{r['cost_s'] / r['limit_s']:>9.2f}{1e3 * r['skip_s']:>9.1f}"
          f"{1e3 * r['eval_s']:>9.1f}"
          f"{r['extra_param_sizes']:>7}x")
  limits = {r["framework"]: r["limit_s"] for r in rows if "limit_s" in r}
  steps = {}
  for r in rows:
    if "plain_step_s" in r:
      steps.setdefault(r["framework"], []).append(r["plain_step_s"])
  for framework, limit in limits.items():
    print(f"{framework}: plain AdamW step {1e3 * statistics.median(steps[framework]):.1f} ms; "
          f"limit (read and write the average once) {1e3 * limit:.1f} ms")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="50331648,251658240",
                      help="tree sizes in params; a size that does not fit is skipped")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--frameworks", default="jax,torch")
  parser.add_argument("--torch_threads", type=int, default=1,
                      help="PyTorch's intra-op threads: on a CPU shared with other work its "
                           "OpenMP threads spin at each barrier (a foreach add of 50M floats "
                           "took 96 ms with 2 threads, 6.7 ms with 1, under load)")
  parser.add_argument("--every64_max", type=int, default=60_000_000,
                      help="largest tree (params) also timed sampling every 64 steps")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}")
  results = []
  for num_params in (int(x) for x in args.sizes.split(",")):
    shapes = leaf_shapes(num_params)
    size = 4 * sum(int(np.prod(s)) for s in shapes)
    # params, grads and AdamW's two moments, an average, a temporary: 6 param-sizes.
    if 6 * size > 0.6 * available_bytes():
      print(f"\n{num_params / 1e6:.0f}M params skipped: needs about {6 * size / 2**30:.1f} "
            f"GiB, {available_bytes() / 2**30:.1f} GiB available")
      continue
    rows = []
    if "jax" in args.frameworks:
      rows += jax_rows(args, shapes)
    if "torch" in args.frameworks:
      rows += torch_rows(args, shapes)
    print_table(num_params, rows)
    results.append({"num_params": num_params, "load_average": os.getloadavg()[0],
                    "rows": rows})
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"jax": jax.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()

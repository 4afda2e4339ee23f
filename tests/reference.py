"""Independent NumPy references for the averagers: brute force, float64, no cleverness."""

import numpy as np


def sampled_indices(num_steps, every, start_step):
  """Indices t of the update calls whose params are sampled (t = 0-based step)."""
  return [t for t in range(num_steps) if t >= start_step and t % every == 0]


def ema_reference(trajectory, beta, every, start_step, debias):
  """EMA of the sampled params after each step; None before the first sample."""
  out, avg, n = [], None, 0
  for t, params in enumerate(trajectory):
    if t >= start_step and t % every == 0:
      x = params.astype(np.float64)
      n += 1
      if debias:
        avg = (1 - beta) * x if avg is None else beta * avg + (1 - beta) * x
      else:
        avg = x if avg is None else beta * avg + (1 - beta) * x
    if avg is None:
      out.append(None)
    else:
      out.append(avg / (1 - beta ** n) if debias else avg)
  return out


def lawa_reference(trajectory, k, every, start_step):
  """Mean of the latest k sampled params after each step; None before the first."""
  out, queue = [], []
  for t, params in enumerate(trajectory):
    if t >= start_step and t % every == 0:
      queue = (queue + [params.astype(np.float64)])[-k:]
    out.append(np.mean(queue, axis=0) if queue else None)
  return out

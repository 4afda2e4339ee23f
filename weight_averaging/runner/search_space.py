"""Tuning search spaces in the official runner's two formats, and its hyperparameters.

A search space is a JSON file holding either

* a list of points (``[{"learning_rate": 1e-3, ...}, ...]``): trial ``n`` runs point
  ``n``, and every point names the same hyperparameters; or
* a dict of ranges, one per hyperparameter: ``{"min", "max", "scaling"}`` with
  ``scaling`` ``linear`` or ``log``, or ``{"feasible_points": [...]}``. Trial ``n``
  takes the ``n``-th point of a Halton sequence (the hyperparameters, sorted by name,
  take the primes 2, 3, 5, ... as bases), shifted modulo 1 by the seed's point in
  base 97, so that a seed gives the same points on every machine.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Dict, List

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)
_SEED_BASE = 97


def _halton(index: int, base: int) -> float:
  """The `index`-th element of the van der Corput sequence in `base`, in [0, 1)."""
  result, f = 0.0, 1.0
  while index > 0:
    f /= base
    index, digit = divmod(index, base)
    result += f * digit
  return result


def _value(name: str, spec: Dict[str, Any], u: float):
  """The value of hyperparameter `name` at quantile `u` in [0, 1) of its `spec`."""
  if "feasible_points" in spec:
    options = spec["feasible_points"]
    if not isinstance(options, list) or not options:
      raise ValueError(f"{name} has no feasible_points (a non-empty list)")
    return options[min(int(u * len(options)), len(options) - 1)]
  if "min" not in spec or "max" not in spec:
    raise ValueError(f"{name} needs 'feasible_points' or 'min'/'max', got {spec!r}")
  lo, hi = spec["min"], spec["max"]
  if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
    raise ValueError(f"{name} needs numbers for min and max, got {lo!r} and {hi!r}")
  lo, hi = float(lo), float(hi)
  if lo > hi:
    raise ValueError(f"{name} has min {lo} > max {hi}: swap them")
  scaling = spec.get("scaling", "linear")
  if scaling == "log":
    if lo <= 0:
      raise ValueError(f"{name} has log scaling and min {lo} <= 0")
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
  if scaling == "linear":
    return lo + u * (hi - lo)
  raise ValueError(f"{name} has unknown scaling {scaling!r} ('linear' or 'log')")


def _sample_dict_space(space: Dict[str, Any], num_trials: int, seed: int):
  """Quasi-random points of a dict-form search space (Halton sequence, shifted by seed)."""
  names = sorted(space)
  if len(names) > len(_PRIMES):
    raise ValueError(f"{len(names)} hyperparameters; at most "
                     f"{len(_PRIMES)} supported")
  shift = _halton(seed + 1, _SEED_BASE)
  return [{name: _value(name, space[name], (_halton(trial + 1, prime) + shift) % 1.0)
           for name, prime in zip(names, _PRIMES)}
          for trial in range(num_trials)]


def _list_points(path: str, space: list, num_trials: int) -> List[Dict[str, Any]]:
  """The first `num_trials` points of a list-form search space, checked."""
  if not space or not all(isinstance(p, dict) for p in space):
    raise ValueError(f"search space {path}: a list must hold hyperparameter dicts")
  for i, point in enumerate(space[1:], start=2):
    # The official runner builds one namedtuple class from the first point's keys.
    if set(point) != set(space[0]):
      raise ValueError(
          f"search space {path}: point {i} has other hyperparameters than point 1 "
          f"(missing {sorted(set(space[0]) - set(point))}, extra "
          f"{sorted(set(point) - set(space[0]))}); the official runner needs the "
          "same names in every point")
  return [dict(p) for p in space[:num_trials]]


def load_search_space(path: str, num_trials: int, seed: int = 0) -> List[Dict[str, Any]]:
  """The trials' hyperparameters from a search space in either official format.

  A list of points gives its first `num_trials` points (fewer if it has fewer, as
  the official runner does; `weight_averaging.runner.run_experiment` refuses that);
  a dict of ranges (``{"min", "max", "scaling"}`` or ``{"feasible_points"}``) is
  sampled. A bad entry is a `ValueError` naming the file and the hyperparameter.
  """
  if not path:
    raise ValueError("--tuning_search_space is required for external tuning")
  try:
    with open(path) as f:
      space = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"search space not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"search space {path} is not valid JSON: {e}") from e
  if num_trials < 1:
    raise ValueError(f"--num_tuning_trials must be >= 1, got {num_trials}")
  if isinstance(space, list):
    return _list_points(path, space, num_trials)
  if isinstance(space, dict):
    if not all(isinstance(v, dict) for v in space.values()):
      raise ValueError(f"search space {path}: every entry must be a dict with "
                       f"'feasible_points' or 'min'/'max'")
    try:
      return _sample_dict_space(space, num_trials, seed)
    except ValueError as e:
      raise ValueError(f"search space {path}: {e}") from e
  raise ValueError(f"search space {path} must be a JSON list or object")


def as_hyperparameters(point: Dict[str, Any]):
  """A namedtuple, as the official runner hands hyperparameters to submissions."""
  return collections.namedtuple("Hyperparameters", sorted(point))(**point)

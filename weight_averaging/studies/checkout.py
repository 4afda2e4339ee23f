"""An algoperf checkout, read (never imported): its runner's flags and its submission API.

A study grid runs AlgoPerf workloads through the checkout's ``submission_runner.py``; a flag
it does not define, or a checkout of the other API, would fail every run after minutes of
start-up, so the grid checks both first (`check_official_checkout`). Importing the runner
would load TensorFlow and torch and redefine absl flags, so its source is read instead.
"""

from __future__ import annotations

import os
import re
from typing import Any, List, Sequence

OFFICIAL_RUNNER = "submission_runner.py"

_FLAG_DEFINITION = re.compile(r"flags\.DEFINE_\w+\(\s*(?:name\s*=\s*)?['\"](\w+)['\"]")


def official_runner_flags(algoperf_dir: str) -> frozenset:
  """The flag names ``submission_runner.py`` of `algoperf_dir` defines."""
  path = os.path.join(algoperf_dir, OFFICIAL_RUNNER)
  if not os.path.isfile(path):
    raise ValueError(f"{algoperf_dir} is not an algoperf checkout: it has no {OFFICIAL_RUNNER}")
  with open(path) as f:
    return frozenset(_FLAG_DEFINITION.findall(f.read()))


def checkout_api(algoperf_dir: str) -> str:
  """'jit' for a checkout with the jit API (it has ``algoperf/jax_sharding_utils.py``, main
  since 2c90454f), else 'pmap'."""
  return ("jit" if os.path.isfile(os.path.join(algoperf_dir, "algoperf", "jax_sharding_utils.py"))
          else "pmap")


def argv_flags(argv: Sequence[str]) -> List[str]:
  """The names of the ``--name[=value]`` arguments of `argv`."""
  return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def check_official_checkout(runs: Sequence[Any], algoperf_dir: str, api: str) -> None:
  """`ValueError` unless the checkout's runner defines every flag the runs pass and its API
  is `api`: a mismatch would fail in every run, after minutes of start-up."""
  official = [r for r in runs if r.runner == "official"]
  if not official:
    return
  known = official_runner_flags(algoperf_dir)
  unknown = sorted({f for r in official for f in argv_flags(r.argv)} - known)
  if unknown:
    raise ValueError(f"{os.path.join(algoperf_dir, OFFICIAL_RUNNER)} defines no flag "
                     f"--{unknown[0]} (of {['--' + f for f in unknown]})")
  found = checkout_api(algoperf_dir)
  if found != api:
    raise ValueError(f"{algoperf_dir} has the {found} API, but --api={api}: check out "
                     f"algoperf at {'2c90454f' if api == 'jit' else 'fb2f492a'}")

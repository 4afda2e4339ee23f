"""AlgoPerf submission files: loaded by path, called as the official runner calls them."""

from __future__ import annotations

import importlib.util
import inspect
import os

# What the runner calls; `prepare_for_eval` is optional (older APIs lack it).
REQUIRED_FUNCTIONS = ("init_optimizer_state", "update_params", "get_batch_size",
                      "data_selection")


def load_submission(path: str):
  """Imports a submission file by path (absolute, or relative to the working dir)."""
  if not path or not path.endswith(".py"):
    raise ValueError(f"--submission_path must name a .py file, got {path!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"submission file not found: {path}")
  name = "submission_" + os.path.splitext(os.path.basename(os.path.dirname(
      os.path.abspath(path))))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  missing = [f for f in REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
  if missing:
    raise ValueError(f"{path} is not an AlgoPerf submission: it lacks {', '.join(missing)}")
  return module


def declared_api(module):
  """The AlgoPerf JAX API a submission says it implements, or None if it does not say.

  `weight_averaging.algoperf_api.build_submission` records it as the ``algoperf_api``
  attribute of the ``init_optimizer_state`` it builds.
  """
  return getattr(getattr(module, "init_optimizer_state", None), "algoperf_api", None)


def check_api(module, path: str, api: str) -> None:
  """Refuses a submission built for the other API (it would fail deep inside JAX, with
  errors about axes and indices)."""
  declared = declared_api(module)
  if declared is not None and declared != api:
    raise ValueError(
        f"{path} is a {declared}-API submission, but the runner runs the {api} API "
        f"(--api={api}): pass --api={declared}, or take the {api} build of it "
        f"(submissions/{api}/<name>/submission.py)")


def call(fn, **kwargs):
  """Calls a submission function, passing `train_state` only if it accepts it."""
  if "train_state" in kwargs and "train_state" not in inspect.signature(fn).parameters:
    kwargs.pop("train_state")
  return fn(**kwargs)

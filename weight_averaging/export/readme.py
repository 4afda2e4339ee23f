"""An entry's README.md: what it does, its hyperparameters, its files and the PR's YAML.

The hyperparameters are read from the code at export time: the search space's JSON
(external tuning), the ``SELF_TUNING_*`` points of `hyperparameters` (self-tuning), and
its ``DEFAULT_*`` constants for whatever those leave unset (``DEFAULT_LAWA_K`` is the
default of ``lawa_k``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from weight_averaging import placement
from weight_averaging.algoperf_api import catalog
from weight_averaging.algoperf_api import hyperparameters as hp

OPTIMIZER_TEXT = {
    "nadamw": ("NadamW, AlgoPerf's reference optimizer: Adam with Nesterov momentum and "
               "decoupled weight decay, a linear warmup then a cosine decay over the "
               "workload's step hint."),
    "shampoo": ("Distributed Shampoo: per-dimension preconditioners on blocks of each "
                "parameter, their inverse roots recomputed every `preconditioning_every` "
                "steps and split over the devices, grafted onto Adam's step size. "
                "`shampoo_preset` picks Meta's AlgoPerf 2024 recipe (`meta`) or Google's "
                "(`google`)."),
}
AVERAGER_TEXT = {
    "ema": ("an exponential moving average of the weights, `avg <- beta * avg + (1 - beta) * "
            "params` with beta = `ema_beta`, updated"),
    "lawa": "LAWA, the mean of the latest k = `lawa_k` snapshots of the weights, one taken",
}
SAMPLING_TEXT = (" every nu steps from a start step on: nu is `averaging_every`, or "
                 "`averaging_every_fraction` of the workload's step hint (rounded, at least "
                 "1); the start is `averaging_start_step`, or `averaging_start_fraction` of "
                 "the step hint.")
YAML_RULESETS = {"external": "external", "self_tuning": "self-tuning"}
RULESET_TITLES = {"external": "external tuning", "self_tuning": "self-tuning"}


def label(submission: catalog.Submission) -> str:
  """``NadamW + LAWA``."""
  return catalog.label(submission.name)


def _relevant(constant: str, prefix: str, submission: catalog.Submission) -> bool:
  """Whether ``PREFIX_<TOPIC>...`` concerns `submission` (another optimizer's or
  averager's constant does not; neither does averaging without an averager)."""
  topic = constant[len(prefix):].split("_")[0].lower()
  if topic in catalog.OPTIMIZERS:
    return topic == submission.optimizer
  if topic in catalog.AVERAGERS:
    return topic == submission.averager
  if topic == "averaging":
    return submission.averager is not None
  return True


def self_tuning_points(submission: catalog.Submission) -> List[Tuple[str, Any]]:
  """``(constant, value)`` of each ``SELF_TUNING_*`` in `hp` that concerns `submission`:
  the optimizer's point, then averaging's, then the averager's, then the rest."""
  def rank(constant):
    topic = constant[len("SELF_TUNING_"):].split("_")[0].lower()
    order = [submission.optimizer, "averaging", submission.averager]
    return order.index(topic) if topic in order else len(order)
  found = [k for k in vars(hp)
           if k.startswith("SELF_TUNING_") and _relevant(k, "SELF_TUNING_", submission)]
  return [(k, getattr(hp, k)) for k in sorted(found, key=rank)]


def _stem(name: str) -> str:
  """``averaging_start_step`` -> ``averaging_start``: a step count's alternative is
  ``<stem>_fraction`` (of the step hint)."""
  for suffix in ("_steps", "_step"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def defaults(submission: catalog.Submission, given: Sequence[str]) -> Dict[str, Any]:
  """``hyperparameter -> default`` from `hp`'s ``DEFAULT_*``, for those that neither
  `given` nor its ``_fraction`` alternative in `given` sets."""
  out = {}
  for k, v in vars(hp).items():
    name = k[len("DEFAULT_"):].lower()
    if (k.startswith("DEFAULT_") and _relevant(k, "DEFAULT_", submission)
        and name not in given and f"{_stem(name)}_fraction" not in given):
      out[name] = v
  return out


def _value(v: Any) -> str:
  return f"`{json.dumps(v)}`"


def _space_table(space: Any) -> Tuple[List[str], List[str]]:
  """Markdown rows of a search space (a list of points, or Halton ranges) and its keys."""
  if isinstance(space, list):
    names = sorted({k for point in space for k in point})
    rows = ["| hyperparameter | " + " | ".join(f"point {i + 1}" for i in range(len(space)))
            + " |", "|---" * (len(space) + 1) + "|"]
    rows += [f"| `{n}` | " + " | ".join(_value(p[n]) if n in p else "" for p in space)
             + " |" for n in names]
    given = [n for n in names if all(n in p for p in space)]
    return rows, given
  rows = ["| hyperparameter | min | max | scaling | feasible points |", "|---|---|---|---|---|"]
  for n in sorted(space):
    spec = space[n]
    rows.append(f"| `{n}` | " + " | ".join(
        _value(spec[k]) if k in spec else "" for k in ("min", "max", "scaling",
                                                       "feasible_points")) + " |")
  return rows, sorted(space)


def hyperparameter_section(submission: catalog.Submission, ruleset: str,
                           space: Optional[Any]) -> List[str]:
  """The README's "Hyperparameters" section for `ruleset`."""
  out = ["## Hyperparameters", ""]
  if ruleset == "external":
    rows, given = _space_table(space)
    kind = (f"{len(space)} points, run in this order as the trials of each study"
            if isinstance(space, list) else "ranges the runner's Halton sampler draws from")
    out += [f"`tuning_search_space.json` ({kind}):", ""] + rows + [""]
  else:
    given = []
    out += ["Self-tuning: the runner passes `hyperparameters=None`, and the entry runs one "
            "fixed point, the same on every workload (constants of "
            "`weight_averaging_vendored/algoperf_api/hyperparameters.py`):", ""]
    for constant, value in self_tuning_points(submission):
      if isinstance(value, dict):
        out += [f"`{constant}`:", "", "| hyperparameter | value |", "|---|---|"]
        out += [f"| `{k}` | {_value(v)} |" for k, v in value.items()] + [""]
        given += list(value)
      else:
        out += [f"`{constant}` = {_value(value)}", ""]
  rest = defaults(submission, given)
  if rest:
    out += ["What the above leaves unset takes its default (the code's `DEFAULT_*`):", "",
            "| hyperparameter | default |", "|---|---|"]
    out += [f"| `{k}` | {_value(v)} |" for k, v in rest.items()] + [""]
  return out


def yaml_block(submission: catalog.Submission, ruleset: str, summary: str, folder: str,
               authors: str, affiliations: str, version: str) -> List[str]:
  """The PR body's YAML block. Values are double-quoted (JSON strings are YAML); the
  leaderboard's workflow cuts each line at ``#``, so a value with one is refused."""
  description = summary + (" Weight averaging after Ajroldi, Orvieto and Geiping (2025), "
                           "When, Where and Why to Average Weights?"
                           if submission.averager else "")
  fields = {"submission_name": label(submission), "submission_folder": folder,
            "authors": authors, "affiliations": affiliations, "version": version,
            "ruleset": YAML_RULESETS[ruleset], "framework": "JAX",
            "description": description}
  for key, value in fields.items():
    if "#" in value or "\n" in value:
      raise ValueError(f"{key} {value!r}: the leaderboard's PR check cuts lines at '#' "
                       "and reads one line per field; remove the '#' or line break")
  return ["```yaml"] + [f"{k}: {json.dumps(v)}" for k, v in fields.items()] + ["```"]


def entry_readme(submission: catalog.Submission, ruleset: str, summary: str,
                 space: Optional[Any], vendored: Sequence[str], folder: str,
                 authors: str, affiliations: str, version: str) -> str:
  """The whole README.md of one entry."""
  averaging = (f"Averaging: {AVERAGER_TEXT[submission.averager]}{SAMPLING_TEXT} Training runs "
               "on the live "
               "weights; only evaluation sees the average. `prepare_for_eval` keeps the live "
               "weights in the optimizer state and returns a fresh copy of the average; the "
               "next `update_params` trains on from the live weights. Everything a resume "
               "needs is an array in the checkpointed optimizer state. "
               "`averaging_placement` (" + ", ".join(f"`{c}`" for c in placement.CHOICES)
               + ") says where the averaging state lives: on every device, sharded over "
               "them, or in host memory" + (", or, with `auto`, where it fits, decided "
               "at `init_optimizer_state` from the param shapes and the device memory."
               if "auto" in placement.CHOICES else ".")
               if submission.averager else
               "No averaging: the baseline the averaged entries on this optimizer are "
               "compared with. `prepare_for_eval` returns the params unchanged.")
  title = f"# {label(submission)} ({RULESET_TITLES[ruleset]})"
  out = [title, "", summary + f" An AlgoPerf entry (JAX, jit API) exported from "
         f"`weight_averaging` {version} by `python -m weight_averaging.export`.", "",
         "## What it does", "", f"Optimizer: {OPTIMIZER_TEXT[submission.optimizer]}", "",
         averaging, "", "Batch sizes: AlgoPerf's reference NadamW global batch sizes "
         "(`get_batch_size`).", ""]
  out += hyperparameter_section(submission, ruleset, space)
  space_file = (["- `tuning_search_space.json`: the search space above."]
                if ruleset == "external" else [])
  out += ["## Files", "",
          "- `submission.py`: AlgoPerf's five functions; it imports the vendored package "
          "relative to this folder, so it runs when loaded by path or imported as "
          f"`submissions_algorithms.{folder.replace('/', '.')}.submission`.",
          "- `weight_averaging_vendored/`: the modules of `weight_averaging` the submission "
          f"imports ({len(vendored)} files), with relative imports. They need only jax, "
          "numpy, optax and the standard library."] + space_file + [
          "- `requirements.txt`: nothing beyond AlgoPerf's JAX environment.",
          "- `LICENSE`: Apache-2.0.", "",
          "## Pull request", "",
          f"To the `evaluation` branch of mlcommons/submissions_algorithms, with this "
          f"folder at `{folder}/`, \"[submission]\" in the title and this block in the "
          "body:", ""]
  out += yaml_block(submission, ruleset, summary, folder, authors, affiliations, version)
  return "\n".join(out) + "\n"

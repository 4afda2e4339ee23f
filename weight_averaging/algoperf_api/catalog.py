"""The package's six AlgoPerf submissions: each one's optimizer and averager, and its base.

A submission is one optimizer (NadamW or Distributed Shampoo) with or without one
averager (EMA or LAWA); its *base* is the same optimizer without averaging, the run
an averaged submission is compared with::

  nadamw        nadamw_ema    nadamw_lawa      base: nadamw
  shampoo       shampoo_ema   shampoo_lawa     base: shampoo

Every list of submissions and every "which is the base of which" (scoring's family
baseline, the figures, the study grid, the demo) comes from here. Each name has a
``submissions/<api>/<name>/submission.py`` for both AlgoPerf JAX APIs.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

OPTIMIZERS = ("nadamw", "shampoo")
AVERAGERS = ("ema", "lawa")
# How tables, figures and entry READMEs name the parts: ``NadamW + LAWA``.
PART_LABELS = {"nadamw": "NadamW", "shampoo": "Shampoo", "ema": "EMA", "lawa": "LAWA"}


class Submission(NamedTuple):
  """One submission: `optimizer` in `OPTIMIZERS`, `averager` in `AVERAGERS` or None."""
  name: str
  optimizer: str
  averager: Optional[str]


SUBMISSIONS: Dict[str, Submission] = {s.name: s for s in (
    Submission("nadamw", "nadamw", None),
    Submission("nadamw_ema", "nadamw", "ema"),
    Submission("nadamw_lawa", "nadamw", "lawa"),
    Submission("shampoo", "shampoo", None),
    Submission("shampoo_ema", "shampoo", "ema"),
    Submission("shampoo_lawa", "shampoo", "lawa"),
)}
NAMES: Tuple[str, ...] = tuple(SUBMISSIONS)


def get(name: str) -> Submission:
  """The submission called `name`; `ValueError` naming the known ones otherwise."""
  if name not in SUBMISSIONS:
    raise ValueError(f"unknown submission {name!r}; known: {', '.join(NAMES)}")
  return SUBMISSIONS[name]


def label(name: str) -> str:
  """The display name of submission `name`: ``shampoo_lawa`` -> ``Shampoo + LAWA``."""
  submission = get(name)
  return " + ".join(PART_LABELS[part] for part in (submission.optimizer, submission.averager)
                    if part)


def base_of(name: str) -> str:
  """The submission without averaging on `name`'s optimizer (`name` itself for a base):
  ``shampoo_ema`` -> ``shampoo``, ``nadamw`` -> ``nadamw``."""
  optimizer = get(name).optimizer
  return next(s.name for s in SUBMISSIONS.values()
              if s.optimizer == optimizer and s.averager is None)


def averaged(optimizer: str) -> Tuple[str, ...]:
  """The submissions that add an averager to `optimizer`, in `AVERAGERS` order."""
  return tuple(s.name for s in SUBMISSIONS.values()
               if s.optimizer == optimizer and s.averager is not None)

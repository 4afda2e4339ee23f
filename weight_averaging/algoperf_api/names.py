"""Hyperparameter names: one no submission of ours reads is an error, another's is logged.

A misspelled name (``ema_betta``) would otherwise be ignored and its default used,
with nothing to show for it but the typo in ``hparams.json``. So a submission's
``init_optimizer_state`` (`builder`) checks the names it is given:

* a name that none of this package's submissions reads is a `ValueError` naming it,
  with the closest known names ("did you mean 'ema_beta'?");
* a name that another of our submissions reads (``lawa_k`` handed to an EMA
  submission, so that one search space serves several) is logged, once per
  ``init_optimizer_state``, in one line.

The known names are not a second list to keep in step: `known_names` runs every
reader of `hyperparameters` on its self-tuning point (Shampoo's on each preset)
inside `hp.recording` and keeps every name the readers ask `hp.lookup` for, given or
not. Recipes therefore read their hyperparameters through `hp.lookup` (the
``*_config`` readers do), which is also how `checked` sees what a submission used.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from typing import Any, FrozenSet, Iterator, Tuple

from weight_averaging.algoperf_api import hyperparameters as hp

_LOG = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def known_names() -> FrozenSet[str]:
  """Every hyperparameter some reader of `hyperparameters` asks for."""
  with hp.recording() as read:
    hp.training_config(None)
    hp.nadamw_config(None)
    for preset in hp.SHAMPOO_PRESETS:
      hp.shampoo_config({k: v for k, v in hp.SELF_TUNING_SHAMPOO.items()
                         if preset == "meta" or k not in hp.META_ONLY})
    hp.averaging_config(None, step_hint=1)
    hp.ema_config(None)
    hp.lawa_config(None)
    hp.snapshot_config(None, environ={})
  return frozenset(read)


def given_names(hparams: Any) -> Tuple[str, ...]:
  """The names in `hparams`: a namedtuple's fields, a mapping's keys, ``()`` for None."""
  if hparams is None:
    return ()
  if isinstance(hparams, dict):
    return tuple(hparams)
  if hasattr(hparams, "_fields"):
    return tuple(hparams._fields)
  return tuple(getattr(hparams, "__dict__", {}))


def check_known(hparams: Any) -> None:
  """`ValueError` naming every hyperparameter no submission of ours reads."""
  known = known_names()
  unknown = [name for name in given_names(hparams) if name not in known]
  if not unknown:
    return
  hints = []
  for name in unknown:
    close = difflib.get_close_matches(name, sorted(known), n=2)
    hint = (" (did you mean " + " or ".join(repr(c) for c in close) + "?)"
            if close else "")
    hints.append(f"{name!r}{hint}")
  raise ValueError(
      f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
      "no submission of weight_averaging reads "
      f"{'them' if len(unknown) > 1 else 'it'}, so its value would be ignored. "
      f"Known: {', '.join(sorted(known))}")


@contextlib.contextmanager
def checked(hparams: Any) -> Iterator[None]:
  """Refuses unknown names on entry; logs the given names the block did not read.

  Wrap everything a submission reads at ``init_optimizer_state``: what it reads
  through `hp.lookup` inside the block counts as used.
  """
  check_known(hparams)
  with hp.recording() as read:
    yield
  unused = [name for name in given_names(hparams) if name not in read]
  if unused:
    _LOG.warning("hyperparameters not used by this submission (other submissions of "
                 "weight_averaging read them): %s", ", ".join(sorted(unused)))

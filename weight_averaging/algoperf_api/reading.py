"""Reading a hyperparameter by name, and recording which names were read.

AlgoPerf hands a submission its hyperparameters as a namedtuple (external tuning),
a mapping in tests, or ``None`` (self-tuning). `lookup` reads one name from any of
them; `recording` collects every name asked for in a block, which is how `names`
learns the names our submissions know and what a submission used.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional, Set

_MISSING = object()

_RECORDING: contextvars.ContextVar[Optional[Set[str]]] = contextvars.ContextVar(
    "weight_averaging_hyperparameters_read", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Set[str]]:
  """Collects, into the set it yields, every name `lookup` is asked for in the block."""
  names: Set[str] = set()
  token = _RECORDING.set(names)
  try:
    yield names
  finally:
    _RECORDING.reset(token)


def lookup(hparams: Any, name: str, default: Any = _MISSING) -> Any:
  """``hparams.name`` for a namedtuple or object, ``hparams[name]`` for a mapping.

  Every name asked for is recorded while a `recording` block runs.
  """
  read = _RECORDING.get()
  if read is not None:
    read.add(name)
  if hparams is None:
    value = _MISSING
  elif isinstance(hparams, dict):
    value = hparams.get(name, _MISSING)
  else:
    value = getattr(hparams, name, _MISSING)
  if value is _MISSING:
    if default is _MISSING:
      raise ValueError(f"hyperparameter {name!r} is missing")
    return default
  return value

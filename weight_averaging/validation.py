"""Checks of hyperparameter values: a bad one raises `ValueError` naming it and the value.

One set of rules for the averagers' arguments, the AlgoPerf glue's hyperparameters and
the workload configuration files alike:

* an integer is an ``int`` (or NumPy integer), or a float with an integral value
  (``64.0``: a search space's linear range hands out floats), returned as ``int``;
  ``64.5``, ``True``, ``'64'``, NaN and infinities are refused;
* a number is an ``int`` or ``float`` (or NumPy scalar), never a bool: ``True`` is no
  learning rate;
* a boolean is ``True`` or ``False`` only, not ``0``, ``1`` or ``'true'``.

A value is never silently truncated (the 2024 LAWA EMA entry read ``int(lawa_beta)``
and turned beta 0.2 into 0).

Nothing here imports the package: the library's root, the glue and the studies all
depend on this module, never the other way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def _is_number(value: Any) -> bool:
  # bool is an int subclass, but True is no learning rate.
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an ``int`` >= `minimum`; an integral float is converted, nothing else."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value_int = int(value)
  elif _is_number(value) and math.isfinite(value) and float(value).is_integer():
    value_int = int(value)
  else:
    raise ValueError(f"hyperparameter {name!r} must be an integer >= {minimum}, "
                     f"got {value!r} ({type(value).__name__})")
  if value_int < minimum:
    raise ValueError(f"hyperparameter {name!r} must be an integer >= {minimum}, "
                     f"got {value!r}")
  return value_int


def check_float(name: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> float:
  """`value` as a ``float`` in ``[low, high]``, an end excluded where it is ``*_open``.

  NaN is refused, and so is an infinity unless the interval is closed at it.
  """
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if not _is_number(value):
    raise ValueError(f"hyperparameter {name!r} must be a number in {interval}, "
                     f"got {value!r} ({type(value).__name__})")
  value = float(value)
  inside = (not math.isnan(value) and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high))
  if not inside:
    raise ValueError(f"hyperparameter {name!r} must be a number in {interval}, "
                     f"got {value!r}")
  return value


def check_bool(name: str, value: Any) -> bool:
  """`value` if it is ``True`` or ``False`` (JSON ``true``/``false``), else an error."""
  if isinstance(value, bool):
    return value
  raise ValueError(f"hyperparameter {name!r} must be true or false, got {value!r} "
                   f"({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
  """`value` if it is one of `choices`; a bool never is (``True == 1``)."""
  choices = tuple(choices)
  if isinstance(value, bool) or value not in choices:
    raise ValueError(f"hyperparameter {name!r} must be one of {choices}, got {value!r}")
  return value

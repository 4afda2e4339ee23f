"""Reading and validating the learning-rate schedule's hyperparameters (NadamW, Shampoo).

Both optimizers warm up over ``warmup_factor`` of the horizon and then follow
``lr_schedule`` (`optimizers.common.lr_schedule` states the math):

* ``lr_schedule``: ``'cosine'`` (default: AlgoPerf's reference), ``'linear'``,
  ``'constant'`` (warmup, then no decay) or ``'wsd'`` (warmup, stable, decay);
* ``step_hint_factor`` f in (0, 1], default 1: the schedule runs over
  ``round(f * step_hint)`` steps and holds its final rate after (a shorter schedule;
  the warmup shrinks with it, so the paper's, which keeps the full run's warmup, is
  ``warmup_factor / f``);
* ``lr_end_factor`` in [0, 1], default 0: the decay ends at ``lr_end_factor *
  learning_rate`` (annealing less); not with ``'constant'``, which has no end;
* ``cooldown_fraction`` in (0, 1] (default `common.DEFAULT_COOLDOWN_FRACTION`) and
  ``wsd_decay`` (``'linear'``, the default, or ``'cosine'``): the length and the shape
  of the decay of ``'wsd'``, and of no other schedule.

``null`` counts as not given, so one search space can mix schedules. The defaults are
the schedule AlgoPerf's reference NadamW runs, so a search space without these names
runs as before. The reader takes `hyperparameters.lookup` as an argument, so that the
NadamW and Shampoo readers there read these names too (and `names` knows them)
without an import cycle.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from weight_averaging.optimizers import common
from weight_averaging.validation import check_choice, check_float

DEFAULT_LR_SCHEDULE = "cosine"
DEFAULT_STEP_HINT_FACTOR = 1.0
DEFAULT_LR_END_FACTOR = 0.0
DEFAULT_WSD_DECAY = "linear"
_WSD_ONLY = ("cooldown_fraction", "wsd_decay")


class ScheduleConfig(NamedTuple):
  """The validated schedule hyperparameters (`common.lr_schedule`'s keyword arguments)."""

  kind: str = DEFAULT_LR_SCHEDULE
  step_hint_factor: float = DEFAULT_STEP_HINT_FACTOR
  end_factor: float = DEFAULT_LR_END_FACTOR
  cooldown_fraction: float = common.DEFAULT_COOLDOWN_FRACTION
  wsd_decay: str = DEFAULT_WSD_DECAY


def schedule_config(hparams: Any, lookup: Callable[..., Any]) -> ScheduleConfig:
  """Reads and checks the schedule's names of `hparams` through ``lookup(hparams, name,
  default)``; every name is looked up, given or not, so a recording sees them all."""
  values = {name: lookup(hparams, name, None) for name in (
      "lr_schedule", "step_hint_factor", "lr_end_factor") + _WSD_ONLY}
  kind = values["lr_schedule"]
  kind = check_choice("lr_schedule", DEFAULT_LR_SCHEDULE if kind is None else kind,
                      common.SCHEDULES)
  if kind != "wsd":
    for name in _WSD_ONLY:
      if values[name] is not None:
        raise ValueError(
            f"hyperparameter {name!r} ({values[name]!r}) belongs to lr_schedule 'wsd', "
            f"and lr_schedule is {kind!r}: remove {name!r} or set lr_schedule 'wsd'")
  if kind == "constant" and values["lr_end_factor"] is not None:
    raise ValueError(
        f"hyperparameter 'lr_end_factor' ({values['lr_end_factor']!r}) is the end of a "
        "decay, and lr_schedule 'constant' never decays: remove 'lr_end_factor' or "
        "pick a decaying lr_schedule")

  def fraction(name, default, low_open=True):
    value = default if values[name] is None else values[name]
    return check_float(name, value, 0.0, 1.0, low_open=low_open)

  return ScheduleConfig(
      kind=kind,
      step_hint_factor=fraction("step_hint_factor", DEFAULT_STEP_HINT_FACTOR),
      end_factor=fraction("lr_end_factor", DEFAULT_LR_END_FACTOR, low_open=False),
      cooldown_fraction=fraction("cooldown_fraction", common.DEFAULT_COOLDOWN_FRACTION),
      wsd_decay=check_choice("wsd_decay", DEFAULT_WSD_DECAY if values["wsd_decay"] is None
                             else values["wsd_decay"], common.WSD_DECAYS))


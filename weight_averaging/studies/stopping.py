"""When a study trial is finished: its budget and the stopping rules of its runner.

**When a trial is finished** (`trial_state`): its ``eval_measurements.csv`` has at least one eval,
and the run ended by one of the runners' own stopping rules: the last eval is at the step budget
(`step_budget`), both the validation and the test targets were reached (the runners stop there,
unless the run was told to go on: ``Budget.stop_at_target`` false), the logged submission time is
at the runtime budget, or the official runner logged its end-of-run row past its last eval (the
``score`` row it appends to ``measurements.csv`` after its loop: a time-out skips the eval, so
only this row shows it; an end row at the last eval is the cap of an earlier, smaller
``max_global_steps``, not finished under a larger budget). Anything else is a run that died or
was killed. `weight_averaging.studies.grid` resumes by this rule, `finished` scores by it.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

from weight_averaging import layout
from weight_averaging.studies import configs


class Budget(NamedTuple):
  """What ends a trial: `steps` (None: no step cap), `runtime_sec` and the targets (which
  end it only with `stop_at_target`)."""
  steps: Optional[int]
  runtime_sec: float
  target: configs.Target
  stop_at_target: bool = True


def step_budget(max_global_steps: Optional[int], embedded: bool, step_hint: int):
  """`max_global_steps`, else the embedded runner's default (the step hint); official: None."""
  return step_hint if max_global_steps is None and embedded else max_global_steps


class TrialState(NamedTuple):
  finished: bool
  reason: str


def _number(text: Optional[str]) -> float:
  try:
    return float(text) if text not in (None, "") else math.nan
  except ValueError:
    return math.nan


def _official_end_step(trial: str, metric: str) -> Optional[float]:
  """The step of the official runner's end-of-run row, if ``measurements.csv`` ends with one:
  a ``score`` and no validation metric (eval rows carry both, a submission's own rows no
  score)."""
  rows = layout.read_rows(os.path.join(trial, layout.MEASUREMENTS_FILE))
  if not rows:
    return None
  last = rows[-1]
  if (math.isnan(_number(last.get("score")))
      or not math.isnan(_number(last.get(f"validation/{metric}")))):
    return None
  return _number(last.get(layout.STEP_COLUMN))


def trial_state(trial: str, budget: Budget) -> TrialState:
  """Whether the trial in directory `trial` ran to one of its runner's stopping rules."""
  if not os.path.isdir(trial):
    return TrialState(False, "not started")
  rows = layout.read_rows(layout.eval_file(trial))
  if not rows:
    return TrialState(False, f"no eval logged in {layout.EVAL_FILE}")
  last = rows[-1]
  step = _number(last.get(layout.STEP_COLUMN))
  if budget.steps is not None and step >= budget.steps:
    return TrialState(True, f"reached the step budget ({int(step)} steps)")
  target = budget.target
  val = any(target.reached(_number(r.get(f"validation/{target.metric}")), target.validation)
            for r in rows)
  test = any(target.reached(_number(r.get(f"test/{target.metric}")), target.test) for r in rows)
  if val and test and budget.stop_at_target:
    return TrialState(True, f"reached the validation and test targets (step {int(step)})")
  if _number(last.get(layout.TIME_COLUMN)) >= budget.runtime_sec:
    return TrialState(True, f"spent the runtime budget ({budget.runtime_sec:g} s)")
  # A time-out skips the last eval, so the official runner's end row lies past the last eval;
  # an end row at the last eval is a step cap (an earlier, smaller --max_global_steps).
  end = _official_end_step(trial, target.metric)
  if end is not None and end > step:
    return TrialState(True, f"ran out of time at step {int(end)} (the runner's end-of-run row)")
  return TrialState(False, f"stopped at step {int(step)}, before any of its stopping rules")

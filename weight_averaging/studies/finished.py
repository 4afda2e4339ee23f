"""Which trials of a scored experiment finished: the study grid's rule, under each trial's budget.

A killed or still-running trial's evals stop short of where its runner would have stopped, so
scoring it would count a miss (or a late hit) that never happened. `without_unfinished` takes
such trials out of an experiment read by `layout.read_experiment` and lists them.

"Finished" is `grid.trial_state`, the rule the study grid resumes by: the last eval at the step
budget, both the validation and the test targets reached, the runtime budget spent, or the
official runner's end-of-run row past its last eval. The budget is the one the trial ran under
(`run_budget`): ``max_global_steps`` from its runner's ``flags_<n>.json`` (null: the embedded
runner's default, the workload's step hint; no step cap for the official runner) and the
workload's runtime budget and targets. A trial whose flags do not state ``max_global_steps``
(a bare eval CSV, or a run of an older embedded runner called from Python) cannot be judged,
and is kept.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from weight_averaging import layout
from weight_averaging import workloads as embedded
from weight_averaging.layout import Experiment, Trial
from weight_averaging.studies import configs
from weight_averaging.studies import grid


def run_budget(trial: Trial, spec: Any) -> Optional[grid.Budget]:
  """The budget `trial` ran under, for the workload of `spec` (a `scoring.WorkloadSpec`); None
  when its runner's flags do not state ``max_global_steps``; `layout.DamagedFile` for an
  unreadable flags file."""
  flags = layout.run_flags(trial.directory) if trial.directory else None
  if not flags or "max_global_steps" not in flags:
    return None
  steps = grid.step_budget(flags["max_global_steps"], spec.name in embedded.WORKLOADS,
                           spec.step_hint)
  runtime = spec.max_allowed_runtime_sec
  target = configs.Target(spec.metric.split("/", 1)[-1], spec.target, spec.test_target,
                          spec.minimize, spec.strict)
  return grid.Budget(steps, math.inf if runtime is None else runtime, target,
                     bool(flags.get("stop_at_target", True)))


def without_unfinished(experiment: Experiment, specs: Mapping[str, Any]
                       ) -> Tuple[Experiment, List[Dict[str, str]]]:
  """`experiment` without the trials that did not finish, and those as
  ``{"trial": dir, "reason": ...}``; `specs` by workload. A trial with a damaged flags file
  joins ``skipped``. ValueError when no trial is left."""
  kept: Dict[str, Dict[str, Dict[str, List[Trial]]]] = {}
  skipped, unfinished = list(experiment.skipped), []
  for w, by_sub in experiment.trials.items():
    for s, studies in by_sub.items():
      for study, trials in studies.items():
        for t in trials:
          try:
            budget = run_budget(t, specs[w])
          except layout.DamagedFile as e:
            skipped.append(layout.Skipped(t.directory, f"{os.path.basename(e.path)}: {e.problem}"))
            continue
          state = grid.trial_state(t.directory, budget) if budget is not None else None
          if state is not None and not state.finished:
            unfinished.append({"trial": t.directory, "reason": state.reason})
            continue
          kept.setdefault(w, {}).setdefault(s, {}).setdefault(study, []).append(t)
  if not kept:
    raise ValueError(f"no finished trial under {experiment.path!r}: " + "; ".join(
        f"{u['trial']}: {u['reason']}" for u in unfinished[:10]) + (
        "; skipped: " + "; ".join(f"{t}: {r}" for t, r in skipped[:10]) if skipped else ""))
  return Experiment(experiment.path, kept, skipped), unfinished

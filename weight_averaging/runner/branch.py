"""Branching a trial from another trial's checkpoint: cooldowns from one trunk.

A *trunk* is a trial that runs with a constant (or warmup-stable-decay) learning rate and
keeps its checkpoints at the steps asked for (``--checkpoint_steps``). A *branch* is a
trial that starts from the trunk's checkpoint at step ``s`` (``--branch_from=TRUNK_DIR
--branch_step=s``) with its own hyperparameters, typically ``lr_schedule='wsd'`` with
the horizon and ``cooldown_fraction`` that start its decay at ``s``. It takes over the
trunk's params, optimizer state, model state, clocks and eval rows up to ``s`` and
trains on from there, with the trunk's seed (so the same batches and keys).

The branch is exactly the run it stands for (the same hyperparameters run from scratch)
only if everything that acted on steps ``0..s`` agrees, so `check_branch` refuses,
before anything is written:

* a hyperparameter other than the schedule's (`SCHEDULE_NAMES`) that differs between
  the two trials (an optimizer's moments do not know which ``beta2`` made them);
* a learning rate that differs at any step ``t <= s``: with
  :math:`\\eta^{trunk}_t` and :math:`\\eta^{branch}_t` the rates of
  `weight_averaging.optimizers.common.lr_schedule` on each trial's hyperparameters,
  :math:`\\eta^{trunk}_t = \\eta^{branch}_t` bit for bit for every :math:`t \\le s`
  (the first differing step is named).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from weight_averaging import layout
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import schedules
from weight_averaging.optimizers import common

# The names a branch may set differently from its trunk: the learning-rate schedule's.
SCHEDULE_NAMES = ("warmup_factor", "lr_schedule", "step_hint_factor", "lr_end_factor",
                  "cooldown_fraction", "wsd_decay")


class Branch(NamedTuple):
  """Where a branch starts: the trunk's trial directory and the step of its checkpoint."""
  trunk_dir: str
  step: int


def trunk_point(trunk_dir: str) -> Mapping[str, Any]:
  """The trunk's hyperparameters (its ``hparams.json``); `ValueError` when it has none."""
  point = layout.read_hparams(trunk_dir)
  if point is None and not os.path.isfile(os.path.join(trunk_dir, layout.HPARAMS_FILE)):
    raise ValueError(f"--branch_from={trunk_dir}: no {layout.HPARAMS_FILE} there; name a "
                     "trial directory of a run that has started (the trunk)")
  if point is None:
    raise ValueError(f"{os.path.join(trunk_dir, layout.HPARAMS_FILE)}: holds null (a "
                     "self-tuning trial cannot be a trunk)")
  return point


def learning_rates(point: Mapping[str, Any], step_hint: int, last_step: int,
                   where: str) -> np.ndarray:
  """The learning rate of `point` at steps ``0..last_step`` (`common.lr_schedule`)."""
  if point.get("warmup_factor") is None:
    raise ValueError(f"{where}: a branch and its trunk must spell out 'warmup_factor' (the "
                     "warmup is a fraction of each one's horizon)")
  cfg = schedules.schedule_config(point, hp.lookup)
  # Every other name is equal in both (checked first), the top rate included.
  learning_rate = point.get("learning_rate")
  schedule = common.lr_schedule(1.0 if learning_rate is None else learning_rate,
                                point["warmup_factor"], step_hint, **cfg._asdict())
  return np.asarray(schedule(np.arange(last_step + 1)))


def check_branch(branch: Branch, trunk: Mapping[str, Any], point: Mapping[str, Any],
                 branch_name: str, step_hint: int) -> None:
  """Refuses a branch that would not be the run its hyperparameters stand for (above)."""
  names = f"branch {branch_name} and its trunk {branch.trunk_dir}"
  if point is None:
    raise ValueError(f"{names}: a self-tuning trial cannot branch")
  for name in sorted((set(trunk) | set(point)) - set(SCHEDULE_NAMES)):
    if trunk.get(name) != point.get(name):
      raise ValueError(
          f"{names} differ in {name!r} ({point.get(name)!r} vs the trunk's "
          f"{trunk.get(name)!r}): a branch may change only the schedule "
          f"({', '.join(SCHEDULE_NAMES)})")
  mine = learning_rates(point, step_hint, branch.step, f"branch {branch_name}")
  theirs = learning_rates(trunk, step_hint, branch.step, f"trunk {branch.trunk_dir}")
  differ = np.flatnonzero(mine != theirs)
  if differ.size:
    t = int(differ[0])
    raise ValueError(
        f"{names} have different learning rates at step {t} ({mine[t]!r} vs the trunk's "
        f"{theirs[t]!r}), before the branch step {branch.step}: the branch would not be "
        "the run its hyperparameters stand for. Branch at a step <= the first step where "
        "the schedules part, or give the branch the trunk's warmup and stable phase")

"""Reading and validating hyperparameters by name.

AlgoPerf hands a submission its hyperparameters as a namedtuple (external tuning),
or ``None`` (self-tuning). Every value read here is checked for presence, type and
range (`weight_averaging.validation`'s rules), and a bad one raises `ValueError`
naming the hyperparameter. Each ``*_config`` function reads one concern and returns
a `NamedTuple` of plain values; `recipes` builds optimizers and averagers from them.

Integers accept integral floats (``64.0``), because a Halton search space with
``"scaling": "linear"`` hands out floats; ``64.5``, ``True`` or ``'64'`` is an error.
Self-tuning (``None``): each reader reads its ``SELF_TUNING_*`` point. Every name is
read through `lookup`, which `recording` watches: `names` derives from it the names
our submissions know.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional

from weight_averaging.algoperf_api import schedules as schedules_lib
# The averaging hyperparameters and the lookup have their own modules; every name
# stays importable from here, where the submissions, studies and tests read them.
from weight_averaging.algoperf_api.averaging_hyperparameters import (  # noqa: F401
    DEFAULT_AVERAGING_EVERY, DEFAULT_AVERAGING_MODEL_STATE, DEFAULT_AVERAGING_PLACEMENT,
    DEFAULT_AVERAGING_START_STEP, DEFAULT_EMA_BETA, DEFAULT_LAWA_K, MODEL_STATE_CHOICES,
    SELF_TUNING_AVERAGING, SELF_TUNING_EMA, SELF_TUNING_LAWA, AveragingConfig, EmaConfig,
    LawaConfig, averaging_config, ema_config, every_steps, lawa_config, start_steps)
from weight_averaging.algoperf_api.reading import lookup, recording  # noqa: F401
from weight_averaging.optimizers import shampoo as shampoo_lib
from weight_averaging.validation import check_bool, check_choice, check_float, check_int

# AlgoPerf's self-tuning NadamW point (its ``HPARAMS``), used for ``None``. The
# baseline's schedule runs over the step hint itself, not over the 1.5x budget's
# steps: algoperf algorithms/baselines/self_tuning/jax_nadamw_full_budget.py,
# line 201 at 047238dd (202 at 2c90454f):
# ``lr_schedule_fn = jax_cosine_warmup(workload.step_hint, hyperparameters)``;
# `recipes` does the same (Shampoo: ``step_hint_factor`` 1).
SELF_TUNING_NADAMW = {
    "dropout_rate": 0.1,
    "learning_rate": 0.0017486387539278373,
    "one_minus_beta1": 0.06733926164,
    "beta2": 0.9955159689799007,
    "weight_decay": 0.08121616522670176,
    "warmup_factor": 0.02,
    "label_smoothing": 0.0,
}


# ----------------------------------------------------------------------------
# NadamW.


class NadamwConfig(NamedTuple):
  """The validated NadamW hyperparameters (names as in AlgoPerf's reference)."""

  learning_rate: float
  one_minus_beta1: float
  beta2: float
  weight_decay: float
  warmup_factor: float
  label_smoothing: float
  dropout_rate: Optional[float]
  grad_clip: Optional[float]
  schedule: schedules_lib.ScheduleConfig  # lr_schedule and its shape (`schedules`)


def nadamw_config(hparams: Any) -> NadamwConfig:
  """Reads and checks the NadamW hyperparameters; `None` means self-tuning."""
  if hparams is None:
    hparams = SELF_TUNING_NADAMW
  training = training_config(hparams)
  grad_clip = lookup(hparams, "grad_clip", None)
  return NadamwConfig(
      learning_rate=check_float("learning_rate", lookup(hparams, "learning_rate"),
                                0.0, math.inf, low_open=True, high_open=True),
      one_minus_beta1=check_float("one_minus_beta1", lookup(hparams, "one_minus_beta1"),
                                  0.0, 1.0, low_open=True),
      beta2=check_float("beta2", lookup(hparams, "beta2"), 0.0, 1.0, high_open=True),
      weight_decay=check_float("weight_decay", lookup(hparams, "weight_decay"),
                               0.0, math.inf, high_open=True),
      warmup_factor=check_float("warmup_factor", lookup(hparams, "warmup_factor"),
                                0.0, 1.0),
      label_smoothing=training.label_smoothing,
      dropout_rate=training.dropout_rate,
      grad_clip=None if grad_clip is None else check_float(
          "grad_clip", grad_clip, 0.0, math.inf, low_open=True, high_open=True),
      schedule=schedules_lib.schedule_config(hparams, lookup),
  )


class TrainingConfig(NamedTuple):
  """What the glue itself reads: the loss's label smoothing and the model's dropout."""

  label_smoothing: float
  dropout_rate: Optional[float]


def training_config(hparams: Any) -> TrainingConfig:
  """``label_smoothing`` (default 0) and ``dropout_rate`` (default: the model's).

  ``None`` (self-tuning) gives the self-tuning points' values, which NadamW and
  Shampoo share.
  """
  if hparams is None:
    hparams = SELF_TUNING_NADAMW
  dropout = lookup(hparams, "dropout_rate", None)
  return TrainingConfig(
      label_smoothing=check_float("label_smoothing",
                                  lookup(hparams, "label_smoothing", 0.0), 0.0, 1.0,
                                  high_open=True),
      dropout_rate=None if dropout is None else check_float(
          "dropout_rate", dropout, 0.0, 1.0, high_open=True))


# ----------------------------------------------------------------------------
# Distributed Shampoo.

# Meta's AlgoPerf 2024 point 1, used for ``None``: point 1 of
# tuning_search_spaces/shampoo.json, key for key (a test holds them equal). It is
# NadamW's self-tuning point with Meta's recipe on top; the schedule runs over the
# whole step hint (``step_hint_factor`` 1), as the self-tuning baseline's does.
SELF_TUNING_SHAMPOO = {
    "shampoo_preset": "meta",
    "learning_rate": 0.0017486387539278373,
    "one_minus_beta1": 0.06733926164,
    "beta2": 0.9955159689799007,
    "weight_decay": 0.08121616522670176,
    "warmup_factor": 0.02,
    "step_hint_factor": 1.0,
    "momentum": 0.0,
    "use_nadam": True,
    "graft_type": "adam",
    "exponent_override": 0,
    "label_smoothing": 0.0,
    "dropout_rate": 0.1,
}

SHAMPOO_PRESETS = tuple(shampoo_lib.PRESETS)
META_ONLY = ("momentum", "use_nadam", "graft_type")  # refused with preset 'google'
DEFAULT_SHAMPOO_PRESET = "meta"


class ShampooConfig(NamedTuple):
  """The validated Shampoo hyperparameters: the schedule and `scale_by_shampoo`'s kwargs."""

  learning_rate: float
  warmup_factor: float
  schedule: schedules_lib.ScheduleConfig  # lr_schedule, step_hint_factor, ...
  grad_clip: Optional[float]
  preset: str
  transform: dict  # keyword arguments of `shampoo_lib.scale_by_shampoo`


def shampoo_config(hparams: Any) -> ShampooConfig:
  r"""Reads and checks the Shampoo hyperparameters; `None` means `SELF_TUNING_SHAMPOO`.

  Shared with NadamW's search spaces: ``learning_rate``, ``one_minus_beta1``,
  ``beta2``, ``weight_decay``, ``warmup_factor``, ``label_smoothing``,
  ``dropout_rate`` and optional ``grad_clip``. Then ``shampoo_preset``
  (``'meta'``, the default, or ``'google'``) decides what they mean:

  * ``'meta'`` (Meta's Distributed Shampoo, the AlgoPerf 2024 winner):
    ``1 - one_minus_beta1`` is the first-moment EMA decay (0 turns it off),
    ``beta2`` the factors' and Adam graft's decay; optional ``momentum``
    (Nesterov, default 0), ``use_nadam`` (default true), ``graft_type``
    (default ``'adam'``) and ``exponent_override`` (Meta's ``inv_root_override``,
    default 0 = 2 x rank). Weight decay is decoupled, :math:`\theta \leftarrow
    \theta - \eta (d + \lambda\theta)`.
  * ``'google'`` (the AlgoPerf JAX baseline's call of google-research's code):
    ``1 - one_minus_beta1`` is the moving-average Nesterov momentum of the step
    (Google's ``beta1``) and weight decay is added to the grafted step before
    momentum.

  Either preset takes the schedule's hyperparameters (`schedules`) and overrides of
  ``block_size``, ``preconditioning_every``, ``start_preconditioning_step``
  (-1: equal to ``preconditioning_every``), ``matrix_epsilon`` (the roots' ridge)
  and ``root_method``.
  """
  if hparams is None:
    hparams = SELF_TUNING_SHAMPOO
  preset = check_choice("shampoo_preset",
                        lookup(hparams, "shampoo_preset", DEFAULT_SHAMPOO_PRESET),
                        SHAMPOO_PRESETS)
  kwargs = _shampoo_moments(hparams, preset)
  kwargs.update(_shampoo_overrides(hparams))
  grad_clip = lookup(hparams, "grad_clip", None)
  return ShampooConfig(
      learning_rate=check_float("learning_rate", lookup(hparams, "learning_rate"),
                                0.0, math.inf, low_open=True, high_open=True),
      warmup_factor=check_float("warmup_factor", lookup(hparams, "warmup_factor"),
                                0.0, 1.0),
      schedule=schedules_lib.schedule_config(hparams, lookup),
      grad_clip=None if grad_clip is None else check_float(
          "grad_clip", grad_clip, 0.0, math.inf, low_open=True, high_open=True),
      preset=preset,
      transform=shampoo_lib.shampoo_hyperparameters(preset, **kwargs))


def _shampoo_moments(hparams: Any, preset: str) -> dict:
  """The moments' and weight decay's keyword arguments, as `preset` reads them."""
  one_minus_beta1 = check_float("one_minus_beta1", lookup(hparams, "one_minus_beta1"),
                                0.0, 1.0, low_open=True)
  kwargs = dict(
      beta2=check_float("beta2", lookup(hparams, "beta2"), 0.0, 1.0, high_open=True),
      weight_decay=check_float("weight_decay", lookup(hparams, "weight_decay"),
                               0.0, math.inf, high_open=True))
  if preset == "meta":
    kwargs.update(
        beta1=1.0 - one_minus_beta1,
        momentum=check_float("momentum", lookup(hparams, "momentum", 0.0), 0.0, 1.0,
                             high_open=True),
        use_nadam=check_bool("use_nadam", lookup(hparams, "use_nadam", True)),
        graft_type=check_choice("graft_type", lookup(hparams, "graft_type", "adam"),
                                shampoo_lib.GRAFT_TYPES))
    return kwargs
  for name in META_ONLY:
    if lookup(hparams, name, None) is not None:
      raise ValueError(
          f"hyperparameter {name!r} belongs to shampoo_preset 'meta'; with "
          "'google' the momentum is 1 - one_minus_beta1 and the graft is "
          "normalized RMSProp")
  kwargs.update(momentum=1.0 - one_minus_beta1)
  return kwargs


def _shampoo_overrides(hparams: Any) -> dict:
  """``exponent_override`` and the overrides, present only, of the preset's defaults."""
  kwargs = {"exponent_override": check_int(
      "exponent_override", lookup(hparams, "exponent_override", 0), 0)}
  for name, minimum in (("block_size", 1), ("preconditioning_every", 1),
                        ("start_preconditioning_step", -1)):
    value = lookup(hparams, name, None)
    if value is not None:
      kwargs[name] = check_int(name, value, minimum)
  matrix_epsilon = lookup(hparams, "matrix_epsilon", None)
  if matrix_epsilon is not None:
    kwargs["matrix_epsilon"] = check_float("matrix_epsilon", matrix_epsilon, 0.0,
                                           math.inf, low_open=True, high_open=True)
  root_method = lookup(hparams, "root_method", None)
  if root_method is not None:
    kwargs["root_method"] = check_choice("root_method", root_method,
                                         shampoo_lib.ROOT_METHODS)
  return kwargs


# ----------------------------------------------------------------------------
# Params snapshots for offline averaging (opt-in).

SNAPSHOT_DIR_ENV = "WEIGHT_AVERAGING_SNAPSHOT_DIR"


class SnapshotConfig(NamedTuple):
  """The validated snapshot hyperparameters: ``nu0`` and the directory."""

  every: int
  directory: str


def snapshot_config(hparams: Any, environ: Optional[dict] = None
                    ) -> Optional[SnapshotConfig]:
  """``snapshot_every`` (``nu0``) and ``snapshot_dir``; ``None`` when snapshots are off.

  Snapshots are off unless ``snapshot_every`` is present (an integer >= 1). The
  directory is the hyperparameter ``snapshot_dir``, else the environment variable
  ``WEIGHT_AVERAGING_SNAPSHOT_DIR``: the official runner hands a submission only
  its hyperparameters and the workload, not the trial's log directory. Give each
  run its own directory; one holding another run's snapshots is refused.
  """
  every = lookup(hparams, "snapshot_every", None)
  if every is None:
    if lookup(hparams, "snapshot_dir", None) is not None:
      raise ValueError("hyperparameter 'snapshot_dir' is set but 'snapshot_every' is "
                       "not: set 'snapshot_every' (nu0, in steps) to save snapshots")
    return None
  every = check_int("snapshot_every", every, 1)
  environ = os.environ if environ is None else environ
  directory = lookup(hparams, "snapshot_dir", None)
  if directory is None:
    directory = environ.get(SNAPSHOT_DIR_ENV) or None
  if directory is None:
    raise ValueError(
        "hyperparameter 'snapshot_every' is set but there is no directory for the "
        "snapshots: set the hyperparameter 'snapshot_dir' or the environment "
        f"variable {SNAPSHOT_DIR_ENV}")
  if not isinstance(directory, str) or not directory.strip():
    raise ValueError(f"hyperparameter 'snapshot_dir' must be a non-empty path, got "
                     f"{directory!r}")
  return SnapshotConfig(every=every, directory=directory)

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

import contextlib
import contextvars
import fractions
import math
import os
from typing import Any, Iterator, NamedTuple, Optional, Set

from weight_averaging import placement as placement_lib
from weight_averaging.algoperf_api import schedules as schedules_lib
from weight_averaging.optimizers import shampoo as shampoo_lib
from weight_averaging.validation import check_bool, check_choice, check_float, check_int

_MISSING = object()

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

# Self-tuning averaging: a window of 1% of the step hint, the paper's Fig. 3
# recommendation. LAWA: nu * k = 0.0005 * 20 = 1%. EMA: beta 0.9 with the same nu
# (App. B gives the same nu range for both; its mean sample age beta / (1 - beta) = 9
# samples is LAWA's (k - 1) / 2 = 9.5). The shipped search spaces use these values.
SELF_TUNING_AVERAGING = {"averaging_every_fraction": 0.0005,
                         "averaging_start_fraction": 0.0}
SELF_TUNING_EMA = {"ema_beta": 0.9}
SELF_TUNING_LAWA = {"lawa_k": 20}

# External tuning, a name not given: Ajroldi et al. (2025), App. B, "nu in the range
# 64-128 combined with L = 20" (LAWA), "nu between 64 and 128 with beta = 0.9" (EMA);
# the low end of nu, as the current step hints are shorter than the paper's.
DEFAULT_AVERAGING_EVERY = 64
DEFAULT_LAWA_K = 20
DEFAULT_EMA_BETA = 0.9
DEFAULT_AVERAGING_START_STEP = 0
DEFAULT_AVERAGING_PLACEMENT = "auto"  # `memory`: replicated where it fits, as on a CPU

# ----------------------------------------------------------------------------
# Lookup.


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
# Averaging.


class AveragingConfig(NamedTuple):
  """The validated averaging hyperparameters, fractions already resolved to steps."""

  every: int
  start_step: int
  placement: str


def every_steps(fraction: float, step_hint: int) -> int:
  """nu = max(1, round(fraction * step_hint)), exact (half to even) on the decimal given.

  The product is taken on the fraction's shortest decimal (``repr``, what a JSON file
  holds), so 0.1 * 120000 is 12000, not 12000.000000000002.
  """
  return max(1, round(fractions.Fraction(repr(float(fraction))) * step_hint))


def start_steps(fraction: float, step_hint: int) -> int:
  """start = ceil(fraction * step_hint), exact on the decimal given (see `every_steps`)."""
  return math.ceil(fractions.Fraction(repr(float(fraction))) * step_hint)


def _steps_or_fraction(hparams: Any, steps_name: str, fraction_name: str, *,
                       minimum: int, default: int, fraction_check: dict,
                       to_steps, step_hint: Optional[int]) -> int:
  """`steps_name` in steps, or `fraction_name` of `step_hint` made steps; not both."""
  steps = lookup(hparams, steps_name, None)
  fraction = lookup(hparams, fraction_name, None)
  if steps is not None and fraction is not None:
    raise ValueError(
        f"hyperparameters {steps_name!r} ({steps!r}) and {fraction_name!r} "
        f"({fraction!r}) are both given: give one, {steps_name!r} in steps or "
        f"{fraction_name!r} as a fraction of the workload's step_hint")
  if fraction is None:
    return check_int(steps_name, default if steps is None else steps, minimum)
  fraction = check_float(fraction_name, fraction, **fraction_check)
  if step_hint is None:
    raise ValueError(f"hyperparameter {fraction_name!r} is a fraction of the "
                     "workload's step_hint, and no step_hint was given")
  return to_steps(fraction, check_int("step_hint", step_hint, 1))


def averaging_config(hparams: Any, step_hint: Optional[int] = None) -> AveragingConfig:
  """What every averager shares: the interval nu, the first step, the placement.

  nu is ``averaging_every`` (steps, default `DEFAULT_AVERAGING_EVERY`) or
  ``averaging_every_fraction`` f in (0, 1]: nu = max(1, round(f * step_hint)). The
  first step is ``averaging_start_step`` (default 0) or ``averaging_start_fraction``
  f in [0, 1): ceil(f * step_hint). Giving both of a pair is an error naming both;
  ``null`` counts as not given, so a list search space can mix the two forms.
  ``averaging_placement`` is ``'auto'`` (default, `memory.placement_for`), ``'replicated'``,
  ``'sharded'`` or ``'host'``.
  ``None`` (self-tuning) reads `SELF_TUNING_AVERAGING`. The builder reads this once,
  at ``init_optimizer_state`` with the workload's step_hint, and hands it to the
  averager's recipe.
  """
  if hparams is None:
    hparams = SELF_TUNING_AVERAGING
  return AveragingConfig(
      every=_steps_or_fraction(
          hparams, "averaging_every", "averaging_every_fraction", minimum=1,
          default=DEFAULT_AVERAGING_EVERY, to_steps=every_steps, step_hint=step_hint,
          fraction_check=dict(low=0.0, high=1.0, low_open=True)),
      start_step=_steps_or_fraction(
          hparams, "averaging_start_step", "averaging_start_fraction", minimum=0,
          default=DEFAULT_AVERAGING_START_STEP, to_steps=start_steps,
          step_hint=step_hint, fraction_check=dict(low=0.0, high=1.0, high_open=True)),
      placement=check_choice("averaging_placement",
                             lookup(hparams, "averaging_placement",
                                    DEFAULT_AVERAGING_PLACEMENT),
                             placement_lib.CHOICES))


class EmaConfig(NamedTuple):
  """The validated EMA hyperparameter: the decay per sample."""

  beta: float


def ema_config(hparams: Any) -> EmaConfig:
  """``ema_beta`` in [0, 1), default `DEFAULT_EMA_BETA`; `SELF_TUNING_EMA` for ``None``."""
  hparams = SELF_TUNING_EMA if hparams is None else hparams
  return EmaConfig(beta=check_float("ema_beta",
                                    lookup(hparams, "ema_beta", DEFAULT_EMA_BETA),
                                    0.0, 1.0, high_open=True))


class LawaConfig(NamedTuple):
  """The validated LAWA hyperparameter: how many snapshots the mean holds."""

  k: int


def lawa_config(hparams: Any) -> LawaConfig:
  """``lawa_k`` >= 1, default `DEFAULT_LAWA_K`; `SELF_TUNING_LAWA` for ``None``."""
  hparams = SELF_TUNING_LAWA if hparams is None else hparams
  return LawaConfig(k=check_int("lawa_k", lookup(hparams, "lawa_k", DEFAULT_LAWA_K), 1))


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

"""The averaging hyperparameters: what every averager shares, EMA's and LAWA's own.

Read and checked as `hyperparameters` reads everything (`weight_averaging.validation`'s
rules, a bad value raises `ValueError` naming it); `hyperparameters` re-exports every
name here, so ``hp.averaging_config`` and the rest read as before.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, NamedTuple, Optional

from weight_averaging import placement as placement_lib
from weight_averaging.algoperf_api.reading import lookup
from weight_averaging.validation import check_choice, check_float, check_int

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
# What `prepare_for_eval` returns as the model state: the live run's (the paper's
# evaluation) or the average of the model states sampled with the params.
MODEL_STATE_CHOICES = ("live", "average")
DEFAULT_AVERAGING_MODEL_STATE = "live"


class AveragingConfig(NamedTuple):
  """The validated averaging hyperparameters, fractions already resolved to steps."""

  every: int
  start_step: int
  placement: str
  model_state: str = DEFAULT_AVERAGING_MODEL_STATE  # 'live' or 'average'


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
  ``averaging_model_state`` is ``'live'`` (default: the averaged params are
  evaluated with the live batch-norm statistics, as in the paper) or ``'average'``
  (the model state is averaged with the params, at the same steps; `builder`).
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
                             placement_lib.CHOICES),
      model_state=check_choice("averaging_model_state",
                               lookup(hparams, "averaging_model_state",
                                      DEFAULT_AVERAGING_MODEL_STATE),
                               MODEL_STATE_CHOICES))


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

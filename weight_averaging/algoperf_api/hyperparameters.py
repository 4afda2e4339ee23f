"""Reading and validating hyperparameters by name, and the batch sizes per workload.

AlgoPerf hands a submission its hyperparameters as a namedtuple (external tuning),
or ``None`` (self-tuning). Every value read here is checked for presence, type and
range, and a bad one raises `ValueError` naming the hyperparameter: a float is never
silently truncated (the 2024 LAWA EMA entry read ``int(lawa_beta)`` and turned
beta 0.2 into 0).

Integers accept integral floats (``64.0``), because a Halton search space with
``"scaling": "linear"`` hands out floats; ``64.5`` or ``True`` is an error.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, NamedTuple, Optional

import optax

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging.optimizers import nadamw as nadamw_lib
from weight_averaging.optimizers import shampoo as shampoo_lib

_MISSING = object()

# AlgoPerf's self-tuning NadamW point, used when the runner passes no hyperparameters.
SELF_TUNING_NADAMW = {
    "dropout_rate": 0.1,
    "learning_rate": 0.0017486387539278373,
    "one_minus_beta1": 0.06733926164,
    "beta2": 0.9955159689799007,
    "weight_decay": 0.08121616522670176,
    "warmup_factor": 0.02,
    "label_smoothing": 0.0,
}

# Averaging defaults, from Ajroldi et al. (2025), App. B: "nu in the range 64-128
# combined with L = 20" for LAWA and "nu between 64 and 128 with beta = 0.9" for EMA.
# We take the low end of nu: the window nu * k / step_hint should be about 1% of the
# budget, and the current step hints are shorter than the v0.5 ones the paper used,
# so nu = 64 keeps the window nearest to 1% (e.g. 64 * 20 / 120000 = 1.1% on WMT).
DEFAULT_AVERAGING_EVERY = 64
DEFAULT_LAWA_K = 20
DEFAULT_EMA_BETA = 0.9
DEFAULT_AVERAGING_START_STEP = 0
DEFAULT_AVERAGING_PLACEMENT = "replicated"

# Global batch sizes of AlgoPerf's reference NadamW submission.
BATCH_SIZES = {
    "criteo1tb": 262_144,
    "fastmri": 32,
    "imagenet_resnet": 1024,
    "imagenet_resnet_silu": 512,
    "imagenet_resnet_gelu": 512,
    "imagenet_vit": 1024,
    "librispeech_conformer": 256,
    "librispeech_deepspeech": 256,
    "ogbg": 512,
    "wmt": 128,
    "mnist": 16,
}


def get_batch_size(workload_name: str) -> int:
  """The reference NadamW global batch size; `ValueError` for an unknown name.

  The runner retries a variant (e.g. ``ogbg_gelu``) with its base workload's name
  when this raises `ValueError`.
  """
  if workload_name not in BATCH_SIZES:
    raise ValueError(f"Unsupported workload name: {workload_name!r}.")
  return BATCH_SIZES[workload_name]


# ----------------------------------------------------------------------------
# Lookup and checks.


def lookup(hparams: Any, name: str, default: Any = _MISSING) -> Any:
  """``hparams.name`` for a namedtuple or object, ``hparams[name]`` for a mapping."""
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


def _is_number(value) -> bool:
  # bool is an int subclass, but True is no learning rate.
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float(name: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> float:
  """`value` as a float in the interval; `ValueError` naming `name` otherwise."""
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if not _is_number(value):
    raise ValueError(f"hyperparameter {name!r} must be a number in {interval}, "
                     f"got {value!r} ({type(value).__name__})")
  value = float(value)
  ok = (not math.isnan(value) and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high))
  if not ok:
    raise ValueError(f"hyperparameter {name!r} must be a number in {interval}, "
                     f"got {value!r}")
  return value


def check_choice(name: str, value: Any, choices) -> Any:
  """`value` if it is one of `choices`; `ValueError` naming `name` otherwise."""
  if isinstance(value, bool) or value not in tuple(choices):
    raise ValueError(f"hyperparameter {name!r} must be one of {tuple(choices)}, "
                     f"got {value!r}")
  return value


def check_bool(name: str, value: Any) -> bool:
  """`value` as a bool: JSON ``true``/``false`` (or 0/1 from a grid)."""
  if isinstance(value, bool):
    return value
  if _is_number(value) and value in (0, 1):
    return bool(value)
  raise ValueError(f"hyperparameter {name!r} must be true or false, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= `minimum`; integral floats are accepted, others are not."""
  if not _is_number(value) or not float(value).is_integer():  # NaN and inf too
    raise ValueError(f"hyperparameter {name!r} must be an integer >= {minimum}, "
                     f"got {value!r} ({type(value).__name__})")
  if value < minimum:
    raise ValueError(f"hyperparameter {name!r} must be an integer >= {minimum}, "
                     f"got {value!r}")
  return int(value)


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
  )


def nadamw_from_hyperparameters(hparams: Any, step_hint: int, distribution: Any = None
                                ) -> optax.GradientTransformation:
  """AlgoPerf's reference NadamW for these hyperparameters and step hint.

  ``b1 = 1 - one_minus_beta1``, ``b2 = beta2``, ``eps = 1e-8``, weight decay on
  every param, `warmup_cosine_schedule` over `step_hint`, and the clipping of the
  reference when ``grad_clip`` is present. Every device does the same work, so
  ``distribution`` is not needed.
  """
  del distribution
  cfg = nadamw_config(hparams)
  step_hint = check_int("step_hint", step_hint, 1)
  schedule = nadamw_lib.warmup_cosine_schedule(cfg.learning_rate, cfg.warmup_factor,
                                               step_hint)
  return nadamw_lib.nadamw(schedule, b1=1.0 - cfg.one_minus_beta1, b2=cfg.beta2,
                           eps=nadamw_lib.EPS, weight_decay=cfg.weight_decay,
                           grad_clip=cfg.grad_clip)


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

# Meta's AlgoPerf 2024 point 1 (its self-tuning-like default), used for ``None``.
SELF_TUNING_SHAMPOO = {
    "shampoo_preset": "meta",
    "learning_rate": 0.0017486387539278373,
    "one_minus_beta1": 0.06733926164,
    "beta2": 1.0 - 0.004483819592,
    "weight_decay": 0.08121616522670176,
    "warmup_factor": 0.02,
    "label_smoothing": 0.0,
    "dropout_rate": 0.1,
}

SHAMPOO_PRESETS = tuple(shampoo_lib.PRESETS)
DEFAULT_SHAMPOO_PRESET = "meta"


class Distribution(NamedTuple):
  """Where a step runs, for optimizers that split work over devices.

  axis_name: the mapped axis inside `jax.pmap` (pmap API), else None.
  mesh: the jit API's mesh (axis ``mesh_axis_name``), else None.
  """

  axis_name: Optional[str] = None
  mesh: Any = None
  mesh_axis_name: str = "batch"


class ShampooConfig(NamedTuple):
  """The validated Shampoo hyperparameters: the schedule and `scale_by_shampoo`'s kwargs."""

  learning_rate: float
  warmup_factor: float
  step_hint_factor: float
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

  Either preset takes ``step_hint_factor`` (the schedule runs over
  ``step_hint * step_hint_factor`` steps, default 1) and overrides of
  ``block_size``, ``preconditioning_every``, ``start_preconditioning_step``
  (-1: equal to ``preconditioning_every``), ``matrix_epsilon`` (the roots' ridge)
  and ``root_method``.
  """
  if hparams is None:
    hparams = SELF_TUNING_SHAMPOO
  preset = check_choice("shampoo_preset",
                        lookup(hparams, "shampoo_preset", DEFAULT_SHAMPOO_PRESET),
                        SHAMPOO_PRESETS)
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
  else:
    for name in ("momentum", "use_nadam", "graft_type"):
      if lookup(hparams, name, None) is not None:
        raise ValueError(
            f"hyperparameter {name!r} belongs to shampoo_preset 'meta'; with "
            "'google' the momentum is 1 - one_minus_beta1 and the graft is "
            "normalized RMSProp")
    kwargs.update(momentum=1.0 - one_minus_beta1)
  kwargs["exponent_override"] = check_int(
      "exponent_override", lookup(hparams, "exponent_override", 0), 0)
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
  grad_clip = lookup(hparams, "grad_clip", None)
  return ShampooConfig(
      learning_rate=check_float("learning_rate", lookup(hparams, "learning_rate"),
                                0.0, math.inf, low_open=True, high_open=True),
      warmup_factor=check_float("warmup_factor", lookup(hparams, "warmup_factor"),
                                0.0, 1.0),
      step_hint_factor=check_float("step_hint_factor",
                                   lookup(hparams, "step_hint_factor", 1.0),
                                   0.0, math.inf, low_open=True, high_open=True),
      grad_clip=None if grad_clip is None else check_float(
          "grad_clip", grad_clip, 0.0, math.inf, low_open=True, high_open=True),
      preset=preset,
      transform=shampoo_lib.shampoo_hyperparameters(preset, **kwargs))


def shampoo_from_hyperparameters(hparams: Any, step_hint: int,
                                 distribution: Optional[Distribution] = None
                                 ) -> optax.GradientTransformation:
  """Distributed Shampoo (`shampoo_config`) with the reference warmup + cosine schedule.

  The schedule is `nadamw_lib.warmup_cosine_schedule` over
  ``round(step_hint * step_hint_factor)`` steps; ``grad_clip`` clips the gradient
  first, as the reference does. Under pmap the roots are split over the mapped
  axis, under jit over the mesh (`Distribution`); every device ends with the same
  roots as a single-device run.
  """
  cfg = shampoo_config(hparams)
  step_hint = check_int("step_hint", step_hint, 1)
  horizon = max(1, int(round(step_hint * cfg.step_hint_factor)))
  schedule = nadamw_lib.warmup_cosine_schedule(cfg.learning_rate, cfg.warmup_factor,
                                               horizon)
  distribution = distribution or Distribution()
  transform = dict(cfg.transform)
  if distribution.axis_name is not None:
    transform["axis_name"] = distribution.axis_name
  elif distribution.mesh is not None and distribution.mesh.size > 1:
    transform.update(mesh=distribution.mesh, mesh_axis_name=distribution.mesh_axis_name)
  chain = [] if cfg.grad_clip is None else [
      nadamw_lib.scale_by_clipped_global_norm(cfg.grad_clip)]
  chain += [shampoo_lib.scale_by_shampoo(**transform),
            optax.scale_by_learning_rate(schedule)]
  return optax.chain(*chain)


# ----------------------------------------------------------------------------
# Averaging.


class AveragingConfig(NamedTuple):
  """The validated averaging hyperparameters."""

  every: int
  start_step: int
  placement: str


def averaging_config(hparams: Any) -> AveragingConfig:
  """``averaging_every``, ``averaging_start_step`` and ``averaging_placement``."""
  name = lookup(hparams, "averaging_placement", DEFAULT_AVERAGING_PLACEMENT)
  if not isinstance(name, str) or name not in placement_lib.PLACEMENTS:
    raise ValueError(f"hyperparameter 'averaging_placement' must be one of "
                     f"{placement_lib.PLACEMENTS}, got {name!r}")
  return AveragingConfig(
      every=check_int("averaging_every",
                      lookup(hparams, "averaging_every", DEFAULT_AVERAGING_EVERY), 1),
      start_step=check_int("averaging_start_step",
                           lookup(hparams, "averaging_start_step",
                                  DEFAULT_AVERAGING_START_STEP), 0),
      placement=name)


def ema_from_hyperparameters(hparams: Any, placement: placement_lib.Placement
                             ) -> averagers.Averager:
  """`averagers.ema` with ``ema_beta`` (default 0.9) and the shared averaging ones."""
  cfg = averaging_config(hparams)
  beta = check_float("ema_beta", lookup(hparams, "ema_beta", DEFAULT_EMA_BETA),
                     0.0, 1.0, high_open=True)
  return averagers.ema(beta, every=cfg.every, start_step=cfg.start_step,
                       placement=placement)


def lawa_from_hyperparameters(hparams: Any, placement: placement_lib.Placement
                              ) -> averagers.Averager:
  """`averagers.lawa` with ``lawa_k`` (default 20) and the shared averaging ones."""
  cfg = averaging_config(hparams)
  k = check_int("lawa_k", lookup(hparams, "lawa_k", DEFAULT_LAWA_K), 1)
  return averagers.lawa(k, every=cfg.every, start_step=cfg.start_step,
                        placement=placement)


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

"""Optimizers and averagers built from validated hyperparameters: what a submission picks.

A recipe reads its hyperparameters through `hyperparameters` (every check happens
there) and returns an optax transform or an `averagers.Averager`; it computes
nothing else. `builder.build_submission` calls an optimizer recipe as
``make_optimizer(hyperparameters, step_hint, distribution)`` and an averager
recipe as ``make_averager(hyperparameters, averaging, placement)``, with the
averaging hyperparameters every averager shares already read (`hp.averaging_config`)
and the placement resolved for the API.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import optax

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.optimizers import common
from weight_averaging.optimizers import nadamw as nadamw_lib
from weight_averaging.optimizers import shampoo as shampoo_lib
from weight_averaging.validation import check_int


class Distribution(NamedTuple):
  """Where a step runs, for optimizers that split work over devices.

  axis_name: the mapped axis inside `jax.pmap` (pmap API), else None.
  mesh: the jit API's mesh (axis ``mesh_axis_name``), else None.
  """

  axis_name: Optional[str] = None
  mesh: Any = None
  mesh_axis_name: str = "batch"


# ----------------------------------------------------------------------------
# Optimizers: ``(hyperparameters, step_hint, distribution) -> GradientTransformation``.


def learning_rate_schedule(cfg: Any, step_hint: int) -> common.Schedule:
  """`common.lr_schedule` of an optimizer's config (`hp.NadamwConfig`, `hp.ShampooConfig`).

  Its ``learning_rate`` and ``warmup_factor``, and ``schedule`` (`schedules`): a
  warmup, then ``lr_schedule`` over ``round(step_hint * step_hint_factor)`` steps.
  """
  step_hint = check_int("step_hint", step_hint, 1)
  return common.lr_schedule(cfg.learning_rate, cfg.warmup_factor, step_hint,
                            **cfg.schedule._asdict())


def nadamw_from_hyperparameters(hparams: Any, step_hint: int,
                                distribution: Optional[Distribution] = None
                                ) -> optax.GradientTransformation:
  """AlgoPerf's reference NadamW for these hyperparameters (`hp.nadamw_config`).

  ``b1 = 1 - one_minus_beta1``, ``b2 = beta2``, ``eps = 1e-8``, weight decay on
  every param, the schedule of `learning_rate_schedule` (by default the reference's
  warmup + cosine to 0 over `step_hint`), and the clipping of the reference when
  ``grad_clip`` is present. Every device does the same work, so ``distribution`` is
  not needed.
  """
  del distribution
  cfg = hp.nadamw_config(hparams)
  schedule = learning_rate_schedule(cfg, step_hint)
  return nadamw_lib.nadamw(schedule, b1=1.0 - cfg.one_minus_beta1, b2=cfg.beta2,
                           eps=nadamw_lib.EPS, weight_decay=cfg.weight_decay,
                           grad_clip=cfg.grad_clip)


def shampoo_from_hyperparameters(hparams: Any, step_hint: int,
                                 distribution: Optional[Distribution] = None
                                 ) -> optax.GradientTransformation:
  """Distributed Shampoo (`hp.shampoo_config`) on the schedule of `learning_rate_schedule`.

  By default the schedule is the reference's warmup + cosine to 0 over
  ``round(step_hint * step_hint_factor)`` steps; ``grad_clip`` clips the gradient
  first, as the reference does. Under pmap the roots are split over the mapped
  axis, under jit over the mesh (`Distribution`); every device ends with the same
  roots as a single-device run.
  """
  cfg = hp.shampoo_config(hparams)
  schedule = learning_rate_schedule(cfg, step_hint)
  distribution = distribution or Distribution()
  transform = dict(cfg.transform)
  if distribution.axis_name is not None:
    transform["axis_name"] = distribution.axis_name
  elif distribution.mesh is not None and distribution.mesh.size > 1:
    transform.update(mesh=distribution.mesh, mesh_axis_name=distribution.mesh_axis_name)
  chain = [] if cfg.grad_clip is None else [
      common.scale_by_clipped_global_norm(cfg.grad_clip)]
  chain += [shampoo_lib.scale_by_shampoo(**transform),
            optax.scale_by_learning_rate(schedule)]
  return optax.chain(*chain)


# ----------------------------------------------------------------------------
# Averagers: ``(hyperparameters, averaging, placement) -> Averager``.


def ema_from_hyperparameters(hparams: Any, averaging: hp.AveragingConfig,
                             placement: placement_lib.Placement) -> averagers.Averager:
  """`averagers.ema` with ``ema_beta`` (`hp.ema_config`) and the shared `averaging`."""
  cfg = hp.ema_config(hparams)
  return averagers.ema(cfg.beta, every=averaging.every, start_step=averaging.start_step,
                       placement=placement)


def lawa_from_hyperparameters(hparams: Any, averaging: hp.AveragingConfig,
                              placement: placement_lib.Placement) -> averagers.Averager:
  """`averagers.lawa` with ``lawa_k`` (`hp.lawa_config`) and the shared `averaging`."""
  cfg = hp.lawa_config(hparams)
  return averagers.lawa(cfg.k, every=averaging.every, start_step=averaging.start_step,
                        placement=placement)

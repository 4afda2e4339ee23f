"""Study presets: the paper's Section 6 grids (``run_study.py --preset``), as search spaces.

Each preset turns a workload's config point (`configs.trial_hyperparameters`) into a list
of *variants* per submission; each variant is one trial, and its ``hparams.json`` holds
the whole point, so the trial itself says which variant it is: the learning rate and
every schedule name (``lr_schedule``, ``step_hint_factor``, ``lr_end_factor``,
``cooldown_fraction``, ``wsd_decay``; ``null`` where a schedule has no such name, so
that every point has the same names, as the official runner's list form needs), and
the submission directory says plain, EMA or LAWA. A preset runs the *family* of each
optimizer in ``--submissions`` (NadamW by default): ``<opt>``, ``<opt>_ema`` and
``<opt>_lawa``. Their trials are numbered alike, so ``trial_k`` is the same variant in
each submission (but ``schedules``, below).

``lr_sweep`` (Fig. 4, 6): top learning rate x {plain, +EMA, +LAWA}. Trial k runs
``learning_rate = lr_factors[k-1] * eta`` (eta: the config's point; factors 0.25, 0.5,
1, 2, 4 by default: the paper gives no grid for its AlgoPerf sweep, its language-model
grid steps by about 3x), each annealed to 0 over the step hint.

``schedules`` (Fig. 7a, 12): the plain optimizer on shorter cosine schedules, the
averages of the full-length run. The plain submission's trials are cosine schedules over
``round(f * step_hint)`` steps for each ``f`` of ``schedule_fractions`` (0.25, 0.5, 0.75
by default, the paper's {0.05, 0.1, 0.25, 0.5, 0.75} without the two that fit inside the
embedded workload's warmup) and ``f = 1``, each with the full run's warmup (the paper's
"same warmup": ``warmup_factor`` rescaled so that the warmup keeps its steps); EMA and
LAWA run one trial, the full cosine. With ``cooldown_branches`` (embedded runner) the
shorter schedules are instead warmup-stable-decay *cooldowns branched from one constant
trunk* (`weight_averaging.runner.branch`): trial 1 is the trunk (warmup, then constant:
the "no decay" run), trial 1 + i the branch of fraction ``f_i``, which starts
from the trunk's checkpoint at ``round(f_i * T) - C`` and decays linearly to 0 over the
last ``C = round(cooldown_fraction * T)`` steps of its horizon (the paper's cooldowns:
about 10 % of T), and the last trial the full cosine.

``annealing`` (Fig. 7b, 8): each of {plain, +EMA, +LAWA} annealed (cosine) to
``lr_end_factor * eta`` for each of ``end_factors`` (0 and 0.5 by default: to 0 and to
half), then not annealed at all (``lr_schedule`` constant).

On the embedded runner a preset's trials run to the step budget (``--stop_at_target
=false``): the figures read whole curves and the best score within the budget. The
official runner always stops at the targets.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from weight_averaging.algoperf_api import catalog
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.optimizers import common
from weight_averaging.studies import configs

PRESETS = ("lr_sweep", "schedules", "annealing")
DEFAULT_LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_SCHEDULE_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_END_FACTORS = (0.0, 0.5)
# The paper's cooldowns: 8k of 80k steps.
DEFAULT_COOLDOWN_FRACTION = 0.1
# Every point spells out the schedule's names (None: not this schedule's).
SCHEDULE_NAMES = ("lr_schedule", "step_hint_factor", "lr_end_factor", "cooldown_fraction",
                  "wsd_decay")
# Which preset reads which of its options (the flags of the same names).
_OWN_OPTIONS = {"lr_factors": "lr_sweep", "schedule_fractions": "schedules",
                "end_factors": "annealing", "cooldown_branches": "schedules",
                "cooldown_fraction": "schedules"}


class PresetOptions(NamedTuple):
  """A preset and its grid (the ``run_study`` flags of the same names); None: default."""
  name: str
  lr_factors: Optional[Tuple[float, ...]] = None
  schedule_fractions: Optional[Tuple[float, ...]] = None
  end_factors: Optional[Tuple[float, ...]] = None
  cooldown_branches: bool = False
  cooldown_fraction: Optional[float] = None


class Variant(NamedTuple):
  """One trial of a preset: its label, its full point and, for a cooldown branch, the
  trunk's trial number and the step it branches at; `keep_steps` for a trunk."""
  label: str
  point: Dict[str, Any]
  branch: Optional[Tuple[int, int]] = None
  keep_steps: Tuple[int, ...] = ()


def _values(flag: str, values: Sequence[float], low: float, high: float,
            low_open: bool) -> Tuple[float, ...]:
  if not values:
    raise ValueError(f"--{flag} must list at least one value")
  for v in values:
    bad = (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)
           or v > high or v < low or (low_open and v == low))
    if bad:
      interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
      raise ValueError(f"--{flag}: {v!r} is outside {interval}")
  if len(set(values)) != len(values):
    raise ValueError(f"--{flag}: {sorted(values)} lists a value twice")
  return tuple(float(v) for v in values)


def check(options: PresetOptions) -> PresetOptions:
  """The options with defaults filled in; `ValueError` naming the flag and the value."""
  if options.name not in PRESETS:
    raise ValueError(f"unknown --preset {options.name!r}: use one of {', '.join(PRESETS)}")
  for field, preset in _OWN_OPTIONS.items():
    value = getattr(options, field)
    if value not in (None, False) and preset != options.name:
      raise ValueError(f"--{field} belongs to --preset={preset}, not --preset="
                       f"{options.name}: drop it")
  if options.cooldown_fraction is not None and not options.cooldown_branches:
    raise ValueError(f"--cooldown_fraction={options.cooldown_fraction:g} is the length of the "
                     "cooldowns of --cooldown_branches, and the cosine schedules have none: add "
                     "--cooldown_branches or drop --cooldown_fraction")
  return options._replace(
      lr_factors=_values("lr_factors", options.lr_factors or DEFAULT_LR_FACTORS,
                         0.0, math.inf, True),
      schedule_fractions=_values(
          "schedule_fractions", options.schedule_fractions or DEFAULT_SCHEDULE_FRACTIONS,
          0.0, 1.0, True),
      end_factors=_values("end_factors", DEFAULT_END_FACTORS if options.end_factors is None
                          else options.end_factors, 0.0, 1.0, False),
      cooldown_fraction=_values("cooldown_fraction", (
          DEFAULT_COOLDOWN_FRACTION if options.cooldown_fraction is None
          else options.cooldown_fraction,), 0.0, 1.0, True)[0])


def family(submissions: Sequence[str]) -> Tuple[str, ...]:
  """Each optimizer of `submissions` with its averaged submissions, in catalog order."""
  optimizers = {catalog.get(s).optimizer for s in submissions}
  return tuple(s for s in catalog.NAMES if catalog.get(s).optimizer in optimizers)


def _schedule(kind: str = "cosine", step_hint_factor: float = 1.0,
              lr_end_factor: Optional[float] = 0.0, cooldown_fraction: Optional[float] = None,
              wsd_decay: Optional[str] = None) -> Dict[str, Any]:
  return dict(zip(SCHEDULE_NAMES, (kind, step_hint_factor, lr_end_factor,
                                   cooldown_fraction, wsd_decay)))


def same_warmup(warmup_factor: float, step_hint: int, fraction: float) -> float:
  """The ``warmup_factor`` that gives a schedule over ``round(fraction * step_hint)``
  steps the full run's warmup ``W = int(warmup_factor * step_hint)`` steps exactly."""
  warmup = int(warmup_factor * step_hint)
  horizon = common.horizon_steps(step_hint, fraction)
  if warmup > horizon:
    raise ValueError(
        f"--schedule_fractions: {fraction:g} makes a schedule of {horizon} steps, shorter "
        f"than the warmup of {warmup} steps (warmup_factor {warmup_factor:g} of "
        f"{step_hint}): use fractions >= {warmup / step_hint:g}")
  for candidate in (warmup_factor / fraction, warmup / horizon, (warmup + 0.5) / horizon):
    if candidate <= 1.0 and int(candidate * horizon) == warmup:
      return candidate
  raise AssertionError("unreachable: (W + 0.5) / H gives W")


def _lr_sweep(options: PresetOptions, base: Dict[str, Any]) -> List[Variant]:
  return [Variant(f"top LR {f:g} x {base['learning_rate']:g}",
                  dict(base, learning_rate=f * base["learning_rate"], **_schedule()))
          for f in options.lr_factors]


def _annealing(options: PresetOptions, base: Dict[str, Any]) -> List[Variant]:
  out = [Variant(f"anneal to {e:g} x top LR", dict(base, **_schedule(lr_end_factor=e)))
         for e in options.end_factors]
  return out + [Variant("no decay (constant)", dict(base, **_schedule(
      "constant", lr_end_factor=None)))]


def _shorter(base: Dict[str, Any], step_hint: int, f: float) -> Dict[str, Any]:
  warmup = same_warmup(base["warmup_factor"], step_hint, f)
  return dict(base, warmup_factor=warmup, **_schedule(step_hint_factor=f))


def _branches(options: PresetOptions, base: Dict[str, Any], step_hint: int,
              fractions: Sequence[float]) -> List[Variant]:
  """The constant trunk (trial 1) and a WSD cooldown branched from it per fraction."""
  cooldown = max(1, int(round(options.cooldown_fraction * step_hint)))
  warmup = int(base["warmup_factor"] * step_hint)
  out = []
  for f in fractions:
    horizon = common.horizon_steps(step_hint, f)
    start = horizon - cooldown
    if start < max(warmup, 1):
      raise ValueError(
          f"--cooldown_fraction={options.cooldown_fraction:g}: a cooldown of {cooldown} "
          f"steps does not fit after the {warmup}-step warmup in the {horizon}-step "
          f"schedule of fraction {f:g}: use a smaller cooldown or larger fractions")
    point = dict(base, warmup_factor=same_warmup(base["warmup_factor"], step_hint, f),
                 **_schedule("wsd", f, 0.0, cooldown / horizon, "linear"))
    out.append(Variant(f"cooldown over steps {start}-{horizon} ({f:g} x step hint), "
                       f"branched from trial 1", point, branch=(1, start)))
  trunk = Variant("trunk: no decay (constant)",
                  dict(base, **_schedule("constant", lr_end_factor=None)),
                  keep_steps=tuple(sorted({v.branch[1] for v in out})))
  return [trunk] + out


def _schedules(options: PresetOptions, base: Dict[str, Any], step_hint: int,
               averaged: bool) -> List[Variant]:
  full = Variant("cosine over the full step hint", dict(base, **_schedule()))
  if averaged:
    return [full]
  fractions = sorted(options.schedule_fractions)
  if options.cooldown_branches:
    return _branches(options, base, step_hint, fractions) + [full]
  return [Variant(f"cosine over {f:g} x step hint", _shorter(base, step_hint, f))
          for f in fractions if f < 1.0] + [full]


def variants(options: PresetOptions, config: configs.WorkloadConfig, submission: str,
             api: str) -> List[Variant]:
  """The trials of `submission` on the workload of `config` under the (checked) preset."""
  base = configs.trial_hyperparameters(config, submission, api)
  for name in ("learning_rate", "warmup_factor"):
    if base.get(name) is None:
      raise ValueError(f"{config.path}: {submission}'s point has no {name!r}, which "
                       f"--preset={options.name} varies: spell it out")
  sub = catalog.get(submission)
  if options.name == "lr_sweep":
    out = _lr_sweep(options, base)
  elif options.name == "annealing":
    out = _annealing(options, base)
  else:
    out = _schedules(options, base, config.step_hint, averaged=sub.averager is not None)
  validate = hp.nadamw_config if sub.optimizer == "nadamw" else hp.shampoo_config
  for k, v in enumerate(out, start=1):  # as the submission will check them
    try:
      validate(v.point)
      hp.averaging_config(v.point)
    except ValueError as e:
      raise ValueError(f"--preset={options.name}: {submission} trial_{k} ({v.label}) on "
                       f"{config.workload}: {e}") from None
  return out


def describe(options: PresetOptions, config: configs.WorkloadConfig,
             trials: Dict[str, List[Variant]]) -> str:
  """A short human-readable account of the preset on one workload (markdown)."""
  lines = [f"# --preset={options.name} on {config.workload}", "",
           f"``{options.name}`` (" + __doc__.split(f"\n\n``{options.name}`` (", 1)[1]
           .split("\n\n", 1)[0].replace("\n", " ").strip(), ""]
  for submission, items in trials.items():
    lines.append(f"## {submission}")
    lines += [f"- trial_{k}: {v.label}: learning_rate {v.point['learning_rate']:g}, "
              + ", ".join(f"{n} {json.dumps(v.point[n])}" for n in SCHEDULE_NAMES)
              for k, v in enumerate(items, start=1)]
    lines.append("")
  return "\n".join(lines)

"""Per-workload study configuration: `workloads_config/<workload>.json`, loaded and checked.

One file per workload holds what a study on it needs and the paper fixes:

* ``workload``: the name, equal to the file's stem;
* ``runner``: ``"official"`` (AlgoPerf's ``submission_runner.py``) or ``"embedded"``
  (``weight_averaging.runner``);
* ``nadamw`` and ``shampoo``: ``{"point": int, "source": str, "hyperparameters": {...}}``, the
  optimizer's point the paper used on this workload (the fastest of the five published points
  in the v0.5 logs, ``point`` numbering them from 1 as in ``tuning_search_spaces/``; Meta's
  point 1 where the paper names no Shampoo point);
* ``averaging``: ``{"averaging_every", "lawa_k", "ema_beta", "averaging_start_step"}`` plus an
  optional ``averaging_placement`` (``{"jit": str, "pmap": str}``) and the ``arithmetic`` that
  led to them;
* ``data_flags``: the official runner's data flags (``data_dir``, ``imagenet_v2_data_dir``,
  ``librispeech_tokenizer_vocab_path``) with a ``{data_root}`` placeholder the user fills;
* ``notes`` (optional): free text.

What the workload's own code fixes is not restated here: the step hint, the runtime budget and
the targets (``WorkloadConfig.step_hint``, ``max_allowed_runtime_sec``, ``step_hint_v05``,
``target``) come from `weight_averaging.studies.workload_facts`, AlgoPerf's workloads from its
table and the embedded one from its class; a file that states them is refused.

**The averaging rule** (paper App. B: window ``nu * k`` about 1% of training; LAWA ``k = 20``,
EMA ``beta = 0.9``): ``nu = round(0.01 * step_hint / 20)``, the same ``nu`` for EMA, whose
samples lie on average ``beta / (1 - beta) = 9`` samples back, like LAWA's ``(k - 1) / 2 = 9.5``.
With the current step hints this gives nu = 5 (criteo1tb), 9 (fastmri), 84 (imagenet_vit),
38 (librispeech_conformer), 19 (librispeech_deepspeech), 26 (ogbg), 60 (wmt): windows of 0.94%
to 1.00%. On the embedded workload (step hint 2000) the rule gives nu = 1, which the paper finds
poor for EMA, so it uses nu = 4 with k = 10 (a 2% window). Each file spells its arithmetic out.

A file that is missing, unreadable, has an unknown or missing key, or a bad value raises a
`ValueError` naming the file and the key. The points are checked with the same validators the
submissions use (`weight_averaging.algoperf_api.hyperparameters`, on `weight_averaging.validation`),
so a point that loads here is one the submission accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from weight_averaging import validation
from weight_averaging.algoperf_api import catalog
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.studies import workload_facts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "workloads_config")
SEARCH_SPACE_DIR = os.path.join(REPO, "tuning_search_spaces")

APIS = ("jit", "pmap")
RUNNERS = ("official", "embedded")
# The official runner's data flags a config may set.
DATA_FLAGS = ("data_dir", "imagenet_v2_data_dir", "librispeech_tokenizer_vocab_path")
DATA_PLACEHOLDERS = ("data_root",)

_REQUIRED = ("workload", "runner") + catalog.OPTIMIZERS + ("averaging", "data_flags")
_OPTIONAL = ("notes",)
# The workload's own facts (`workload_facts`), which a config file must not restate.
_FACTS = ("step_hint", "step_hint_v05", "max_allowed_runtime_sec", "target")
_AVERAGING_REQUIRED = ("averaging_every", "lawa_k", "ema_beta", "averaging_start_step")
_AVERAGING_OPTIONAL = ("averaging_placement", "arithmetic")
_AVERAGING_NAMES = _AVERAGING_REQUIRED + ("averaging_placement",)
_NAME = re.compile(r"^[a-z0-9_]+$")


class Target(NamedTuple):
  """A workload's targets: `metric` without its split prefix, e.g. ``'bleu'``."""
  metric: str
  validation: float
  test: Optional[float]   # None: the workload has no test target
  minimize: bool
  strict: bool = True

  def reached(self, value: float, split_target: Optional[float]) -> bool:
    """Whether `value` meets `split_target` by the workload's own rule
    (`workload_facts.target_met`); a split without a target is always met."""
    if split_target is None:
      return True
    if value is None or math.isnan(value):
      return False
    return bool(workload_facts.target_met(value, split_target, self.minimize, self.strict))


class Averaging(NamedTuple):
  every: int
  lawa_k: int
  ema_beta: float
  start_step: int
  placement: Dict[str, str]  # api -> placement


class OptimizerPoint(NamedTuple):
  point: int
  source: str
  hyperparameters: Dict[str, Any]


class WorkloadConfig(NamedTuple):
  """A validated `workloads_config/<workload>.json`, with the workload's facts."""
  workload: str
  runner: str
  step_hint: int
  max_allowed_runtime_sec: float
  target: Target
  optimizers: Dict[str, OptimizerPoint]  # 'nadamw' / 'shampoo'
  averaging: Averaging
  data_flags: Dict[str, str]
  step_hint_v05: Optional[int]
  path: str

  def window_fraction(self) -> float:
    """LAWA's averaging window ``nu * k`` as a fraction of the step hint."""
    return self.averaging.every * self.averaging.lawa_k / self.step_hint


# ----------------------------------------------------------------------------
# Small checks that name what is wrong.


def _fail(path: str, key: str, message: str):
  raise ValueError(f"{path}: {key}: {message}")


def _get(path: str, mapping: Mapping[str, Any], key: str, prefix: str = "") -> Any:
  if key not in mapping:
    _fail(path, prefix + key, "missing")
  return mapping[key]


def _check_keys(path: str, mapping: Any, required, optional=(), prefix: str = "") -> None:
  """`mapping` is a dict with every key of `required` and no key outside both lists."""
  if not isinstance(mapping, dict):
    _fail(path, prefix.rstrip(".") or "file", f"must be a JSON object, got {mapping!r}")
  for key in required:
    _get(path, mapping, key, prefix)
  unknown = sorted(set(mapping) - set(required) - set(optional))
  if unknown:
    _fail(path, prefix + unknown[0], f"unknown key (allowed: {sorted(required + optional)})")


def _per_api(path: str, key: str, value: Any, check) -> Dict[str, Any]:
  """A ``{"jit": ..., "pmap": ...}`` field, each value passed through `check`."""
  _check_keys(path, value, APIS, prefix=key + ".")
  return {api: check(path, f"{key}.{api}", value[api]) for api in APIS}


def _hparam_check(path: str, key: str, fn, *args) -> Any:
  """Runs a validator (`validation`, `hyperparameters`), re-raising its error with the file
  and key."""
  try:
    return fn(*args)
  except ValueError as e:
    raise ValueError(f"{path}: {key}: {e}") from None


# ----------------------------------------------------------------------------
# Parsing the parts of a file.


def _facts(path: str, name: str, raw: Mapping[str, Any]) -> workload_facts.WorkloadFacts:
  """The workload's own facts; `ValueError` for a file that restates them."""
  stated = [k for k in _FACTS if k in raw]
  if stated:
    _fail(path, stated[0], "is the workload's own fact: it comes from "
                           "weight_averaging.studies.workload_facts, not the config file")
  try:
    return workload_facts.facts(name)
  except ValueError as e:
    _fail(path, "workload", str(e))


def _parse_optimizer(path: str, name: str, value: Any) -> OptimizerPoint:
  _check_keys(path, value, ("point", "source", "hyperparameters"), prefix=name + ".")
  point = _hparam_check(path, f"{name}.point", validation.check_int, "point", value["point"], 1)
  if not isinstance(value["source"], str):
    _fail(path, f"{name}.source", f"must be a string, got {value['source']!r}")
  hparams = value["hyperparameters"]
  key = f"{name}.hyperparameters"
  if not isinstance(hparams, dict) or not hparams:
    _fail(path, key, f"must be a non-empty JSON object, got {hparams!r}")
  averaging = sorted(set(hparams) & set(_AVERAGING_NAMES + ("ema_beta", "lawa_k")))
  if averaging:
    _fail(path, f"{key}.{averaging[0]}", "averaging hyperparameters belong in 'averaging'")
  validate = hp.nadamw_config if name == "nadamw" else hp.shampoo_config
  _hparam_check(path, key, validate, hparams)
  _hparam_check(path, key, hp.training_config, hparams)
  return OptimizerPoint(point, value["source"], dict(hparams))


def _parse_averaging(path: str, value: Any) -> Averaging:
  _check_keys(path, value, _AVERAGING_REQUIRED, _AVERAGING_OPTIONAL, prefix="averaging.")
  every = _hparam_check(path, "averaging.averaging_every", validation.check_int,
                        "averaging_every", value["averaging_every"], 1)
  k = _hparam_check(path, "averaging.lawa_k", validation.check_int, "lawa_k", value["lawa_k"], 1)
  beta = _hparam_check(path, "averaging.ema_beta", lambda v: validation.check_float(
      "ema_beta", v, 0.0, 1.0, high_open=True), value["ema_beta"])
  start = _hparam_check(path, "averaging.averaging_start_step", validation.check_int,
                        "averaging_start_step", value["averaging_start_step"], 0)
  placement = {api: hp.DEFAULT_AVERAGING_PLACEMENT for api in APIS}
  if "averaging_placement" in value:
    placement = _per_api(path, "averaging.averaging_placement", value["averaging_placement"],
                         lambda p, k_, v: v)
    for api, name in placement.items():
      key = f"averaging.averaging_placement.{api}"
      _hparam_check(path, key, hp.averaging_config, {"averaging_placement": name})
      if api == "pmap" and name != "replicated":
        _fail(path, key, f"the pmap API supports only 'replicated' (its runner checkpoints "
                         f"x[0] of every leaf), got {name!r}")
  return Averaging(every, k, beta, start, placement)


def _parse_data_flags(path: str, value: Any, runner: str) -> Dict[str, str]:
  _check_keys(path, value, (), DATA_FLAGS, prefix="data_flags.")
  for flag, template in value.items():
    key = f"data_flags.{flag}"
    if not isinstance(template, str) or not template:
      _fail(path, key, f"must be a non-empty string, got {template!r}")
    try:
      names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
      _fail(path, key, f"bad placeholder in {template!r}: {e}")
    unknown = sorted(names - set(DATA_PLACEHOLDERS))
    if unknown:
      _fail(path, key, f"unknown placeholder {{{unknown[0]}}} (allowed: "
                       f"{['{' + p + '}' for p in DATA_PLACEHOLDERS]})")
  if runner == "official" and "data_dir" not in value:
    _fail(path, "data_flags.data_dir", "missing: the official runner needs the dataset's path")
  return dict(value)


def parse_config(raw: Any, path: str, expected_name: Optional[str] = None) -> WorkloadConfig:
  """Validates a decoded config file and adds the workload's facts; `path` names it in errors."""
  _check_keys(path, raw, _REQUIRED, _OPTIONAL + _FACTS)
  name = raw["workload"]
  if not isinstance(name, str) or not _NAME.match(name):
    _fail(path, "workload", f"must be a workload name, got {name!r}")
  if expected_name is not None and name != expected_name:
    _fail(path, "workload", f"is {name!r}, but the file is named for {expected_name!r}")
  runner = raw["runner"]
  if runner not in RUNNERS:
    _fail(path, "runner", f"must be one of {RUNNERS}, got {runner!r}")
  if "notes" in raw and not isinstance(raw["notes"], str):
    _fail(path, "notes", f"must be a string, got {raw['notes']!r}")
  facts = _facts(path, name, raw)
  return WorkloadConfig(
      workload=name, runner=runner, step_hint=facts.step_hint,
      max_allowed_runtime_sec=facts.max_allowed_runtime_sec,
      target=Target(facts.metric, facts.validation_target, facts.test_target, facts.minimize,
                    facts.strict),
      optimizers={o: _parse_optimizer(path, o, raw[o]) for o in catalog.OPTIMIZERS},
      averaging=_parse_averaging(path, raw["averaging"]),
      data_flags=_parse_data_flags(path, raw["data_flags"], runner),
      step_hint_v05=facts.step_hint_v05, path=path)


# ----------------------------------------------------------------------------
# Loading.


def available_workloads(config_dir: str = CONFIG_DIR) -> Tuple[str, ...]:
  """The workloads that have a config file in `config_dir`."""
  if not os.path.isdir(config_dir):
    raise ValueError(f"workload config directory {config_dir} does not exist")
  return tuple(sorted(f[:-len(".json")] for f in os.listdir(config_dir) if f.endswith(".json")))


def load(workload: str, config_dir: str = CONFIG_DIR) -> WorkloadConfig:
  """The validated config of `workload`; `ValueError` for an unknown workload or a bad file."""
  known = available_workloads(config_dir)
  if workload not in known:
    raise ValueError(f"unknown workload {workload!r}: {config_dir} has configs for "
                     f"{', '.join(known) or 'none'}")
  path = os.path.join(config_dir, f"{workload}.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  return parse_config(raw, path, expected_name=workload)


def load_all(config_dir: str = CONFIG_DIR) -> Dict[str, WorkloadConfig]:
  """Every config in `config_dir`, validated."""
  return {w: load(w, config_dir) for w in available_workloads(config_dir)}


# ----------------------------------------------------------------------------
# What a trial uses.


def _check_api(api: str) -> None:
  if api not in APIS:
    raise ValueError(f"api must be one of {APIS}, got {api!r}")


def averaging_hyperparameters(config: WorkloadConfig, averager: Optional[str],
                              api: str) -> Dict[str, Any]:
  """The averaging names a submission with `averager` (None, 'ema', 'lawa') reads."""
  if averager is None:
    return {}
  avg = config.averaging
  out = {"averaging_every": avg.every, "averaging_start_step": avg.start_step}
  out.update({"ema_beta": avg.ema_beta} if averager == "ema" else {"lawa_k": avg.lawa_k})
  if avg.placement[api] != hp.DEFAULT_AVERAGING_PLACEMENT:
    out["averaging_placement"] = avg.placement[api]
  return out


def trial_hyperparameters(config: WorkloadConfig, submission: str, api: str) -> Dict[str, Any]:
  """The hyperparameters the paper's trial of `submission` on this workload uses under `api`.

  The optimizer's point of the config plus, for ``*_ema`` and ``*_lawa``, the averaging ones.
  """
  _check_api(api)
  sub = catalog.get(submission)
  point = dict(config.optimizers[sub.optimizer].hyperparameters)
  point.update(averaging_hyperparameters(config, sub.averager, api))
  return point


def official_points(config: WorkloadConfig, optimizer: str,
                    search_space_dir: str = SEARCH_SPACE_DIR) -> List[Dict[str, Any]]:
  """The optimizer's published points (the five of AlgoPerf's NadamW baseline or Meta's
  Shampoo; the embedded workload's own for ``runner == 'embedded'``), without averaging names."""
  sub = "embedded" if config.runner == "embedded" else ""
  path = os.path.join(search_space_dir, sub, f"{optimizer}.json")
  with open(path) as f:
    points = json.load(f)
  if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
    raise ValueError(f"{path}: expected a list of hyperparameter points")
  return [{k: v for k, v in p.items() if k not in _AVERAGING_NAMES + ("ema_beta", "lawa_k")}
          for p in points]


SEARCH_SPACES = ("paper", "all")


def search_space(config: WorkloadConfig, submission: str, api: str, which: str = "paper",
                 search_space_dir: str = SEARCH_SPACE_DIR) -> List[Dict[str, Any]]:
  """The list-form search space (AlgoPerf's JSON format) of a study's trials.

  ``"paper"``: one point, `trial_hyperparameters`. ``"all"``: every published point of the
  optimizer (AlgoPerf's external-tuning rules: five trials), each with this workload's
  averaging hyperparameters. Every point is checked as the submission would check it.
  """
  _check_api(api)
  if which not in SEARCH_SPACES:
    raise ValueError(f"search space must be one of {SEARCH_SPACES}, got {which!r}")
  sub = catalog.get(submission)
  if which == "paper":
    points = [trial_hyperparameters(config, submission, api)]
  else:
    extra = averaging_hyperparameters(config, sub.averager, api)
    points = [dict(p, **extra) for p in official_points(config, sub.optimizer, search_space_dir)]
  for i, point in enumerate(points, start=1):
    where = f"{config.path}: {submission} point {i}"
    validate = hp.nadamw_config if sub.optimizer == "nadamw" else hp.shampoo_config
    _hparam_check(where, "hyperparameters", validate, point)
    _hparam_check(where, "hyperparameters", hp.averaging_config, point)
  return points


def data_flags(config: WorkloadConfig, data_root: Optional[str]) -> Dict[str, str]:
  """The config's data flags with ``{data_root}`` filled; `ValueError` if one is needed and
  `data_root` is not given."""
  if not config.data_flags:
    return {}
  if not data_root:
    raise ValueError(f"workload {config.workload!r} needs --data_root (its data flags: "
                     f"{', '.join(f'--{k}={v}' for k, v in config.data_flags.items())})")
  root = os.path.abspath(os.path.expanduser(data_root))
  return {flag: template.format(data_root=root) for flag, template in config.data_flags.items()}

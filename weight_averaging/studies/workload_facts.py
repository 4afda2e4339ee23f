"""What a workload fixes, stated once: targets, metric, budgets, step hints, and "target met".

`ALGOPERF_WORKLOADS` holds AlgoPerf's nine JAX workloads as their own code states them (the
file named in each ``source``): the validation and test targets of the metric, its direction,
the runtime budget ``max_allowed_runtime_sec``, the ``step_hint`` (jit API main at 2c90454f;
the pmap commit fb2f492a agrees on every one) and, for the paper's workloads, the v0.5 step
hint the paper's runs used. ``paper`` marks the paper's seven (imagenet_resnet is left out: no
baseline reaches its target; finewebedu_lm came later); `BASE_WORKLOADS` are the eight
AlgoPerf's score is defined over. The embedded workloads (`weight_averaging.workloads`) state
their facts as class attributes; `facts` reads either.

**Target met** is the workload's own rule (its ``has_reached_validation_target``):
``metric < target`` for a lower-is-better metric, ``metric > target`` otherwise, for the eight
base workloads and the embedded one; finewebedu_lm compares inclusively (``<=``), which
``strict=False`` records. A NaN never meets a target.

This module imports nothing of the package at load time (the study grid's stand-in runner
reads it as a file).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

# Metric directions, as AlgoPerf's scoring defines them (lower / higher is better).
MINIMIZED_METRICS = ("ce_loss", "error_rate", "ctc_loss", "wer", "l1_loss", "loss", "ppl")
MAXIMIZED_METRICS = ("mean_average_precision", "ssim", "accuracy", "bleu")


class WorkloadFacts(NamedTuple):
  """One workload: `metric` is the name without its split, e.g. ``'bleu'``."""
  name: str
  metric: str
  validation_target: float
  test_target: Optional[float]   # None: the workload has no test target
  minimize: bool
  max_allowed_runtime_sec: float
  step_hint: int
  source: str
  strict: bool = True            # target met: metric < target (> when maximizing)
  step_hint_v05: Optional[int] = None
  paper: bool = False            # one of the paper's seven workloads


def _algoperf(name, metric, validation, test, runtime, step_hint, path, *, strict=True,
              v05=None, paper=True, commit="2c90454f"):
  return WorkloadFacts(name, metric, validation, test, metric_minimized(metric), float(runtime),
                       step_hint, f"algoperf {commit} algoperf/workloads/{path}", strict, v05,
                       paper)


def metric_minimized(metric: str) -> bool:
  """True for a lower-is-better metric name ('loss', 'validation/wer'), False for higher."""
  name = metric.split("/", 1)[-1]
  if name in MINIMIZED_METRICS:
    return True
  if name in MAXIMIZED_METRICS:
    return False
  raise ValueError(f"unknown direction for metric {metric!r}: known lower-is-better "
                   f"{MINIMIZED_METRICS}, higher-is-better {MAXIMIZED_METRICS}")


# ViT and DeepSpeech inherit the metric and targets' form of ResNet and Conformer; the
# accuracy targets are 1 - the error rates the code states. Targets are unchanged since v0.5.
ALGOPERF_WORKLOADS: Dict[str, WorkloadFacts] = {w.name: w for w in (
    _algoperf("criteo1tb", "loss", 0.123735, 0.126041, 7_703, 10_666,
              "criteo1tb/workload.py", v05=10_666),
    _algoperf("fastmri", "ssim", 0.723653, 0.740633, 4_430, 18_094,
              "fastmri/workload.py", v05=36_189),
    _algoperf("imagenet_resnet", "accuracy", 1 - 0.22569, 1 - 0.3440, 66_159, 195_999,
              "imagenet_resnet/workload.py", paper=False),
    _algoperf("imagenet_vit", "accuracy", 1 - 0.22691, 1 - 0.3481, 69_768, 167_999,
              "imagenet_vit/workload.py", v05=186_666),
    _algoperf("librispeech_conformer", "wer", 0.085884, 0.052981, 58_015, 76_000,
              "librispeech_conformer/workload.py", v05=80_000),
    _algoperf("librispeech_deepspeech", "wer", 0.119936, 0.074143, 44_405, 38_400,
              "librispeech_deepspeech/librispeech_jax/workload.py", v05=48_000),
    _algoperf("ogbg", "mean_average_precision", 0.28098, 0.268729, 12_011, 52_000,
              "ogbg/workload.py", v05=80_000),
    _algoperf("wmt", "bleu", 30.8491, 30.7219, 43_336, 120_000, "wmt/workload.py",
              v05=133_333),
    # Perplexity; no test target; its own check is `<=`.
    _algoperf("finewebedu_lm", "ppl", 22.432, None, 31_967, 72_000,
              "finewebedu_lm/workload.py", strict=False, paper=False, commit="4c37f2aa"),
)}
BASE_WORKLOADS = tuple(sorted(w for w in ALGOPERF_WORKLOADS if w != "finewebedu_lm"))
PAPER_WORKLOADS = tuple(sorted(w for w, f in ALGOPERF_WORKLOADS.items() if f.paper))


def target_met(value, target: float, minimize: bool, strict: bool = True):
  """``value < target`` (``>`` when maximizing), or ``<=`` (``>=``) when not `strict`.

  Elementwise on NumPy arrays; NaN is never a hit.
  """
  if strict:
    return value < target if minimize else value > target
  return value <= target if minimize else value >= target


def comparison(minimize: bool, strict: bool = True) -> str:
  """The operator `target_met` applies, for messages: ``'<'``, ``'<='``, ``'>'`` or ``'>='``."""
  return ("<" if minimize else ">") + ("" if strict else "=")


def embedded_facts(cls) -> WorkloadFacts:
  """The facts of an embedded workload class (`weight_averaging.workloads`).

  Its comparison is read off the class's own ``has_reached_validation_target`` at the
  target itself: an exact tie that does not count makes it strict.
  """
  metric = cls.target_metric_name
  probe = {f"validation/{metric}": cls.validation_target_value}
  return WorkloadFacts(
      cls.name, metric, float(cls.validation_target_value), float(cls.test_target_value),
      metric_minimized(metric), float(cls.max_allowed_runtime_sec), int(cls.step_hint),
      f"weight_averaging.workloads.{cls.__name__}",
      strict=not cls().has_reached_validation_target(probe))


def facts(name: str) -> WorkloadFacts:
  """The facts of workload `name`: an embedded one's from its class, else AlgoPerf's."""
  from weight_averaging import workloads as embedded   # pylint: disable=import-outside-toplevel
  if name in embedded.WORKLOADS:
    return embedded_facts(embedded.WORKLOADS[name])
  if name in ALGOPERF_WORKLOADS:
    return ALGOPERF_WORKLOADS[name]
  raise ValueError(f"unknown workload {name!r}: no facts are known for it (embedded: "
                   f"{sorted(embedded.WORKLOADS)}, AlgoPerf: {sorted(ALGOPERF_WORKLOADS)})")

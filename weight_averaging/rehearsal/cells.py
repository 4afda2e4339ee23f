"""One rehearsal cell (workload x submission): its settings, result file, memory guard, table.

Pure: nothing here imports jax or algoperf, so the table, the skip reasons and the memory
logic are testable anywhere.

**A cell** runs submission S on workload W through ``submission_runner.train_once``
(unchanged) with the workload's real model and fake batches of its own shapes (algoperf's
``tests/reference_algorithm_tests.py``), evals at the steps `eval_steps` names, and
checkpoints at each eval. Its result is one JSON file, `result_path`; ``status`` is

* ``passed``: the run finished its steps, every eval row is finite, a checkpoint was
  written and, for an averaging submission, training after the evals continued from the
  live params (the run with evals equals the run that evals only at the end);
* ``failed``: ``reason`` is the error's last line (or the check that did not hold);
* ``skipped``: ``reason`` says why (workload missing, memory).

The restore check (save, restore through ``checkpoint_utils.maybe_restore_checkpoint``,
continue) is reported in its own column: upstream's restore breaks every JAX submission at
2c90454f, so its failure is a finding about the runner, not the cell's status.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

REFERENCE = "reference_nadamw"
# algoperf's own NadamW, relative to the AlgoPerf checkout, and its search space.
REFERENCE_PATH = "algorithms/baselines/external_tuning/jax_nadamw_full_budget.py"
REFERENCE_SPACE = "algorithms/baselines/external_tuning/tuning_search_space.json"
OURS = ("nadamw", "nadamw_ema", "nadamw_lawa", "shampoo", "shampoo_ema", "shampoo_lawa")
SUBMISSIONS = (REFERENCE,) + OURS
AVERAGING = ("nadamw_ema", "nadamw_lawa", "shampoo_ema", "shampoo_lawa")
# AlgoPerf's nine JAX workloads, plus mnist (the smallest, for tests).
WORKLOADS = ("mnist", "ogbg", "criteo1tb", "fastmri", "imagenet_resnet", "imagenet_vit",
             "librispeech_conformer", "librispeech_deepspeech", "wmt", "finewebedu_lm")
# The smallest global batch each workload's fake batches and model run with on one CPU
# device (the fake batch makers of reference_algorithm_tests.py accept any size).
BATCH_SIZES = {"mnist": 16, "ogbg": 8, "criteo1tb": 8, "fastmri": 2, "imagenet_resnet": 2,
               "imagenet_vit": 2, "librispeech_conformer": 2, "librispeech_deepspeech": 2,
               "wmt": 2, "finewebedu_lm": 2}
# Shampoo's published points start preconditioning at step 100; a rehearsal is a few
# steps long, so the roots are switched on from the first step: the preconditioned step
# (blocking, roots) is what runs and is timed.
SHAMPOO_OVERRIDES = {"preconditioning_every": 1, "start_preconditioning_step": 0}
# The shipped interval (0.0005 x step_hint, 5 to 98 steps) would sample once in a few
# steps: a sample every 2 steps makes the average, its restore and the eval swap visible.
AVERAGING_OVERRIDES = {"averaging_every_fraction": None, "averaging_every": 2}
# Why a workload cannot run here at all (checked before anything is started).
NOT_IN_CHECKOUT = {
    "finewebedu_lm": ("not in the algoperf checkout at 2c90454f (added later upstream), and "
                      "its attention is cuDNN's (jax.nn.dot_product_attention, "
                      "implementation='cudnn'): needs a GPU"),
}
INPUT = ("fake batches of the workload's shapes and dtypes "
         "(algoperf tests/reference_algorithm_tests.py, one batch repeated)")
GIB = 2**30
# The guard: a cell needs memory_plan's peak (the state, the step's gradients and the
# optimizer step's temporaries) + BASELINE bytes (libraries, compiles, activations, the
# fake batch, host copies), which must fit in what is available. The reference cells, each
# first in its process, used 1.9 (ogbg) to 3.3 GiB (conformer) beyond their planned peak.
BASELINE = 4 * GIB
MEMORY_FIELDS = ("params", "optimizer", "averaging", "stash")
STEP_FIELDS = ("gradients", "temporaries")  # in a plan only: not measured
# Steps left out of the step time: the first compiles on init's arrays, the second again
# on the step's own outputs (seen with the reference NadamW as with ours).
WARMUP_STEPS = 2


def step_seconds(times: Sequence[float]) -> Optional[float]:
  """Seconds per step: the median after `WARMUP_STEPS`; None with too few steps."""
  timed = sorted(times[WARMUP_STEPS:])
  if not timed:
    return None
  mid = len(timed) // 2
  return timed[mid] if len(timed) % 2 else 0.5 * (timed[mid - 1] + timed[mid])


def eval_steps(steps: int) -> List[int]:
  """Where the main run evals: after step 1, half way and at the end (sorted, distinct)."""
  if steps < 2:
    raise ValueError(f"--steps must be at least 2 (an eval, then training from it), got {steps}")
  return sorted({1, steps // 2, steps} - {0})


def preempt_step(steps: int) -> int:
  """The restore check's first leg stops after the checkpoint of this eval."""
  return max(s for s in eval_steps(steps) if s < steps)


def search_space(name: str, repo: str, algoperf_root: str) -> str:
  """Path of the search space `name` runs with (before `SHAMPOO_OVERRIDES`)."""
  if name == REFERENCE:
    return os.path.join(algoperf_root, REFERENCE_SPACE)
  return os.path.join(repo, "tuning_search_spaces", f"{name}.json")


def first_point(path: str, name: str) -> Dict[str, Any]:
  """Point 1 of a list search space (the runner's trial 1), with the rehearsal's overrides."""
  with open(path) as f:
    space = json.load(f)
  if not isinstance(space, list) or not space:
    raise ValueError(f"search space {path} must be a non-empty list of points "
                     f"(the official list format)")
  point = dict(space[0])
  if name.startswith("shampoo"):
    point.update(SHAMPOO_OVERRIDES)
  if name in AVERAGING:
    point.update(AVERAGING_OVERRIDES)
  return point


# ----------------------------------------------------------------------------
# Result files.


def result_path(output_dir: str, workload: str, submission: str) -> str:
  return os.path.join(output_dir, workload, f"{submission}.json")


def load_result(output_dir: str, workload: str, submission: str) -> Optional[Dict[str, Any]]:
  path = result_path(output_dir, workload, submission)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save_result(output_dir: str, result: Mapping[str, Any]) -> str:
  """Writes `result` atomically (a crash never leaves half a file to be reused)."""
  path = result_path(output_dir, result["workload"], result["submission"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def skipped(workload: str, submission: str, reason: str, **extra) -> Dict[str, Any]:
  return dict(workload=workload, submission=submission, status="skipped", reason=reason,
              **extra)


def failed(workload: str, submission: str, error: str, **extra) -> Dict[str, Any]:
  return dict(workload=workload, submission=submission, status="failed",
              reason=with_origin(error), **extra)


def with_origin(error: str) -> str:
  """The error's last line and, for a traceback, where it was raised
  (``'... (at algoperf/checkpoint_utils.py:127)'``): upstream's or ours."""
  frames = re.findall(r'File "([^"]+)", line (\d+)', str(error))
  if not frames:
    return last_line(error)
  path, line = frames[-1]
  return f"{last_line(error)} (at {'/'.join(path.split(os.sep)[-2:])}:{line})"


def last_line(text: str) -> str:
  """The last line of an error or a traceback that says something (not JAX's note that
  it filtered its frames, nor the rule above that note)."""
  lines = [l.strip() for l in str(text).strip().splitlines()
           if l.strip() and not l.startswith(_NOISE)]
  return lines[-1] if lines else "(no message)"


_NOISE = ("For simplicity, JAX has removed", "-----")


def pending(output_dir: str, workload: str, submissions: Sequence[str],
            overwrite: bool) -> List[str]:
  """The submissions of `workload` still to run. The reference is run again whenever any
  other cell runs: the overhead ratio's denominator comes from the same process."""
  todo = [s for s in submissions
          if overwrite or load_result(output_dir, workload, s) is None]
  if todo and REFERENCE in submissions and REFERENCE not in todo:
    todo = [REFERENCE] + todo
  return [s for s in SUBMISSIONS if s in todo]


# ----------------------------------------------------------------------------
# Memory.


def memory_needed(plan: Mapping[str, int]) -> int:
  """Bytes a cell is assumed to need: the planned peak + `BASELINE`."""
  return sum(plan.get(k, 0) for k in MEMORY_FIELDS + STEP_FIELDS) + BASELINE


def memory_skip_reason(plan: Mapping[str, int], available: int) -> Optional[str]:
  """None if the cell fits in `available` bytes, else the reason to skip it."""
  need = memory_needed(plan)
  if need <= available:
    return None
  fields = [k for k in MEMORY_FIELDS + STEP_FIELDS if k in plan]
  return (f"memory: memory_plan predicts a peak of {gib(need - BASELINE)} "
          f"({', '.join(f'{k} {gib(plan[k])}' for k in fields)}); with "
          f"{gib(BASELINE)} for the rest it needs {gib(need)}, {gib(available)} available")


def memory_mismatches(measured: Mapping[str, int], plan: Mapping[str, int],
                      rtol: float = 0.01) -> List[str]:
  """The fields where the bytes measured on the real state differ from the plan by more
  than `rtol` (relative to the larger), each as ``'field: measured vs plan'``."""
  out = []
  for k in MEMORY_FIELDS:
    a, b = int(measured[k]), int(plan[k])
    if abs(a - b) > rtol * max(a, b, 1):
      out.append(f"{k}: {gib(a)} measured vs {gib(b)} planned")
  return out


def available_bytes(limit: int, meminfo: str = "/proc/meminfo",
                    status: str = "/proc/self/status") -> int:
  """What this process may still use: the smaller of the machine's MemAvailable and
  `limit` less the process's resident set now."""
  def read_kib(path, key):
    with open(path) as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
    raise ValueError(f"{key} not found in {path}")
  return min(read_kib(meminfo, "MemAvailable"), limit - read_kib(status, "VmRSS"))


def gib(n: Optional[float]) -> str:
  if n is None:
    return "-"
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------
# The table.

COLUMNS = ("workload", "submission", "status", "s/step", "vs ref", "continued live",
           "restore", "params", "opt state", "avg state", "stash", "peak RSS",
           "plan (p/o/a/s)")


def _fmt_float(x: Optional[float], spec: str) -> str:
  return "-" if x is None or not math.isfinite(x) else format(x, spec)


def row(result: Mapping[str, Any]) -> List[str]:
  """One table row of a cell's result."""
  status = result["status"]
  if status != "passed":
    status = f"{status}: {result.get('reason', '')}"
  mem = result.get("memory") or {}
  plan = result.get("plan") or {}
  planned = "/".join(gib(plan[k]) for k in MEMORY_FIELDS) if plan else "-"
  if plan and mem:
    differs = memory_mismatches(mem, plan)
    planned += " (differs: " + "; ".join(differs) + ")" if differs else " (= measured)"
  return [result["workload"], result["submission"], status,
          _fmt_float(result.get("sec_per_step"), ".3f"),
          _fmt_float(result.get("ratio"), ".2f"),
          result.get("continuation") or "-", result.get("restore") or "-",
          gib(mem.get("params")), gib(mem.get("optimizer")), gib(mem.get("averaging")),
          gib(mem.get("stash")), gib(result.get("peak_rss")), planned]


def table(results: Iterable[Mapping[str, Any]]) -> str:
  """A markdown table of `results`, in `WORKLOADS` x `SUBMISSIONS` order."""
  order = {(w, s): (i, j) for i, w in enumerate(WORKLOADS) for j, s in enumerate(SUBMISSIONS)}
  results = sorted(results, key=lambda r: order.get((r["workload"], r["submission"]),
                                                    (len(order), 0)))
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(c.replace("|", "/") for c in row(r)) + " |" for r in results]
  return "\n".join(lines)


def grid(results: Iterable[Mapping[str, Any]]) -> str:
  """The overview: a markdown table of workloads x submissions, each cell ``pass <ratio>``
  (step time relative to the reference's), ``pass`` (no reference step to divide by),
  ``FAIL`` or ``skip``, ``.`` where nothing was asked; the numbered reasons follow it."""
  cell = {(r["workload"], r["submission"]): r for r in results}
  workloads = [w for w in WORKLOADS if any(k[0] == w for k in cell)]
  reasons: List[str] = []

  def mark(r):
    if r is None:
      return "."
    if r["status"] == "passed":
      return "pass" + (f" {r['ratio']:.2f}" if r.get("ratio") is not None else "")
    if r["reason"] not in reasons:
      reasons.append(r["reason"])
    return f"{'FAIL' if r['status'] == 'failed' else 'skip'} [{reasons.index(r['reason']) + 1}]"

  lines = ["| workload | " + " | ".join(SUBMISSIONS) + " |", "|" + "---|" * (1 + len(SUBMISSIONS))]
  lines += ["| " + " | ".join([w] + [mark(cell.get((w, s))) for s in SUBMISSIONS]) + " |"
            for w in workloads]
  lines += [""] + [f"[{i}] {why}" for i, why in enumerate(reasons, 1)]
  return "\n".join(lines)

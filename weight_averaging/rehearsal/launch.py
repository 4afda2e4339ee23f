"""Runs the rehearsal: one `driver` subprocess per workload, from the AlgoPerf checkout.

The subprocess runs from the checkout's root (the runner and its test harness import
``tests.reference_algorithm_tests`` and ``algorithms/...`` relative to it) with our
``submissions/`` folder on ``PYTHONPATH`` under a unique alias, as the runner loads a
submission: by a module path relative to a ``sys.path`` entry, which must not clash with
upstream's own ``submissions`` package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from weight_averaging.rehearsal import cells

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALIAS = "wa_algoperf_submissions"


def algoperf_root(given: Optional[str] = None) -> Optional[str]:
  """The AlgoPerf checkout: `given`, ``$ALGOPERF_DIR`` or the installed ``algoperf``'s
  repository; None if none is a checkout with ``submission_runner.py`` and the tests."""
  root = given or os.environ.get("ALGOPERF_DIR")
  if not root:
    spec = importlib.util.find_spec("algoperf")
    if spec is None or not spec.origin:
      return None
    root = os.path.dirname(os.path.dirname(spec.origin))
  needed = ("submission_runner.py", os.path.join("tests", "reference_algorithm_tests.py"))
  return root if all(os.path.exists(os.path.join(root, n)) for n in needed) else None


def _has_workload(root: str, workload: str) -> bool:
  return os.path.isdir(os.path.join(root, "algoperf", "workloads", workload))


def import_root(directory: str) -> str:
  """A folder holding the alias of our ``submissions/`` (made once per directory)."""
  link = os.path.join(directory, ALIAS)
  if not os.path.islink(link):
    os.makedirs(directory, exist_ok=True)
    os.symlink(os.path.join(REPO, "submissions"), link)
  return directory


def _env(root: str, imports: str) -> Dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [imports, root, REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_workload(workload: str, submissions: Sequence[str], output_dir: str, root: str,
                 steps: int, batch_size: Optional[int], memory_limit: int,
                 no_twin: bool = False, no_restore: bool = False, keep_runs: bool = False,
                 timeout_s: Optional[float] = None, log=sys.stderr,
                 log_name: str = "driver.log") -> None:
  """Runs `submissions` (already the pending ones) of `workload` in one subprocess; a
  crash or timeout marks the cells it left without a new result failed, with its last
  line (a result from an earlier run is not taken for this run's).
  Its output goes to ``<output_dir>/<workload>/<log_name>``."""
  imports = import_root(tempfile.mkdtemp(prefix="rehearsal_imports_"))
  cmd = [sys.executable, "-m", "weight_averaging.rehearsal.driver",
         f"--workload={workload}", f"--submissions={','.join(submissions)}",
         f"--output_dir={os.path.abspath(output_dir)}", f"--steps={steps}",
         f"--batch_size={batch_size or cells.BATCH_SIZES[workload]}",
         f"--alias={ALIAS}", f"--repo={REPO}", f"--memory_limit={memory_limit}"]
  cmd += [f for f, on in (("--no_twin", no_twin), ("--no_restore", no_restore),
                          ("--keep_runs", keep_runs)) if on]
  stderr_path = os.path.join(output_dir, workload, log_name)
  started = time.time()
  os.makedirs(os.path.dirname(stderr_path), exist_ok=True)
  with open(stderr_path, "w") as err:
    try:
      proc = subprocess.run(cmd, cwd=root, env=_env(root, imports), stdout=err,
                            stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
      why = f"driver exit status {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
      why = f"timed out after {timeout_s:g} s (--timeout_s)"
    finally:
      shutil.rmtree(imports, ignore_errors=True)
  if why is None:
    return
  with open(stderr_path) as f:
    tail = cells.last_line(f.read()[-4000:])
  for name in submissions:
    path = cells.result_path(output_dir, workload, name)
    if not os.path.exists(path) or os.path.getmtime(path) < started:
      cells.save_result(output_dir, cells.failed(workload, name, f"{why}: {tail}"))
  print(f"rehearsal: {workload}: {why} (log: {stderr_path})", file=log)


def rehearse(workloads: Sequence[str], submissions: Sequence[str], output_dir: str,
             steps: int, batch_size: Optional[int] = None, overwrite: bool = False,
             memory_limit: int = 12 * cells.GIB, algoperf_dir: Optional[str] = None,
             process_per_cell: bool = False, **kwargs) -> List[Dict[str, Any]]:
  """Every (workload, submission) result: reused from `output_dir` unless `overwrite`,
  skipped with the reason where it cannot run, else run. Returns them all.

  One process runs all of a workload's cells (one workload init), so a cell's memory
  guard counts what the earlier cells left resident; with `process_per_cell` each cell
  gets a fresh process, the reference first, and each cell's ratio is to the step time
  of the reference's last passed run at the same steps and batch size."""
  unknown = [w for w in workloads if w not in cells.WORKLOADS]
  unknown += [s for s in submissions if s not in cells.SUBMISSIONS]
  if unknown:
    raise ValueError(f"unknown workload or submission {unknown}: workloads are "
                     f"{list(cells.WORKLOADS)}, submissions {list(cells.SUBMISSIONS)}")
  cells.eval_steps(steps)  # refuses too few steps before anything runs
  root = algoperf_root(algoperf_dir)
  for workload in workloads:
    todo = cells.pending(output_dir, workload, submissions, overwrite)
    if not todo:
      continue
    reason = _skip_reason(root, workload)
    if reason:
      for name in todo:
        cells.save_result(output_dir, cells.skipped(workload, name, reason))
      continue
    # `todo` is in `cells.SUBMISSIONS` order: the reference, if there, runs first.
    groups = ({f"driver_{s}.log": [s] for s in todo} if process_per_cell
              else {"driver.log": list(todo)})
    for log_name, group in groups.items():
      run_workload(workload, group, output_dir, root, steps, batch_size, memory_limit,
                   log_name=log_name, **kwargs)
  return [r for w in workloads for s in submissions
          if (r := cells.load_result(output_dir, w, s)) is not None]


def _skip_reason(root: Optional[str], workload: str) -> Optional[str]:
  if root is None:
    return ("algoperf is not installed as a repository checkout (give --algoperf_dir or "
            "$ALGOPERF_DIR)")
  if not _has_workload(root, workload):
    return cells.NOT_IN_CHECKOUT.get(workload, f"not in the algoperf checkout at {root}")
  return None

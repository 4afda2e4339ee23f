"""A study grid: submissions x workloads x studies x trials, run through a runner process each.

Each run is one subprocess, non-interactive (stdin closed), its output appended to a log file,
in its own process group, which is stopped whole when the run ends or run_study is stopped:

* **AlgoPerf workloads** (``runner: official`` in `configs`) go through the official
  ``submission_runner.py`` of an algoperf checkout (``algoperf_dir``, at the commit of the API:
  jit = 2c90454f, pmap = fb2f492a), run from that checkout with this repository on
  ``PYTHONPATH`` so that ``--submission_path=submissions/<api>/<submission>/submission.py``
  imports. One run per trial: the study's whole search space with ``--num_tuning_trials`` and
  ``--hparam_start_index=n-1 --hparam_end_index=n`` selects trial ``n``, so its logs land in
  ``trial_<n>/`` as in a full study.
* **Embedded workloads** (``runner: embedded``) go through ``python -m weight_averaging.runner``,
  one run per study (that runner runs a study's trials in one process).

The layout is the official one (`weight_averaging.layout`), which `scoring` reads::

  DIR/<submission>/study_<i>/<workload>_jax/trial_<n>/     (--experiment_dir=DIR/<submission>
                                                            --experiment_name=study_<i>)
  DIR/.run_study/search_spaces/<api>/<submission>/<workload>_<search space>.json
  DIR/.run_study/logs/<submission>/study_<i>/<workload>_trial_<n>.log   (appended per attempt)
  DIR/.run_study/lock      (the pid of the run_study that runs the grid: one at a time)

Study ``i`` (from 0, as AlgoPerf's study scripts count) uses ``--rng_seed=rng_seed + i``, from 1
by default (the official runner reads seed 0 as "draw a random one").

**Why ``--resume_last_run`` and never ``--overwrite``.** Both runners delete the whole
``<workload>_jax/`` directory under ``--overwrite``, i.e. every other trial of the study, and the
official one prompts on stdin when that directory exists and neither flag is given. With
``--resume_last_run`` a runner creates what is missing and continues what is there. The embedded
runner resumes a killed trial from its checkpoint, to the same result. The official runner's
restore is broken upstream at both commits, so an unfinished official trial's directory is
removed before it runs again (its eval CSV would otherwise be appended to), and its checkpoints
are off by default (``save_checkpoints``).

**When a trial is finished** (`trial_state`): its ``eval_measurements.csv`` has at least one eval,
and the run ended by one of the runners' own stopping rules: the last eval is at the step budget
(`step_budget`), both the validation and the test targets were reached (the runners stop there), the
logged submission time is at the runtime budget, or the official runner logged its end-of-run
row past its last eval (the ``score`` row it appends to ``measurements.csv`` after its loop: a
time-out skips the eval, so only this row shows it; an end row at the last eval is the cap of an
earlier, smaller ``max_global_steps``, not finished under a larger budget). Anything else is a
run that died or was killed.

A run that exits non-zero or leaves its trials unfinished is a failure, logged; the grid goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from weight_averaging import layout, processes
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import checkout, configs, workload_facts

EMBEDDED_RUNNER_MODULE = "weight_averaging.runner"
RUN_STUDY_DIR = ".run_study"


@dataclasses.dataclass(frozen=True)
class GridOptions:
  """What a grid covers and how to run it (the flags of ``scripts/run_study.py``)."""
  experiment_dir: str
  submissions: Sequence[str] = catalog.NAMES
  workloads: Sequence[str] = workload_facts.PAPER_WORKLOADS
  num_studies: int = 3
  api: str = "jit"
  search_space: str = "paper"
  data_root: Optional[str] = None
  algoperf_dir: Optional[str] = None
  python: str = sys.executable
  max_global_steps: Optional[int] = None
  num_devices: Optional[int] = None
  rng_seed: int = 1
  save_checkpoints: bool = False
  config_dir: str = configs.CONFIG_DIR
  repo_dir: str = configs.REPO


class Budget(NamedTuple):
  """What ends a trial: `steps` (None: no step cap), `runtime_sec` and the targets."""
  steps: Optional[int]
  runtime_sec: float
  target: configs.Target


@dataclasses.dataclass(frozen=True)
class Run:
  """One runner process: a study's trial (official) or a study's trials (embedded)."""
  submission: str
  workload: str
  study: int
  trials: Tuple[int, ...]
  runner: str
  argv: Tuple[str, ...]
  cwd: str
  env: Tuple[Tuple[str, str], ...]
  search_space_path: str
  search_space: Tuple[Mapping, ...]
  trial_dirs: Tuple[str, ...]
  log_path: str
  budget: Budget

  @property
  def label(self) -> str:
    trials = ",".join(layout.trial_dir_name(n) for n in self.trials)
    return f"{self.submission} {self.workload} {layout.study_dir_name(self.study)} {trials}"

  def shell_command(self) -> str:
    """The run as one shell line: ``cd CWD && VAR=value ... ARGV``."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
    return f"cd {shlex.quote(self.cwd)} && " + (env + " " if env else "") + shlex.join(self.argv)


# ----------------------------------------------------------------------------
# Planning: the runs of a grid and their exact command lines.


def _check_options(options: GridOptions,
                   workload_configs: Mapping[str, configs.WorkloadConfig]) -> None:
  if options.api not in configs.APIS:
    raise ValueError(f"--api must be one of {configs.APIS}, got {options.api!r}")
  if not options.submissions or not options.workloads:
    raise ValueError("--submissions and --workloads must name at least one each")
  for s in options.submissions:
    catalog.get(s)
  for name, seq in (("submission", options.submissions), ("workload", options.workloads)):
    duplicates = sorted({x for x in seq if list(seq).count(x) > 1})
    if duplicates:
      raise ValueError(f"{name} {duplicates[0]!r} is listed twice")
  if options.num_studies < 1:
    raise ValueError(f"--num_studies must be >= 1, got {options.num_studies}")
  if options.max_global_steps is not None and options.max_global_steps < 1:
    raise ValueError(f"--max_global_steps must be >= 1, got {options.max_global_steps}")
  if options.num_devices is not None and options.num_devices < 1:
    raise ValueError(f"--num_devices must be >= 1, got {options.num_devices}")
  if not options.experiment_dir:
    raise ValueError("--experiment_dir is required")
  official = [w for w in options.workloads if workload_configs[w].runner == "official"]
  if official:
    if not options.algoperf_dir:
      raise ValueError(f"--algoperf_dir (an algoperf checkout with "
                       f"{checkout.OFFICIAL_RUNNER}) is required for {', '.join(official)}")
    if options.rng_seed < 1:
      raise ValueError(f"--rng_seed must be >= 1 for the official runner, which draws a random "
                       f"seed for 0; got {options.rng_seed}")
    if options.num_devices is not None:
      raise ValueError("--num_devices simulates CPU devices for the embedded runner only; "
                       f"{', '.join(official)} run on the machine's accelerators")


def step_budget(max_global_steps: Optional[int], embedded: bool, step_hint: int):
  """`max_global_steps`, else the embedded runner's default (the step hint); official: None."""
  return step_hint if max_global_steps is None and embedded else max_global_steps


def _budget(config: configs.WorkloadConfig, options: GridOptions) -> Budget:
  steps = step_budget(options.max_global_steps, config.runner == "embedded", config.step_hint)
  return Budget(steps, config.max_allowed_runtime_sec, config.target)


def run_study_path(experiment_dir: str, *parts: str) -> str:
  """``DIR/.run_study/<parts>``: run_study's own files (``lock``, search spaces, logs)."""
  return os.path.join(os.path.abspath(experiment_dir), RUN_STUDY_DIR, *parts)


def _search_space_path(options: GridOptions, submission: str, workload: str) -> str:
  return run_study_path(options.experiment_dir, "search_spaces", options.api, submission,
                        f"{workload}_{options.search_space}.json")


def _log_path(options: GridOptions, submission: str, workload: str, study: int,
              trials: Sequence[int]) -> str:
  name = f"{workload}_" + "_".join(layout.trial_dir_name(n) for n in trials) + ".log"
  return run_study_path(options.experiment_dir, "logs", submission,
                        layout.study_dir_name(study), name)


def official_argv(options: GridOptions, config: configs.WorkloadConfig, submission: str,
                  study: int, trial: int, num_trials: int, search_space_path: str
                  ) -> List[str]:
  """The official runner's command for one trial, with its exact flag names."""
  argv = [options.python, checkout.OFFICIAL_RUNNER,
          "--framework=jax",
          f"--workload={config.workload}",
          f"--submission_path=submissions/{options.api}/{submission}/submission.py",
          f"--tuning_search_space={search_space_path}",
          f"--num_tuning_trials={num_trials}",
          f"--hparam_start_index={trial - 1}",
          f"--hparam_end_index={trial}",
          f"--experiment_dir={os.path.join(os.path.abspath(options.experiment_dir), submission)}",
          f"--experiment_name={layout.study_dir_name(study)}",
          f"--rng_seed={options.rng_seed + study}"]
  argv += [f"--{flag}={path}" for flag, path in
           configs.data_flags(config, options.data_root).items()]
  argv += ["--resume_last_run",
           f"--save_checkpoints={'true' if options.save_checkpoints else 'false'}"]
  if options.max_global_steps is not None:
    argv.append(f"--max_global_steps={options.max_global_steps}")
  return argv


def embedded_argv(options: GridOptions, config: configs.WorkloadConfig, submission: str,
                  study: int, num_trials: int, search_space_path: str) -> List[str]:
  """The embedded runner's command for one study (all its trials)."""
  submission_path = os.path.join(os.path.abspath(options.repo_dir), "submissions", options.api,
                                 submission, "submission.py")
  argv = [sys.executable, "-m", EMBEDDED_RUNNER_MODULE,
          "--framework=jax",
          f"--workload={config.workload}",
          f"--submission_path={submission_path}",
          f"--tuning_search_space={search_space_path}",
          f"--num_tuning_trials={num_trials}",
          f"--experiment_dir={os.path.join(os.path.abspath(options.experiment_dir), submission)}",
          f"--experiment_name={layout.study_dir_name(study)}",
          f"--rng_seed={options.rng_seed + study}",
          f"--api={options.api}",
          "--resume_last_run",
          "--progress=false"]
  if options.max_global_steps is not None:
    argv.append(f"--max_global_steps={options.max_global_steps}")
  if options.num_devices is not None:
    argv.append(f"--num_devices={options.num_devices}")
  return argv


def plan(options: GridOptions) -> List[Run]:
  """Every run of the grid, in order: studies, then workloads, submissions and trials.

  Pure apart from reading the configs and search spaces; `ValueError` for a bad option or
  config.
  """
  workload_configs = {w: configs.load(w, options.config_dir) for w in options.workloads}
  _check_options(options, workload_configs)
  runs = []
  for study in range(options.num_studies):
    for workload in options.workloads:
      config = workload_configs[workload]
      for submission in options.submissions:
        points = tuple(configs.search_space(config, submission, options.api,
                                            options.search_space))
        ss_path = _search_space_path(options, submission, workload)
        trial_groups = ([(n,) for n in range(1, len(points) + 1)] if config.runner == "official"
                        else [tuple(range(1, len(points) + 1))])
        for trials in trial_groups:
          if config.runner == "official":
            argv = official_argv(options, config, submission, study, trials[0], len(points),
                                 ss_path)
            cwd = os.path.abspath(options.algoperf_dir)
            env = (("PYTHONPATH", os.path.abspath(options.repo_dir)),)
          else:
            argv = embedded_argv(options, config, submission, study, len(points), ss_path)
            cwd, env = os.path.abspath(options.repo_dir), ()
          runs.append(Run(
              submission=submission, workload=workload, study=study, trials=trials,
              runner=config.runner, argv=tuple(argv), cwd=cwd, env=env,
              search_space_path=ss_path, search_space=points,
              trial_dirs=tuple(layout.study_trial_dir(options.experiment_dir, submission, study,
                                                      workload, n) for n in trials),
              log_path=_log_path(options, submission, workload, study, trials),
              budget=_budget(config, options)))
  return runs


# ----------------------------------------------------------------------------
# Before a grid: the checkout the official runs go through.


def check_checkout(runs: Sequence[Run], options: GridOptions, dry_run: bool = False,
                   report: Callable[[str], None] = print) -> None:
  """`checkout.check_official_checkout` before a grid; a dry run without the checkout only
  warns, so that commands can be printed on a machine that has none."""
  if not any(r.runner == "official" for r in runs):
    return
  runner = os.path.join(options.algoperf_dir, checkout.OFFICIAL_RUNNER)
  if dry_run and not os.path.isfile(runner):
    report(f"warning: {options.algoperf_dir} has no {checkout.OFFICIAL_RUNNER}; flags not checked")
    return
  checkout.check_official_checkout(runs, options.algoperf_dir, options.api)


# ----------------------------------------------------------------------------
# Is a trial finished?


class TrialState(NamedTuple):
  finished: bool
  reason: str


def _number(text: Optional[str]) -> float:
  try:
    return float(text) if text not in (None, "") else math.nan
  except ValueError:
    return math.nan


def _official_end_step(trial: str, metric: str) -> Optional[float]:
  """The step of the official runner's end-of-run row, if ``measurements.csv`` ends with one:
  a ``score`` and no validation metric (eval rows carry both, a submission's own rows no
  score)."""
  rows = layout.read_rows(os.path.join(trial, layout.MEASUREMENTS_FILE))
  if not rows:
    return None
  last = rows[-1]
  if (math.isnan(_number(last.get("score")))
      or not math.isnan(_number(last.get(f"validation/{metric}")))):
    return None
  return _number(last.get(layout.STEP_COLUMN))


def trial_state(trial: str, budget: Budget) -> TrialState:
  """Whether the trial in directory `trial` ran to one of its runner's stopping rules."""
  if not os.path.isdir(trial):
    return TrialState(False, "not started")
  rows = layout.read_rows(layout.eval_file(trial))
  if not rows:
    return TrialState(False, f"no eval logged in {layout.EVAL_FILE}")
  last = rows[-1]
  step = _number(last.get(layout.STEP_COLUMN))
  if budget.steps is not None and step >= budget.steps:
    return TrialState(True, f"reached the step budget ({int(step)} steps)")
  target = budget.target
  val = any(target.reached(_number(r.get(f"validation/{target.metric}")), target.validation)
            for r in rows)
  test = any(target.reached(_number(r.get(f"test/{target.metric}")), target.test) for r in rows)
  if val and test:
    return TrialState(True, f"reached the validation and test targets (step {int(step)})")
  if _number(last.get(layout.TIME_COLUMN)) >= budget.runtime_sec:
    return TrialState(True, f"spent the runtime budget ({budget.runtime_sec:g} s)")
  # A time-out skips the last eval, so the official runner's end row lies past the last eval;
  # an end row at the last eval is a step cap (an earlier, smaller --max_global_steps).
  end = _official_end_step(trial, target.metric)
  if end is not None and end > step:
    return TrialState(True, f"ran out of time at step {int(end)} (the runner's end-of-run row)")
  return TrialState(False, f"stopped at step {int(step)}, before any of its stopping rules")


# ----------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class GridResult:
  ran: List[Run] = dataclasses.field(default_factory=list)
  would_run: List[Run] = dataclasses.field(default_factory=list)  # under dry_run
  skipped: List[Run] = dataclasses.field(default_factory=list)
  failed: List[Tuple[Run, str]] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.failed


def write_search_space(run: Run) -> None:
  """Writes the run's search space (AlgoPerf's list form), where its command names it."""
  os.makedirs(os.path.dirname(run.search_space_path), exist_ok=True)
  tmp = run.search_space_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(list(run.search_space), f, indent=2)
    f.write("\n")
  os.replace(tmp, run.search_space_path)


def _states(run: Run) -> List[TrialState]:
  return [trial_state(t, run.budget) for t in run.trial_dirs]


def execute(run: Run, overwrite: bool = False,
            report: Callable[[str], None] = print) -> Optional[str]:
  """Runs `run` once; returns None on success, else what went wrong."""
  write_search_space(run)
  for trial, state in zip(run.trial_dirs, _states(run)):
    if os.path.isdir(trial) and (overwrite or (run.runner == "official" and not state.finished)):
      why = "--overwrite" if overwrite else f"unfinished: {state.reason}"
      report(f"  removing {trial} ({why})")
      shutil.rmtree(trial)
  env = dict(os.environ)
  for key, value in run.env:
    env[key] = value + (os.pathsep + env[key] if env.get(key) else "")
  os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
  with open(run.log_path, "a") as log:
    log.write(f"\n# run_study {datetime.datetime.now().isoformat(timespec='seconds')}: "
              f"{run.shell_command()}\n")
    log.flush()
    try:  # in its own process group, stopped whole when it ends (or on SIGTERM/SIGINT)
      rc = processes.call(run.argv, cwd=run.cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=log, stderr=subprocess.STDOUT)
    except OSError as e:
      return f"could not start {run.argv[0]}: {e}"
  if rc != 0:
    return f"exit status {rc}"
  unfinished = [(t, s) for t, s in zip(run.trial_dirs, _states(run)) if not s.finished]
  if unfinished:
    t, s = unfinished[0]
    return f"exited 0, but {os.path.basename(t)} is not finished: {s.reason}"
  return None


def run_grid(runs: Sequence[Run], *, dry_run: bool = False, overwrite: bool = False,
             report: Callable[[str], None] = print) -> GridResult:
  """Runs every unfinished run, reporting ``[k/N]`` progress; never stops on a failure.

  `dry_run` prints each command that would run (and writes only the search-space files they
  name); `overwrite` runs finished trials again, from scratch.
  """
  result = GridResult()
  total = len(runs)
  for k, run in enumerate(runs, start=1):
    prefix = f"[{k}/{total}] {run.label}"
    states = _states(run)
    if not overwrite and all(s.finished for s in states):
      report(f"{prefix}: finished ({states[0].reason}); skipped")
      result.skipped.append(run)
      continue
    if dry_run:
      write_search_space(run)
      report(f"{prefix}: would run")
      report(run.shell_command())
      result.would_run.append(run)
      continue
    report(f"{prefix}: running (log: {run.log_path})")
    start = time.time()
    error = execute(run, overwrite=overwrite, report=report)
    if error is None:
      report(f"{prefix}: done in {time.time() - start:.1f} s")
      result.ran.append(run)
    else:
      report(f"{prefix}: FAILED ({error}); log: {run.log_path}")
      result.failed.append((run, error))
  return result


def summary(result: GridResult) -> str:
  """How many runs ran (or would), were skipped and failed, each failure with its log."""
  done = (f"{len(result.would_run)} to run" if result.would_run else f"{len(result.ran)} ran")
  lines = [f"{done}, {len(result.skipped)} skipped (finished), {len(result.failed)} failed"]
  for run, error in result.failed:
    lines.append(f"  FAILED {run.label}: {error}; log: {run.log_path}")
  return "\n".join(lines)

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

**When a trial is finished**: `stopping.trial_state` (re-exported here), the runners' own
stopping rules read from its logs.

**Presets** (``preset``, `presets`): the paper's Section 6 grids. A preset's points replace the
search space (``DIR/.run_study/search_spaces/<api>/<submission>/<workload>_<preset>.json``, with
a description of the trials beside them, ``<workload>_<preset>.md`` in ``.../<api>/``) and
cover each optimizer's family; embedded preset trials run to the step budget
(``--stop_at_target=false``). A cooldown branch and its trunk run as one runner process per
trial (``--hparam_start_index``), the trunk first, keeping the checkpoints at the branch steps
(``--checkpoint_steps``); each branch starts from the trunk's (``--branch_from``,
``--branch_step``).

A run that exits non-zero or leaves its trials unfinished is a failure, logged; the grid goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from weight_averaging import layout, processes
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import checkout, configs, presets, workload_facts
from weight_averaging.studies.commands import EMBEDDED_RUNNER_MODULE, embedded_argv
from weight_averaging.studies.commands import official_argv
from weight_averaging.studies.stopping import Budget, TrialState, step_budget, trial_state

__all__ = ["EMBEDDED_RUNNER_MODULE", "Budget", "GridOptions", "GridResult", "Run", "TrialState",
           "check_checkout", "embedded_argv", "execute", "official_argv", "plan", "run_grid",
           "run_study_path", "step_budget", "summary", "trial_state", "write_search_space"]

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
  preset: Optional[presets.PresetOptions] = None  # None: the search space's trials


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
  labels: Tuple[str, ...] = ()  # a preset's names of the trials

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
  if options.preset is not None:
    if options.search_space != "paper":
      raise ValueError(f"--search_space={options.search_space} conflicts with --preset="
                       f"{options.preset.name}: a preset writes its own search space; drop one")
    if options.preset.cooldown_branches and official:
      raise ValueError(f"--cooldown_branches needs the embedded runner (the official one "
                       f"cannot restore a checkpoint); {', '.join(official)} run on the "
                       "official one")
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


def _budget(config: configs.WorkloadConfig, options: GridOptions) -> Budget:
  embedded = config.runner == "embedded"
  steps = step_budget(options.max_global_steps, embedded, config.step_hint)
  return Budget(steps, config.max_allowed_runtime_sec, config.target,
                stop_at_target=not (embedded and options.preset is not None))


def run_study_path(experiment_dir: str, *parts: str) -> str:
  """``DIR/.run_study/<parts>``: run_study's own files (``lock``, search spaces, logs)."""
  return os.path.join(os.path.abspath(experiment_dir), RUN_STUDY_DIR, *parts)


def _search_space_name(options: GridOptions) -> str:
  return options.preset.name if options.preset is not None else options.search_space


def _search_space_path(options: GridOptions, submission: str, workload: str) -> str:
  return run_study_path(options.experiment_dir, "search_spaces", options.api, submission,
                        f"{workload}_{_search_space_name(options)}.json")


def description_path(options: GridOptions, workload: str) -> str:
  """Where a preset's description of its trials on `workload` lies."""
  return run_study_path(options.experiment_dir, "search_spaces", options.api,
                        f"{workload}_{_search_space_name(options)}.md")


def _log_path(options: GridOptions, submission: str, workload: str, study: int,
              trials: Sequence[int]) -> str:
  name = f"{workload}_" + "_".join(layout.trial_dir_name(n) for n in trials) + ".log"
  return run_study_path(options.experiment_dir, "logs", submission,
                        layout.study_dir_name(study), name)


def _variants(options: GridOptions, config: configs.WorkloadConfig, submission: str
              ) -> List[presets.Variant]:
  """The trials of `submission`: the preset's, else the search space's (unlabelled)."""
  if options.preset is not None:
    return presets.variants(options.preset, config, submission, options.api)
  return [presets.Variant("", p) for p in configs.search_space(
      config, submission, options.api, options.search_space)]


def _trial_groups(config: configs.WorkloadConfig, variants: Sequence[presets.Variant]):
  """The trials each runner process runs: one each (official; a trunk and its branches),
  else all of a study's in one."""
  alone = config.runner == "official" or any(v.branch or v.keep_steps for v in variants)
  numbers = range(1, len(variants) + 1)
  return [(n,) for n in numbers] if alone else [tuple(numbers)]


def _run(options: GridOptions, config: configs.WorkloadConfig, submission: str, study: int,
         trials: Tuple[int, ...], variants: Sequence[presets.Variant]) -> Run:
  ss_path = _search_space_path(options, submission, config.workload)
  if config.runner == "official":
    argv = official_argv(options, config, submission, study, trials[0], len(variants),
                         ss_path)
    cwd = os.path.abspath(options.algoperf_dir)
    env = (("PYTHONPATH", os.path.abspath(options.repo_dir)),)
  else:
    alone = (trials[0], variants[trials[0] - 1]) if len(trials) < len(variants) else None
    argv = embedded_argv(options, config, submission, study, len(variants), ss_path, alone)
    cwd, env = os.path.abspath(options.repo_dir), ()
  return Run(
      submission=submission, workload=config.workload, study=study, trials=trials,
      runner=config.runner, argv=tuple(argv), cwd=cwd, env=env, search_space_path=ss_path,
      search_space=tuple(v.point for v in variants),
      trial_dirs=tuple(layout.study_trial_dir(options.experiment_dir, submission, study,
                                              config.workload, n) for n in trials),
      log_path=_log_path(options, submission, config.workload, study, trials),
      budget=_budget(config, options), labels=tuple(v.label for v in variants))


def submissions_of(options: GridOptions) -> Tuple[str, ...]:
  """The submissions a grid runs: `options.submissions`, or their families under a preset."""
  if options.preset is None:
    return tuple(options.submissions)
  return presets.family(options.submissions)


def plan(options: GridOptions) -> List[Run]:
  """Every run of the grid, in order: studies, then workloads, submissions and trials.

  Pure apart from reading the configs and search spaces; `ValueError` for a bad option or
  config.
  """
  workload_configs = {w: configs.load(w, options.config_dir) for w in options.workloads}
  _check_options(options, workload_configs)
  if options.preset is not None:
    options = dataclasses.replace(options, preset=presets.check(options.preset))
  runs = []
  for study in range(options.num_studies):
    for workload in options.workloads:
      config = workload_configs[workload]
      for submission in submissions_of(options):
        variants = _variants(options, config, submission)
        for trials in _trial_groups(config, variants):
          runs.append(_run(options, config, submission, study, trials, variants))
  _check_branch_budget(runs)
  return runs


def _check_branch_budget(runs: Sequence[Run]) -> None:
  """A trunk must reach its last branch step within the step budget."""
  for run in runs:
    steps = [int(a.split("=", 1)[1]) for a in run.argv if a.startswith("--branch_step=")]
    if steps and run.budget.steps is not None and steps[0] >= run.budget.steps:
      raise ValueError(f"--max_global_steps={run.budget.steps} ends the trunk at or before "
                       f"the branch step {steps[0]} of {run.label}: raise it, or use "
                       "smaller --schedule_fractions / --cooldown_fraction")


def write_description(options: GridOptions, runs: Sequence[Run]) -> List[str]:
  """A preset's description of its trials per workload (`description_path`); the paths."""
  if options.preset is None:
    return []
  written = []
  for workload in options.workloads:
    by_submission = {}
    for run in runs:
      if run.workload == workload and run.study == 0:
        by_submission[run.submission] = [presets.Variant(label, dict(point)) for label, point
                                         in zip(run.labels, run.search_space)]
    path = description_path(options, workload)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(presets.describe(presets.check(options.preset),
                               configs.load(workload, options.config_dir), by_submission))
    written.append(path)
  return written


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


def _other_point(run: Run) -> Optional[str]:
  """For a preset's run: a trial that started with another point than the preset's (another
  preset or grid in the same directory; a runner keeps a started trial's point), named."""
  if not any(run.labels):
    return None
  for n, trial in zip(run.trials, run.trial_dirs):
    path = os.path.join(trial, layout.HPARAMS_FILE)
    if not os.path.isfile(path):
      continue
    recorded = layout.read_hparams(trial) or {}  # null: a self-tuning trial
    planned = run.search_space[n - 1]
    if recorded != planned:
      name = sorted(k for k in set(recorded) | set(planned)
                    if recorded.get(k, "absent") != planned.get(k, "absent"))[0]
      return (f"{path} holds another point than this grid's {layout.trial_dir_name(n)} "
              f"({name}: {recorded.get(name, 'absent')!r}, the grid's "
              f"{planned.get(name, 'absent')!r}): use another --experiment_dir, or --overwrite")
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
    other = None if overwrite else _other_point(run)
    if other is not None:
      report(f"{prefix}: FAILED ({other})")
      result.failed.append((run, other))
      continue
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

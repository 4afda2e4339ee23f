"""The runners' command lines of a study grid, with their exact flag names.

`official_argv`: one trial through AlgoPerf's ``submission_runner.py``; `embedded_argv`: a
study's trials (or one of them) through ``python -m weight_averaging.runner``. The options are
`grid.GridOptions` (`weight_averaging.studies.grid` explains the layout and why
``--resume_last_run``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Tuple

from weight_averaging import layout
from weight_averaging.studies import checkout, configs, presets

EMBEDDED_RUNNER_MODULE = "weight_averaging.runner"


def official_argv(options: Any, config: configs.WorkloadConfig, submission: str,
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


def embedded_argv(options: Any, config: configs.WorkloadConfig, submission: str,
                  study: int, num_trials: int, search_space_path: str,
                  variant: Optional[Tuple[int, presets.Variant]] = None) -> List[str]:
  """The embedded runner's command for one study (all its trials), or for its trial
  ``variant[0]`` alone (a preset's trunk or branch)."""
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
  if options.preset is not None:
    argv.append("--stop_at_target=false")
  if variant is not None:
    trial, v = variant
    argv += [f"--hparam_start_index={trial - 1}", f"--hparam_end_index={trial}"]
    if v.keep_steps:
      argv.append(f"--checkpoint_steps={','.join(map(str, v.keep_steps))}")
    if v.branch is not None:
      trunk = layout.study_trial_dir(options.experiment_dir, submission, study,
                                     config.workload, v.branch[0])
      argv += [f"--branch_from={os.path.abspath(trunk)}", f"--branch_step={v.branch[1]}"]
  return argv

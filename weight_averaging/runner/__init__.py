"""The embedded runner: AlgoPerf's submission-runner contract, on one machine.

``python -m weight_averaging.runner --submission_path=... --tuning_search_space=...``
runs any AlgoPerf JAX submission (loaded by path, like the official runner) on an
embedded workload with the official runner's flag names and semantics. The
modules, one job each:

* `trial`: one trial's loop (`run_trial`): the step, the timed ``prepare_for_eval``
  whose outputs are evaluated and trained from, the clocks, the stopping rules;
* `experiment`: the trials of a search space in the official layout
  ``experiment_dir/experiment_name/<workload>_jax/trial_k/`` (`run_experiment`;
  the file names and ``eval_measurements.csv`` columns are `weight_averaging.layout`'s),
  the refusal to touch an existing experiment without ``--overwrite`` or
  ``--resume_last_run`` (never a prompt), every check made before anything is
  written, and a lock that refuses a second runner on the experiment;
* `checkpoints`: orbax checkpoints at every eval, so that ``--resume_last_run``
  continues a killed run to the same result as an uninterrupted one (from the
  checkpoint before, named in a warning, when the latest is damaged);
* `search_space`: the official search-space formats, the trials' hyperparameters;
* `submissions`: loading a submission file (and refusing one of the other API),
  calling its functions;
* `distributed`: several processes (jit API) over one mesh of all their devices,
  via `jax.distributed`; each process builds its own rows of every batch and writes
  its own checkpoint shards, process 0 alone writes the logs and takes the
  decisions that depend on wall time;
* `launch`: ``python -m weight_averaging.runner.launch``, N local processes that
  find each other through ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, each in its own process group, stopped whole;
* `__main__`: the command line, the only module that defines absl flags.
"""

from weight_averaging.runner.checkpoints import restore_checkpoint, save_checkpoint
from weight_averaging.runner.distributed import simulate_devices
from weight_averaging.runner.experiment import prepare_experiment_dir, run_experiment
from weight_averaging.runner.search_space import as_hyperparameters, load_search_space
from weight_averaging.runner.submissions import load_submission
from weight_averaging.runner.trial import TrialResult, run_trial

__all__ = ["TrialResult", "as_hyperparameters", "load_search_space", "load_submission",
           "prepare_experiment_dir", "restore_checkpoint", "run_experiment", "run_trial",
           "save_checkpoint", "simulate_devices"]

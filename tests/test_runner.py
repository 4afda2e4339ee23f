"""The embedded runner against the official runner's contract."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from weight_averaging import runner, workloads

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SUBMISSION = os.path.join(FIXTURES, "sgd_submission.py")
SPACE = os.path.join(FIXTURES, "sgd_search_space.json")
# The flags of `python -m weight_averaging.runner` (the official runner's names and ours).
RUNNER_FLAGS = ("workload", "framework", "submission_path", "tuning_search_space",
                "num_tuning_trials", "experiment_dir", "experiment_name", "rng_seed",
                "max_global_steps", "overwrite", "resume_last_run", "api", "eval_every_steps",
                "save_checkpoints", "stop_at_target", "num_devices", "progress",
                "num_processes", "process_id", "coordinator_address",
                "initialization_timeout", "hparam_start_index", "hparam_end_index",
                "checkpoint_steps", "branch_from", "branch_step")
OFFICIAL_COLUMNS = ["accumulated_eval_time", "accumulated_logging_time",
                    "accumulated_submission_time", "global_step", "preemption_count",
                    "score", "total_duration"]


def fixture_submission(**attributes):
  module = runner.load_submission(SUBMISSION)
  for name, value in attributes.items():
    setattr(module, name, value)
  return module


def run(tmp_path, submission, name="run", steps=60, resume=False, **kw):
  workload = workloads.get_workload(api="jit")
  return runner.run_trial(workload, submission, runner.as_hyperparameters(
      {"learning_rate": 0.05}), log_dir=str(tmp_path / name), rng_seed=0,
      max_global_steps=steps, eval_every_steps=20, resume=resume, **kw)


def test_prepare_for_eval_params_are_evaluated_and_trained_from(tmp_path):
  # prepare_for_eval returns zero params: the evaluated loss is then exactly log(10)
  # (uniform logits), and the next update_params sees params of norm 0.
  submission = fixture_submission(EVAL_SCALE=0.0)
  result = run(tmp_path, submission, steps=40, stop_at_target=False)
  assert [r["global_step"] for r in result.eval_results] == [20, 40]
  for row in result.eval_results:
    assert row["validation/loss"] == pytest.approx(math.log(10), abs=1e-6)
  calls = submission.CALLS
  after_eval = [c for c in calls if c[0] == "update_params" and c[1] == 20]
  assert after_eval == [("update_params", 20, 0.0)]
  before_eval = [c for c in calls if c[0] == "update_params" and c[1] == 19]
  assert before_eval[0][2] > 0
  assert [c[1] for c in calls if c[0] == "prepare_for_eval"] == [20, 40]


def test_eval_time_is_not_submission_time(tmp_path):
  result = run(tmp_path, fixture_submission(), steps=40, stop_at_target=False)
  first, second = result.eval_results
  assert second["accumulated_submission_time"] > first["accumulated_submission_time"] > 0
  assert second["accumulated_eval_time"] > first["accumulated_eval_time"] > 0
  # Wall time covers training, evaluation and logging; the three accounts do not overlap.
  assert second["total_duration"] >= (second["accumulated_submission_time"]
                                      + second["accumulated_eval_time"]) * 0.999
  assert second["score"] == second["accumulated_submission_time"]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
  whole = run(tmp_path, fixture_submission(), name="whole", steps=100,
              stop_at_target=False)
  with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint at step 60
    run(tmp_path, fixture_submission(CRASH_AT_STEP=73), name="killed", steps=100,
        stop_at_target=False)
  resumed = run(tmp_path, fixture_submission(), name="killed", steps=100,
                stop_at_target=False, resume=True)
  assert resumed.global_step == whole.global_step == 100
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                  jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  metrics = lambda rows: [{k: v for k, v in r.items() if "/" in k or k == "global_step"}
                          for r in rows]
  assert metrics(resumed.eval_results) == metrics(whole.eval_results)
  assert [r["preemption_count"] for r in resumed.eval_results] == [0, 0, 0, 1, 1]
  with open(tmp_path / "killed" / "eval_measurements.csv") as f:
    assert [int(r["global_step"]) for r in csv.DictReader(f)] == [20, 40, 60, 80, 100]


@pytest.fixture(scope="module")
def uninterrupted_60(tmp_path_factory):
  """The fixture submission, 60 steps in one go: the reference of the resume tests."""
  return run(tmp_path_factory.mktemp("whole"), fixture_submission(), steps=60,
             stop_at_target=False)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _largest_array_file(checkpoint):
  files = [p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damaged", ["runner_state", "_METADATA", "array data"])
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_is_resumed(
    tmp_path, caplog, uninterrupted_60, damaged):
  run(tmp_path, fixture_submission(), name="trial", steps=40, stop_at_target=False)
  trial = tmp_path / "trial"
  # The latest checkpoint and the one before it are kept.
  assert sorted(p.name for p in trial.iterdir()
                if p.name.startswith(("checkpoint_", "runner_state_"))) == [
                    "checkpoint_20", "checkpoint_40", "runner_state_20.json",
                    "runner_state_40.json"]
  path = {"runner_state": trial / "runner_state_40.json",
          "_METADATA": trial / "checkpoint_40" / "_METADATA",
          "array data": _largest_array_file(trial / "checkpoint_40")}[damaged]
  _truncate(path)
  with caplog.at_level("WARNING"):
    resumed = run(tmp_path, fixture_submission(), name="trial", steps=60,
                  stop_at_target=False, resume=True)
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  named = str(path) if damaged != "array data" else str(trial / "checkpoint_40")
  assert len(warnings) == 1 and named in warnings[0], warnings
  assert "resuming from the checkpoint before it" in warnings[0]
  # Resumed at step 20: step 40 was trained again, to the uninterrupted run's result.
  assert [r["preemption_count"] for r in resumed.eval_results] == [0, 1, 1]
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                  jax.tree_util.tree_leaves(uninterrupted_60.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The damaged checkpoint was replaced; the two latest are kept.
  assert sorted(p.name for p in trial.glob("runner_state_*.json")) == [
      "runner_state_40.json", "runner_state_60.json"]
  state = json.loads((trial / "runner_state_60.json").read_text())
  assert state["saved_by"] == {"num_devices": jax.device_count(),
                               "num_processes": jax.process_count()}


def test_experiment_layout_and_csv_columns(tmp_path):
  [result] = runner.run_experiment(
      workload_name="teacher_student", submission_path=SUBMISSION,
      tuning_search_space=SPACE, experiment_dir=str(tmp_path), experiment_name="exp",
      max_global_steps=40, eval_every_steps=20)
  trial = tmp_path / "exp" / "teacher_student_jax" / "trial_1"
  assert result.log_dir == str(trial)
  for name in ("hparams.json", "meta_data_0.json", "flags_0.json", "eval_measurements.csv"):
    assert (trial / name).is_file(), name
  assert json.loads((trial / "hparams.json").read_text()) == {"learning_rate": 0.05}
  # Called from Python, with no flags: the step cap is recorded all the same (scoring reads
  # it to tell a finished trial from a killed one).
  assert json.loads((trial / "flags_0.json").read_text())["max_global_steps"] == 40
  with open(trial / "eval_measurements.csv") as f:
    header = next(csv.reader(f))
  assert header[:len(OFFICIAL_COLUMNS)] == OFFICIAL_COLUMNS
  assert {"validation/loss", "test/loss", "train/loss", "validation/accuracy"} <= set(header)


def test_existing_experiment_is_refused_without_overwrite(tmp_path):
  kw = dict(workload_name="teacher_student", submission_path=SUBMISSION,
            tuning_search_space=SPACE, experiment_dir=str(tmp_path),
            experiment_name="exp", max_global_steps=20, eval_every_steps=20)
  runner.run_experiment(**kw)
  with pytest.raises(FileExistsError, match="--overwrite"):
    runner.run_experiment(**kw)
  runner.run_experiment(overwrite=True, **kw)
  with pytest.raises(ValueError, match="exclude"):
    runner.run_experiment(overwrite=True, resume_last_run=True, **kw)


@pytest.mark.parametrize("path, error, match", [
    ("missing.py", FileNotFoundError, "not found"),
    ("submission.txt", ValueError, r"\.py"),
    (SPACE.replace(".json", ".py"), FileNotFoundError, "not found"),
])
def test_bad_submission_paths(path, error, match):
  with pytest.raises(error, match=match):
    runner.load_submission(path)


def test_a_file_that_is_not_a_submission_is_refused(tmp_path):
  bad = tmp_path / "submission.py"
  bad.write_text("def get_batch_size(name):\n  return 8\n")
  with pytest.raises(ValueError, match="init_optimizer_state"):
    runner.load_submission(str(bad))


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('"a string"', "list or object"),
    ("[]", "list must hold"),
    ('{"learning_rate": 0.1}', "every entry"),
    ('{"learning_rate": {"min": 0.1}}', "feasible_points"),
    ('{"learning_rate": {"min": 0, "max": 1, "scaling": "log"}}', "min 0.0 <= 0"),
    ('{"learning_rate": {"min": 0.1, "max": 1, "scaling": "cubic"}}', "scaling"),
    ('[{"lr": 1, "wd": 0}, {"lr": 2}]', r"point 2 .* \(missing \['wd'\], extra \[\]\)"),
])
def test_bad_search_spaces(tmp_path, content, match):
  path = tmp_path / "space.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    runner.load_search_space(str(path), 2)


def test_search_space_formats(tmp_path):
  listed = tmp_path / "list.json"
  listed.write_text(json.dumps([{"lr": 1}, {"lr": 2}, {"lr": 3}]))
  assert runner.load_search_space(str(listed), 2) == [{"lr": 1}, {"lr": 2}]
  ranges = tmp_path / "dict.json"
  ranges.write_text(json.dumps({
      "learning_rate": {"min": 1e-4, "max": 1e-1, "scaling": "log"},
      "warmup_factor": {"min": 0.0, "max": 0.1, "scaling": "linear"},
      "dropout_rate": {"feasible_points": [0.0, 0.1]}}))
  points = runner.load_search_space(str(ranges), 8, seed=3)
  assert points == runner.load_search_space(str(ranges), 8, seed=3)  # deterministic
  assert len({p["learning_rate"] for p in points}) == 8
  for p in points:
    assert 1e-4 <= p["learning_rate"] <= 1e-1 and 0 <= p["warmup_factor"] <= 0.1
    assert p["dropout_rate"] in (0.0, 0.1)
  # Log scaling spreads points over decades, not over the linear range.
  assert sum(p["learning_rate"] < 1e-2 for p in points) >= 4


def test_runner_command_line(tmp_path):
  """`python -m weight_averaging.runner` with the official flag names, end to end."""
  import subprocess
  import sys
  command = [sys.executable, "-m", "weight_averaging.runner",
             f"--submission_path={SUBMISSION}", f"--tuning_search_space={SPACE}",
             f"--experiment_dir={tmp_path}", "--experiment_name=cli",
             "--max_global_steps=40", "--eval_every_steps=20", "--progress=false"]
  env = dict(os.environ)
  done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "trial_1: 40 steps" in done.stdout
  again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode != 0 and "--overwrite" in again.stderr


def test_importing_the_runner_defines_no_flag():
  """Only the command line (`weight_averaging.runner.__main__`) defines absl flags."""
  code = textwrap.dedent(f"""
      from absl import flags
      import weight_averaging.runner
      from weight_averaging.runner import checkpoints, distributed, experiment, launch
      from weight_averaging.runner import search_space, submissions, trial
      names = {RUNNER_FLAGS!r}
      defined = [n for n in names if n in flags.FLAGS]
      assert not defined, f"importing the runner defined {{defined}}"
      import weight_averaging.runner.__main__
      missing = [n for n in names if n not in flags.FLAGS]
      assert not missing, f"the command line lacks {{missing}}"
      """)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]


def test_hparam_indices_select_trials_as_the_official_runner_slices(tmp_path):
  from weight_averaging.runner import experiment
  assert list(experiment.selected_trials(5, None, None)) == [1, 2, 3, 4, 5]
  assert list(experiment.selected_trials(5, 2, 3)) == [3]
  for start, end in ((3, 3), (0, 6), (-1, 2)):
    with pytest.raises(ValueError, match=f"--hparam_start_index={start} "
                                         f"--hparam_end_index={end} select no trial of the 5"):
      experiment.selected_trials(5, start, end)


def test_kept_checkpoints_survive_and_bad_keep_steps_are_named(tmp_path):
  submission = fixture_submission()
  run(tmp_path, submission, name="keep", steps=60, stop_at_target=False, keep_steps=(10, 20))
  assert runner.checkpoints.checkpoint_steps(str(tmp_path / "keep")) == [10, 20, 40, 60]
  with pytest.raises(ValueError, match=r"--checkpoint_steps: step 70 is outside 1..60"):
    run(tmp_path, submission, name="bad", steps=60, keep_steps=(70,))
  with pytest.raises(ValueError, match="--save_checkpoints=false writes none"):
    run(tmp_path, submission, name="bad2", steps=60, keep_steps=(20,), save_checkpoints=False)

"""What we refuse: bad input is an error that names the thing (hyperparameter, flag, file)
and says what to do, or, where it is legitimate but unused, a warning that names it.

One section per area; read the test names as the list of refusals.
"""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import weight_averaging as wa
from weight_averaging import algoperf_api, processes, runner
from weight_averaging.runner import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================
# Hyperparameters of the submissions: names, booleans, windows, the ruleset.
# ============================================================================

hp = algoperf_api.hyperparameters
NADAMW = dict(algoperf_api.SELF_TUNING_NADAMW)


def as_namedtuple(point):
  """What the official runner hands a submission."""
  return collections.namedtuple("Hyperparameters", sorted(point))(**point)


class _Workload:
  """Just enough workload for `init_optimizer_state` to fail on its hyperparameters."""

  step_hint = 100
  metrics_logger = None

  @staticmethod
  def model_fn(params, batch, model_state, mode, rng, update_batch_norm, dropout_rate):
    raise AssertionError("not reached")


def init(submission, point):
  """A submission's ``init_optimizer_state`` on a tiny params tree, as the runner calls it."""
  make_optimizer, make_averager = {
      "nadamw_ema": (algoperf_api.nadamw_from_hyperparameters,
                     algoperf_api.ema_from_hyperparameters),
      "nadamw_lawa": (algoperf_api.nadamw_from_hyperparameters,
                      algoperf_api.lawa_from_hyperparameters),
      "shampoo": (algoperf_api.shampoo_from_hyperparameters, None)}[submission]
  sub = algoperf_api.build_submission(make_optimizer, make_averager, api="jit")
  params = {"w": jnp.zeros((3, 2))}
  return sub.init_optimizer_state(_Workload(), params, None, as_namedtuple(point), None)


@pytest.mark.parametrize("submission, typo, meant", [
    ("nadamw_ema", "ema_betta", "ema_beta"),
    ("nadamw_lawa", "lawa_kk", "lawa_k"),
    ("shampoo", "preconditioning_evry", "preconditioning_every"),
    ("nadamw_lawa", "averaging_evry_fraction", "averaging_every_fraction"),
    ("nadamw_ema", "learning_rat", "learning_rate"),
])
def test_misspelled_hyperparameter_is_refused_with_the_name_meant(submission, typo, meant):
  point = dict(NADAMW, **{typo: 0.5})
  if typo == "learning_rat":
    del point["learning_rate"]  # refused as unknown, before 'learning_rate' is missed
  with pytest.raises(ValueError) as error:
    init(submission, point)
  assert f"unknown hyperparameter {typo!r}" in str(error.value)
  assert f"did you mean {meant!r}" in str(error.value)


def test_a_name_no_submission_reads_and_nothing_is_close_is_refused():
  with pytest.raises(ValueError, match="unknown hyperparameter 'zzz'"):
    init("nadamw_ema", dict(NADAMW, zzz=1))


def test_another_submissions_hyperparameter_is_logged_once_not_refused(caplog):
  """One search space for several submissions: lawa_k given to an EMA submission."""
  with caplog.at_level("WARNING"):
    init("nadamw_ema", dict(NADAMW, ema_beta=0.9, lawa_k=20))
  lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
  assert len(lines) == 1 and "lawa_k" in lines[0] and "ema_beta" not in lines[0]


def test_debias_must_be_a_boolean():
  with pytest.raises(ValueError, match=r"'debias' must be true or false, got 'no'"):
    wa.ema(0.9, debias="no")
  with pytest.raises(ValueError, match="'debias'"):
    wa.ema(0.9, debias=1)


def test_use_nadam_must_be_a_boolean():
  with pytest.raises(ValueError, match=r"'use_nadam' must be true or false, got 'no'"):
    hp.shampoo_config(dict(algoperf_api.SELF_TUNING_SHAMPOO, use_nadam="no"))


@pytest.mark.parametrize("steps, fraction, value, fraction_value", [
    ("averaging_every", "averaging_every_fraction", 64, 0.0005),
    ("averaging_start_step", "averaging_start_fraction", 0, 0.0),
])
def test_steps_and_fraction_of_one_window_are_not_both_given(steps, fraction, value,
                                                              fraction_value):
  with pytest.raises(ValueError) as error:
    init("nadamw_lawa", dict(NADAMW, **{steps: value, fraction: fraction_value}))
  assert repr(steps) in str(error.value) and repr(fraction) in str(error.value)
  assert "give one" in str(error.value)


@pytest.mark.parametrize("name, value", [
    ("averaging_every_fraction", 0.0), ("averaging_every_fraction", 1.5),
    ("averaging_every_fraction", -0.001), ("averaging_every_fraction", "0.0005"),
    ("averaging_every_fraction", True), ("averaging_start_fraction", 1.0),
    ("averaging_start_fraction", -0.1), ("averaging_start_fraction", float("nan")),
])
def test_window_fraction_out_of_range_is_refused(name, value):
  with pytest.raises(ValueError, match=repr(name)):
    init("nadamw_lawa", dict(NADAMW, **{name: value}))


def test_a_fraction_without_a_step_hint_is_refused():
  with pytest.raises(ValueError, match="'averaging_every_fraction'.*no step_hint"):
    hp.averaging_config({"averaging_every_fraction": 0.001})


def test_external_ruleset_names_a_missing_hyperparameter():
  point = dict(NADAMW)
  del point["beta2"]
  with pytest.raises(ValueError, match="'beta2' is missing"):
    init("nadamw_ema", point)


def test_unknown_workload_batch_size_raises_value_error_for_the_runners_fallback():
  with pytest.raises(ValueError, match="ogbg_gelu"):
    algoperf_api.get_batch_size("ogbg_gelu")


def run_experiment(tmp_path, **kw):
  return runner.run_experiment(
      workload_name="teacher_student",
      submission_path=os.path.join(REPO, "submissions/jit/nadamw_lawa/submission.py"),
      experiment_dir=str(tmp_path), experiment_name="bad", max_global_steps=2, **kw)


def test_self_tuning_refuses_a_search_space(tmp_path):
  with pytest.raises(ValueError, match="--tuning_search_space cannot be given with "
                                       "--tuning_ruleset=self"):
    run_experiment(tmp_path, tuning_ruleset="self", tuning_search_space=os.path.join(
        REPO, "tuning_search_spaces/embedded/nadamw_lawa.json"))
  assert not os.path.exists(tmp_path / "bad")


def test_self_tuning_refuses_several_trials(tmp_path):
  with pytest.raises(ValueError, match="--num_tuning_trials=3 with --tuning_ruleset=self"):
    run_experiment(tmp_path, tuning_ruleset="self", num_tuning_trials=3)


def test_unknown_ruleset_is_refused(tmp_path):
  with pytest.raises(ValueError, match="--tuning_ruleset must be one of"):
    run_experiment(tmp_path, tuning_ruleset="selftuning")


def test_external_ruleset_needs_a_search_space_on_the_command_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "weight_averaging.runner",
       f"--submission_path={REPO}/submissions/jit/nadamw_lawa/submission.py",
       f"--experiment_dir={tmp_path}", "--experiment_name=bad"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert done.returncode != 0
  assert "--tuning_search_space is required with --tuning_ruleset=external" in done.stderr


# ============================================================================
# The study scripts: scoring, figures, offline averaging, and the demo.
# ============================================================================

import json as _json  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_scoring  # pylint: disable=g-import-not-at-top,wrong-import-position  (its fixtures)


def _script(name, *args):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def _two_submissions(root):
  """nadamw and nadamw_ema on criteo1tb, one study each, both hitting at step 400."""
  for sub in ("nadamw", "nadamw_ema"):
    test_scoring.write_trial(root, sub, "study_0", "criteo1tb", "trial_1", 0,
                             test_scoring.HIT_400)
  return str(root)


def test_score_refuses_a_baseline_that_is_not_scored(tmp_path):
  done = _script("score.py", f"--experiment_dir={_two_submissions(tmp_path)}",
                 "--use_algoperf=no", "--baseline=adamw")
  assert done.returncode != 0
  assert ("baseline 'adamw' is not among the submissions scored" in done.stderr
          and "(nadamw, nadamw_ema)" in done.stderr), done.stderr
  assert not (tmp_path / "scores.json").exists()


def test_score_refuses_zero_devices(tmp_path):
  done = _script("score.py", f"--experiment_dir={_two_submissions(tmp_path)}",
                 "--use_algoperf=no", "--num_devices=0")
  assert done.returncode != 0 and "--num_devices=0" in done.stderr, done.stderr
  from weight_averaging.studies import scoring  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="num_devices .* must be an integer >= 1, got 0"):
    scoring.score_experiment(str(tmp_path), use_algoperf="no", num_devices=0)


def test_score_skips_a_cut_short_eval_file_names_it_and_scores_the_rest(tmp_path):
  root = _two_submissions(tmp_path)
  cut = tmp_path / "nadamw_ema" / "study_0" / "criteo1tb_jax" / "trial_1"
  data = (cut / "eval_measurements.csv").read_bytes()
  (cut / "eval_measurements.csv").write_bytes(data[:-25])   # the last line, cut mid-row
  done = _script("score.py", f"--experiment_dir={root}", "--use_algoperf=no")
  assert done.returncode == 0, done.stderr
  assert f"warning: not scored, trial {cut}: eval_measurements.csv: its last line is cut " \
         "short" in done.stderr, done.stderr
  scores = _json.loads((tmp_path / "scores.json").read_text())
  assert [s["trial"] for s in scores["skipped_trials"]] == [str(cut)]
  assert scores["submissions"] == ["nadamw"]
  assert scores["results"]["criteo1tb"]["nadamw"]["median_steps_to_target"] == 400


def test_score_leaves_out_an_unfinished_trial_and_says_so(tmp_path):
  root = _two_submissions(tmp_path)
  killed = tmp_path / "nadamw_ema" / "study_1" / "criteo1tb_jax" / "trial_1"
  test_scoring.write_trial(tmp_path, "nadamw_ema", "study_1", "criteo1tb", "trial_1", 0,
                           [0.15, 0.14, 0.13], steps=(100, 200, 300))
  (killed / "flags_0.json").write_text(_json.dumps({"max_global_steps": 600}))
  done = _script("score.py", f"--experiment_dir={root}", "--use_algoperf=no")
  assert done.returncode == 0, done.stderr
  assert (f"warning: not scored, unfinished trial {killed}: stopped at step 300, before any "
          "of its stopping rules") in done.stderr, done.stderr
  scores = _json.loads((tmp_path / "scores.json").read_text())
  assert [u["trial"] for u in scores["unfinished_trials"]] == [str(killed)]
  # Scored, study_1 would be a miss and the median of (400, miss) a miss.
  assert scores["results"]["criteo1tb"]["nadamw_ema"]["median_steps_to_target"] == 400


@pytest.mark.parametrize("content, expected", [
    ('{"format": "weight_averaging.scores/2", "results": {', "not valid JSON"),
    ('{"format": "weight_averaging.scores/2", "submissions": []}', "missing baseline"),
    ('[1, 2]', "not a scores file of format"),
    ('{"format": "weight_averaging.offline/1", "grid": []}', "not a scores file of format"),
])
def test_plot_names_a_damaged_or_wrong_scores_file_and_what_is_missing(tmp_path, content,
                                                                        expected):
  path = tmp_path / "scores.json"
  path.write_text(content)
  done = _script("plot.py", f"--scores={path}", f"--output_dir={tmp_path / 'figs'}")
  assert done.returncode != 0
  assert f"plot.py: error: {path}: " in done.stderr and expected in done.stderr, done.stderr
  assert "Traceback" not in done.stderr


def test_plot_names_the_result_a_scores_file_lacks(tmp_path):
  root = _two_submissions(tmp_path)
  assert _script("score.py", f"--experiment_dir={root}", "--use_algoperf=no").returncode == 0
  scores = _json.loads((tmp_path / "scores.json").read_text())
  del scores["results"]["criteo1tb"]["nadamw"]["studies"]
  (tmp_path / "scores.json").write_text(_json.dumps(scores))
  done = _script("plot.py", f"--scores={tmp_path / 'scores.json'}",
                 f"--output_dir={tmp_path / 'figs'}")
  assert done.returncode != 0 and "missing results/criteo1tb/nadamw/studies" in done.stderr


def test_offline_average_names_a_corrupt_snapshot_and_never_unpickles_it(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  from weight_averaging import snapshots  # pylint: disable=g-import-not-at-top
  from weight_averaging.studies import offline  # pylint: disable=g-import-not-at-top
  like = offline._like(offline.load_workload("teacher_student"), "jit")  # pylint: disable=protected-access
  writer = snapshots.SnapshotWriter(str(tmp_path / "snaps"), 10, like, run="run")
  writer.save(0, like)
  writer.flush()
  path = snapshots.step_path(str(tmp_path / "snaps"), 0)
  with open(path, "wb") as f:   # a pickle that would write a file if it were loaded
    pickle.dump(_Unpickled(str(tmp_path / "ran")), f)
  done = _script("offline_average.py", f"--snapshot_dir={tmp_path / 'snaps'}", "--every=10",
                 "--lawa_k=2", f"--output_json={tmp_path / 'out.json'}")
  assert done.returncode != 0
  assert f"offline_average.py: error: {path}: damaged snapshot" in done.stderr, done.stderr
  assert "allow_pickle" not in done.stderr and not (tmp_path / "ran").exists()


class _Unpickled:

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_demo_refuses_a_directory_with_runs_it_did_not_write(tmp_path, capsys):
  from weight_averaging import __main__ as demo  # pylint: disable=g-import-not-at-top
  trial = tmp_path / "nadamw" / "study_0" / "criteo1tb_jax" / "trial_1"   # a study grid's
  trial.mkdir(parents=True)
  (trial / "eval_measurements.csv").write_text("global_step\n100\n")
  assert demo.main(["demo", f"--output_dir={tmp_path}", "--seeds=1", "--no_progress"]) == 2
  err = capsys.readouterr().err
  assert f"--output_dir {tmp_path} is not empty" in err and "--overwrite" in err, err
  assert (trial / "eval_measurements.csv").read_text() == "global_step\n100\n"


# ============================================================================
# The embedded runner, its checkpoints and the launcher: flags, search spaces,
# submissions, damaged files and locks. (run_study's lock and the process groups:
# tests/test_run_study.py and tests/test_multiprocess.py.)
# ============================================================================

FIXTURES = os.path.join(REPO, "tests", "fixtures")
SGD_SUBMISSION = os.path.join(FIXTURES, "sgd_submission.py")
SGD_SPACE = os.path.join(FIXTURES, "sgd_search_space.json")
EMBEDDED_SPACES = os.path.join(REPO, "tuning_search_spaces", "embedded")


def run_embedded(tmp_path, **kw):
  """`runner.run_experiment`: the SGD fixture, 2 steps, into ``tmp_path/exp``."""
  args = dict(workload_name="teacher_student", submission_path=SGD_SUBMISSION,
              tuning_search_space=SGD_SPACE, experiment_dir=str(tmp_path),
              experiment_name="exp", max_global_steps=2, eval_every_steps=2)
  return runner.run_experiment(**dict(args, **kw))


def runner_cli(tmp_path, *flags, submission=SGD_SUBMISSION, space=SGD_SPACE):
  return subprocess.run(
      [sys.executable, "-m", "weight_averaging.runner", f"--submission_path={submission}",
       f"--tuning_search_space={space}", f"--experiment_dir={tmp_path}",
       "--experiment_name=exp", "--progress=false", *flags],
      capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("flag, value", [
    ("max_global_steps", 0), ("max_global_steps", -3), ("eval_every_steps", 0)])
def test_a_step_flag_below_one_is_refused_not_read_as_the_default(tmp_path, flag, value):
  with pytest.raises(ValueError, match=f"--{flag} must be an integer >= 1, got {value} "
                                       r"\(leave it unset for the workload's"):
    run_embedded(tmp_path, **{flag: value})
  assert not os.path.exists(tmp_path / "exp")


@pytest.mark.parametrize("value", [0, -2])
def test_num_devices_below_one_is_refused(value):
  with pytest.raises(ValueError, match=f"--num_devices must be an integer >= 1, got {value}"):
    runner.simulate_devices(value)


def test_num_devices_below_one_is_named_on_the_command_line(tmp_path):
  done = runner_cli(tmp_path, "--num_devices=-2")
  assert done.returncode == 1, done.stderr[-2000:]
  assert "--num_devices must be an integer >= 1, got -2" in done.stderr
  assert "vector::reserve" not in done.stderr
  assert not os.path.exists(tmp_path / "exp")


def test_min_above_max_in_a_dict_search_space_is_refused(tmp_path):
  path = tmp_path / "space.json"
  path.write_text(json.dumps({"learning_rate": {"min": 0.1, "max": 0.01, "scaling": "log"}}))
  with pytest.raises(ValueError) as error:
    runner.load_search_space(str(path), 3)
  assert f"search space {path}: learning_rate has min 0.1 > max 0.01" in str(error.value)


def test_more_trials_than_a_list_search_space_holds_are_refused(tmp_path):
  with pytest.raises(ValueError) as error:
    run_embedded(tmp_path, num_tuning_trials=3)
  assert (f"--num_tuning_trials=3, but the search space {SGD_SPACE} lists 1 point(s)"
          in str(error.value))
  assert not os.path.exists(tmp_path / "exp")


@pytest.mark.parametrize("built_for, run_as", [("pmap", "jit"), ("jit", "pmap")])
def test_a_submission_of_the_other_api_is_refused_by_name(tmp_path, built_for, run_as):
  path = os.path.join(REPO, "submissions", built_for, "nadamw", "submission.py")
  with pytest.raises(ValueError) as error:
    run_embedded(tmp_path, submission_path=path, api=run_as,
                 tuning_search_space=os.path.join(EMBEDDED_SPACES, "nadamw.json"))
  assert f"{path} is a {built_for}-API submission" in str(error.value)
  assert f"pass --api={built_for}" in str(error.value)
  assert not os.path.exists(tmp_path / "exp")


def test_a_bad_hyperparameter_leaves_nothing_behind_so_the_fix_runs_as_is(tmp_path):
  """The submission refuses the point (in ``init_optimizer_state``) before the runner
  writes anything; the corrected command then needs no ``--overwrite``."""
  space = tmp_path / "space.json"
  space.write_text(json.dumps([{"learning_rate": 0.05}, {"learning_rate": -1.0}]))
  with pytest.raises(ValueError) as error:
    run_embedded(tmp_path / "runs", tuning_search_space=str(space), num_tuning_trials=2)
  assert f"point 2 of {space}: hyperparameter 'learning_rate'" in str(error.value)
  assert not os.path.exists(tmp_path / "runs")
  space.write_text(json.dumps([{"learning_rate": 0.05}, {"learning_rate": 0.01}]))
  results = run_embedded(tmp_path / "runs", tuning_search_space=str(space),
                         num_tuning_trials=2)
  assert [r.global_step for r in results] == [2, 2]


def test_a_second_runner_on_an_experiment_is_refused_naming_the_first(tmp_path):
  lock = tmp_path / "exp" / ".teacher_student_jax.lock"
  lock.parent.mkdir()
  # The first runner, as the lock's protocol sees it: an flock held, its pid in the file.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\nf = open(sys.argv[1], 'w')\n"
       "fcntl.flock(f, fcntl.LOCK_EX)\nf.write(str(os.getpid()))\nf.flush()\n"
       "print('locked', flush=True)\ntime.sleep(120)", str(lock)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(processes.Busy) as error:
      run_embedded(tmp_path)
  finally:
    holder.kill()
    holder.wait()
  assert f"is in use by another process (pid {holder.pid}, holding {lock})" in str(error.value)
  assert not os.path.exists(tmp_path / "exp" / "teacher_student_jax")
  with processes.exclusive(str(lock), "the experiment"):  # free once its holder is gone
    assert lock.read_text().strip() == str(os.getpid())


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_naming_each(tmp_path):
  run_embedded(tmp_path, max_global_steps=4)  # checkpoints at steps 2 and 4
  trial = tmp_path / "exp" / "teacher_student_jax" / "trial_1"
  for step in (2, 4):
    (trial / f"runner_state_{step}.json").write_text('{"global_step": ')
  with pytest.raises(ValueError) as error:
    run_embedded(tmp_path, max_global_steps=6, resume_last_run=True)
  message = str(error.value)
  assert f"no readable checkpoint in {trial}" in message
  for step in (2, 4):
    assert f"{trial / f'runner_state_{step}.json'} is damaged (JSONDecodeError" in message
  assert "--overwrite" in message


@pytest.mark.skipif(jax.device_count() != 4, reason="writes the checkpoint on 4 devices")
def test_resuming_on_another_device_count_names_both_counts(tmp_path):
  """A sharded LAWA state is padded to the device count: 4 devices write, 2 resume."""
  with open(os.path.join(EMBEDDED_SPACES, "nadamw_lawa.json")) as f:
    [point] = json.load(f)
  space = tmp_path / "space.json"
  space.write_text(json.dumps([dict(point, averaging_placement="sharded",
                                    averaging_every=1)]))
  submission = os.path.join(REPO, "submissions/jit/nadamw_lawa/submission.py")
  run_embedded(tmp_path, submission_path=submission, tuning_search_space=str(space))
  done = runner_cli(tmp_path, "--max_global_steps=2", "--eval_every_steps=2",
                    "--num_devices=2", "--resume_last_run", submission=submission,
                    space=str(space))
  assert done.returncode != 0
  assert "was written by a run on 4 devices; this run has 2" in done.stderr, \
      done.stderr[-3000:]
  assert "--num_devices=4" in done.stderr and "--overwrite" in done.stderr


def test_the_launcher_without_a_command_says_what_is_missing(capsys):
  assert launch.main(["--num_processes", "2", "python", "train.py"]) == 2
  assert "no command to run: give it after '--'" in capsys.readouterr().err


# ============================================================================
# Learning-rate schedules of NadamW and Shampoo: lr_schedule and its shape.
# ============================================================================

SCHEDULE_POINTS = {"nadamw_ema": NADAMW, "shampoo": dict(algoperf_api.SELF_TUNING_SHAMPOO)}
_IN_0_1 = r"must be a number in \(0.0, 1.0\], got "


@pytest.mark.parametrize("submission", sorted(SCHEDULE_POINTS))
@pytest.mark.parametrize("given, message", [
    ({"lr_schedule": "cosin"},
     r"'lr_schedule' must be one of \('cosine', 'constant', 'linear', 'wsd'\), got 'cosin'"),
    ({"lr_schedule": "wsd", "wsd_decay": "sqrt"},
     r"'wsd_decay' must be one of \('linear', 'cosine'\), got 'sqrt'"),
    ({"step_hint_factor": 0.0}, "'step_hint_factor' " + _IN_0_1 + "0.0"),
    ({"step_hint_factor": 1.5}, "'step_hint_factor' " + _IN_0_1 + "1.5"),
    ({"step_hint_factor": "0.5"}, "'step_hint_factor' " + _IN_0_1 + "'0.5'"),
    ({"lr_end_factor": -0.1}, r"'lr_end_factor' must be a number in \[0.0, 1.0\], got -0.1"),
    ({"lr_end_factor": 1.5}, r"'lr_end_factor' must be a number in \[0.0, 1.0\], got 1.5"),
    ({"lr_schedule": "wsd", "cooldown_fraction": 0.0}, "'cooldown_fraction' " + _IN_0_1 + "0.0"),
    ({"lr_schedule": "wsd", "cooldown_fraction": 1.2}, "'cooldown_fraction' " + _IN_0_1 + "1.2"),
    ({"cooldown_fraction": 0.1},
     r"'cooldown_fraction' \(0.1\) belongs to lr_schedule 'wsd', and lr_schedule is "
     r"'cosine': remove 'cooldown_fraction' or set lr_schedule 'wsd'"),
    ({"lr_schedule": "linear", "wsd_decay": "cosine"},
     r"'wsd_decay' \('cosine'\) belongs to lr_schedule 'wsd', and lr_schedule is 'linear'"),
    ({"lr_schedule": "constant", "lr_end_factor": 0.5},
     r"'lr_end_factor' \(0.5\) is the end of a decay, and lr_schedule 'constant' never "
     "decays: remove 'lr_end_factor'"),
])
def test_bad_schedule_is_refused_naming_the_hyperparameter_and_value(submission, given,
                                                                     message):
  with pytest.raises(ValueError, match=message):
    init(submission, dict(SCHEDULE_POINTS[submission], **given))


def test_a_misspelled_schedule_name_is_refused_with_the_name_meant():
  with pytest.raises(ValueError, match="unknown hyperparameter 'lr_shedule' "
                                       r"\(did you mean 'lr_schedule'"):
    init("nadamw_ema", dict(NADAMW, lr_shedule="wsd"))

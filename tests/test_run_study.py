"""Study grids: workload configs, the runners' exact command lines, resume and failures."""

import csv
import glob
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from weight_averaging import layout, workloads
from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import checkout, configs, grid, scores_file, scoring
from weight_averaging.studies import workload_facts

REPO = configs.REPO
PAPER_WORKLOADS = workload_facts.PAPER_WORKLOADS
SCRIPT = os.path.join(REPO, "scripts", "run_study.py")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
FAKE_ALGOPERF = os.path.join(FIXTURES, "run_study_fake_algoperf")
sys.path.insert(0, FIXTURES)
import process_groups  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
DATA_ROOT = "/data"

# The paper's points (paper.md 4.2 and 4.4), numbered from 1 as in tuning_search_spaces/.
PAPER_NADAMW_POINT = {"criteo1tb": 5, "fastmri": 3, "imagenet_vit": 2,
                      "librispeech_conformer": 5, "librispeech_deepspeech": 5, "ogbg": 5,
                      "wmt": 3}
PAPER_SHAMPOO_POINT = {"fastmri": 2, "imagenet_vit": 2, "wmt": 4}
# The data flags algoperf's dataset_setup.py layout and its docker startup script use.
LIBRISPEECH = {"data_dir": "/data/librispeech",
               "librispeech_tokenizer_vocab_path": "/data/librispeech/spm_model.vocab"}
EXPECTED_DATA_FLAGS = {
    "criteo1tb": {"data_dir": "/data/criteo1tb"},
    "fastmri": {"data_dir": "/data/fastmri"},
    "imagenet_vit": {"data_dir": "/data/imagenet/jax",
                     "imagenet_v2_data_dir": "/data/imagenet/jax"},
    "librispeech_conformer": LIBRISPEECH,
    "librispeech_deepspeech": LIBRISPEECH,
    "ogbg": {"data_dir": "/data/ogbg"},
    "wmt": {"data_dir": "/data/wmt"},
    "teacher_student": {},
}


def run_cli(*args, env=None, timeout=240):
  """scripts/run_study.py in a fresh process (its absl flags would clash with the runner's)."""
  full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def parse_command(line):
  """``cd DIR && [VAR=value ...] ARGV`` -> (DIR, {VAR: value}, argv, {flag: value})."""
  cd, rest = line.split(" && ", 1)
  words = shlex.split(rest)
  env = {}
  while "=" in words[0] and not words[0].startswith("-") and "/" not in words[0].split("=")[0]:
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  flags = {}
  for word in words:
    if word.startswith("--"):
      key, _, value = word[2:].partition("=")
      assert key not in flags, f"--{key} given twice in {line}"
      flags[key] = value if _ else True
  return shlex.split(cd)[1], env, words, flags


def commands_of(stdout):
  return [parse_command(line) for line in stdout.splitlines() if line.startswith("cd ")]


def find_algoperf_checkout():
  """An algoperf checkout: $ALGOPERF_DIR, or the one `import algoperf` finds; else None."""
  candidates = [os.environ.get("ALGOPERF_DIR")]
  spec = importlib.util.find_spec("algoperf")
  if spec is not None and spec.origin:
    candidates.append(os.path.dirname(os.path.dirname(spec.origin)))
  for path in candidates:
    if path and os.path.isfile(os.path.join(path, checkout.OFFICIAL_RUNNER)):
      return path
  return None


# ----------------------------------------------------------------------------
# The configs.


def test_every_workload_has_a_valid_config():
  loaded = configs.load_all()
  assert set(loaded) == set(PAPER_WORKLOADS) | {"teacher_student", "teacher_student_bn"}
  for name in PAPER_WORKLOADS:
    assert loaded[name].runner == "official"
  assert loaded["teacher_student"].runner == loaded["teacher_student_bn"].runner == "embedded"


def test_configs_take_the_workload_facts_from_one_place():
  """Step hints, budgets and targets are the workload's own (scoring's specs), and no config
  file restates them."""
  for name in PAPER_WORKLOADS + ("teacher_student",):
    config, spec = configs.load(name), scoring.workload_spec(name)
    assert config.step_hint == spec.step_hint, name
    assert config.max_allowed_runtime_sec == spec.max_allowed_runtime_sec, name
    assert f"validation/{config.target.metric}" == spec.metric, name
    assert (config.target.validation, config.target.minimize, config.target.strict) == (
        spec.target, spec.minimize, spec.strict), name
    with open(os.path.join(configs.CONFIG_DIR, f"{name}.json")) as f:
      raw = json.load(f)
    assert not {"step_hint", "step_hint_v05", "max_allowed_runtime_sec", "target"} & set(raw)
  facts = workload_facts.ALGOPERF_WORKLOADS["wmt"]
  wmt = configs.load("wmt")
  assert (wmt.target.test, wmt.step_hint_v05) == (facts.test_target, facts.step_hint_v05)


def test_configs_hold_the_papers_points():
  nadamw = json.load(open(os.path.join(REPO, "tuning_search_spaces", "nadamw.json")))
  shampoo = json.load(open(os.path.join(REPO, "tuning_search_spaces", "shampoo.json")))
  for name in PAPER_WORKLOADS:
    config = configs.load(name)
    n = config.optimizers["nadamw"]
    s = config.optimizers["shampoo"]
    assert n.point == PAPER_NADAMW_POINT[name]
    assert n.hyperparameters == nadamw[n.point - 1]
    assert s.point == PAPER_SHAMPOO_POINT.get(name, 1)  # Meta's point 1 where none is known
    assert s.hyperparameters == shampoo[s.point - 1]


def test_averaging_window_is_about_one_percent_of_training():
  for name in PAPER_WORKLOADS:
    config = configs.load(name)
    assert config.averaging.lawa_k == 20 and config.averaging.ema_beta == 0.9
    assert 0.009 <= config.window_fraction() <= 0.0101, name
    expected_nu = round(0.01 * config.step_hint / 20)
    assert config.averaging.every == expected_nu, name


def test_embedded_config_matches_the_workload_code():
  config = configs.load("teacher_student")
  for api in configs.APIS:
    workload = workloads.get_workload("teacher_student", api=api)
    assert config.step_hint == workload.step_hint
    assert config.max_allowed_runtime_sec == workload.max_allowed_runtime_sec
    assert config.target.metric == workload.target_metric_name
    assert config.target.validation == workload.validation_target_value
    assert config.target.test == workload.test_target_value
  embedded = os.path.join(REPO, "tuning_search_spaces", "embedded")
  for opt in catalog.OPTIMIZERS:
    [point] = json.load(open(os.path.join(embedded, f"{opt}.json")))
    assert config.optimizers[opt].hyperparameters == point


def test_configs_match_the_algoperf_checkout():
  algoperf_dir = find_algoperf_checkout()
  if algoperf_dir is None:
    pytest.skip("no algoperf checkout (set ALGOPERF_DIR)")

  def constant(name, prop):
    root = os.path.join(algoperf_dir, "algoperf", "workloads", name)
    for path in sorted(glob.glob(os.path.join(root, "*_jax", "workload.py"))) + [
        os.path.join(root, "workload.py")]:
      text = open(path).read() if os.path.isfile(path) else ""
      match = re.search(rf"def {prop}\(self\)[^:]*:\s*(?:\"\"\"[\s\S]*?\"\"\"\s*)?"
                        r"return ([\d_.]+)", text)
      if match:
        return float(match.group(1).replace("_", ""))
    raise AssertionError(f"no {prop} for {name} in {algoperf_dir}")

  for name in PAPER_WORKLOADS:
    config = configs.load(name)
    assert config.step_hint == constant(name, "step_hint"), name
    assert config.max_allowed_runtime_sec == constant(name, "max_allowed_runtime_sec")


def _write_config(tmp_path, name, edit):
  raw = json.load(open(os.path.join(configs.CONFIG_DIR, f"{name}.json")))
  edit(raw)
  path = tmp_path / f"{name}.json"
  path.write_text(json.dumps(raw))
  return path


def _delete(*keys):
  def edit(raw):
    for key in keys[:-1]:
      raw = raw[key]
    del raw[keys[-1]]
  return edit


def _set(value, *keys):
  def edit(raw):
    for key in keys[:-1]:
      raw = raw[key]
    raw[keys[-1]] = value
  return edit


@pytest.mark.parametrize("edit, message", [
    (_delete("averaging", "lawa_k"), "averaging.lawa_k: missing"),
    (_delete("data_flags", "data_dir"), "data_flags.data_dir: missing"),
    (_set({"jit": 120000, "pmap": 120000}, "step_hint"),
     "step_hint: is the workload's own fact: it comes from weight_averaging.studies."
     "workload_facts"),
    (_set(133333, "step_hint_v05"), "step_hint_v05: is the workload's own fact"),
    (_set({"metric": "bleu", "validation": 30.8491, "test": 30.7219, "minimize": False},
          "target"), "target: is the workload's own fact"),
    (_delete("nadamw", "hyperparameters", "learning_rate"), "'learning_rate' is missing"),
    (_set(1.0, "averaging", "ema_beta"), "'ema_beta' must be a number in [0.0, 1.0)"),
    (_set(2.5, "averaging", "lawa_k"), "'lawa_k' must be an integer >= 1"),
    (_set(-0.1, "nadamw", "hyperparameters", "learning_rate"), "'learning_rate'"),
    (_set("lamb", "shampoo", "hyperparameters", "graft_type"), "'graft_type'"),
    (_set(64, "nadamw", "hyperparameters", "averaging_every"),
     "nadamw.hyperparameters.averaging_every: averaging hyperparameters belong in 'averaging'"),
    (_set(0, "nadamw", "point"), "nadamw.point: hyperparameter 'point' must be an integer >= 1"),
    (_set("{data}/wmt", "data_flags", "data_dir"), "unknown placeholder {data}"),
    (_set("/x", "data_flags", "tokenizer"), "data_flags.tokenizer: unknown key"),
    (_set({"jit": "sharded", "pmap": "sharded"}, "averaging", "averaging_placement"),
     "averaging.averaging_placement.pmap: the pmap API supports only 'replicated'"),
    (_set("slurm", "runner"), "runner: must be one of"),
    (_set("other", "workload"), "is 'other', but the file is named for 'wmt'"),
    (_set(1, "step_hint_v6"), "step_hint_v6: unknown key"),
])
def test_a_bad_config_is_an_error_naming_file_and_key(tmp_path, edit, message):
  path = _write_config(tmp_path, "wmt", edit)
  with pytest.raises(ValueError) as e:
    configs.load("wmt", config_dir=str(tmp_path))
  assert str(path) in str(e.value)
  assert message in str(e.value)


def test_unknown_workload_and_unreadable_file_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown workload 'imagenet_resnet'.*wmt"):
    configs.load("imagenet_resnet")
  (tmp_path / "wmt.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"wmt.json: not valid JSON"):
    configs.load("wmt", config_dir=str(tmp_path))
  raw = json.load(open(os.path.join(configs.CONFIG_DIR, "wmt.json")))
  (tmp_path / "mystery.json").write_text(json.dumps(dict(raw, workload="mystery")))
  with pytest.raises(ValueError, match=r"mystery.json: workload: unknown workload 'mystery'"):
    configs.load("mystery", config_dir=str(tmp_path))


def test_search_spaces_of_a_trial():
  wmt = configs.load("wmt")
  [plain] = configs.search_space(wmt, "nadamw", "jit")
  assert plain == wmt.optimizers["nadamw"].hyperparameters
  [lawa] = configs.search_space(wmt, "nadamw_lawa", "pmap")
  assert lawa == dict(plain, averaging_every=60, lawa_k=20, averaging_start_step=0)
  [ema] = configs.search_space(wmt, "shampoo_ema", "jit")
  assert ema == dict(wmt.optimizers["shampoo"].hyperparameters, averaging_every=60,
                     ema_beta=0.9, averaging_start_step=0)
  five = configs.search_space(wmt, "shampoo_lawa", "jit", which="all")
  assert len(five) == 5 and all(p["lawa_k"] == 20 for p in five)
  assert [p["learning_rate"] for p in five] == [
      p["learning_rate"] for p in json.load(open(os.path.join(
          REPO, "tuning_search_spaces", "shampoo.json")))]
  criteo = configs.load("criteo1tb")
  # jit: 'auto', the default (not written); pmap: 'replicated', its only placement.
  assert "averaging_placement" not in configs.search_space(criteo, "nadamw_lawa", "jit")[0]
  assert configs.search_space(criteo, "nadamw_lawa", "pmap")[0]["averaging_placement"] == (
      "replicated")
  with pytest.raises(ValueError, match="unknown submission 'adamw'"):
    configs.search_space(wmt, "adamw", "jit")
  with pytest.raises(ValueError, match="needs --data_root"):
    configs.data_flags(wmt, None)


# ----------------------------------------------------------------------------
# --dry_run: the exact command lines.


@pytest.mark.parametrize("api", configs.APIS)
def test_dry_run_prints_the_runners_exact_flags_for_every_workload(tmp_path, api):
  every = list(PAPER_WORKLOADS) + ["teacher_student"]
  algoperf = "/nonexistent/algoperf"
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", f"--api={api}",
                   f"--workloads={','.join(every)}", "--num_studies=2", "--rng_seed=7",
                   f"--data_root={DATA_ROOT}", f"--algoperf_dir={algoperf}",
                   "--max_global_steps=300", "--python=/venv/bin/python")
  assert result.returncode == 0, result.stderr
  commands = commands_of(result.stdout)
  assert len(commands) == 2 * len(every) * len(catalog.NAMES)
  assert f"{len(commands)} to run, 0 skipped (finished), 0 failed" in result.stdout
  seen = set()
  for cwd, env, argv, flags in commands:
    workload, study = flags["workload"], int(flags["experiment_name"][len("study_"):])
    submission = flags["experiment_dir"].rsplit("/", 1)[1]
    seen.add((submission, workload, study))
    config = configs.load(workload)
    space = json.load(open(flags["tuning_search_space"]))
    assert space == configs.search_space(config, submission, api)
    common = {"framework": "jax", "workload": workload,
              "tuning_search_space": str(tmp_path / ".run_study" / "search_spaces" / api /
                                         submission / f"{workload}_paper.json"),
              "num_tuning_trials": "1",
              "experiment_dir": str(tmp_path / submission),
              "experiment_name": f"study_{study}", "rng_seed": str(7 + study),
              "resume_last_run": True, "max_global_steps": "300"}
    if workload == "teacher_student":
      assert cwd == REPO and env == {}
      assert argv[:3] == [sys.executable, "-m", "weight_averaging.runner"]
      assert flags == dict(common, submission_path=os.path.join(
          REPO, "submissions", api, submission, "submission.py"), api=api, progress="false")
    else:
      assert cwd == algoperf and env == {"PYTHONPATH": REPO}
      assert argv[:2] == ["/venv/bin/python", "submission_runner.py"]
      assert flags == dict(common, **EXPECTED_DATA_FLAGS[workload],
                           submission_path=f"submissions/{api}/{submission}/submission.py",
                           hparam_start_index="0", hparam_end_index="1",
                           save_checkpoints="false")
      assert os.path.isfile(os.path.join(REPO, flags["submission_path"]))
  assert len(seen) == len(commands)
  assert not any(os.path.isdir(tmp_path / s) for s in catalog.NAMES)  # nothing ran


def test_dry_run_with_all_five_points_runs_one_trial_each(tmp_path):
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", "--workloads=ogbg",
                   "--submissions=shampoo_ema", "--num_studies=1", "--search_space=all",
                   f"--data_root={DATA_ROOT}", "--algoperf_dir=/nonexistent")
  assert result.returncode == 0, result.stderr
  flags = [c[3] for c in commands_of(result.stdout)]
  assert [(f["num_tuning_trials"], f["hparam_start_index"], f["hparam_end_index"])
          for f in flags] == [("5", str(i), str(i + 1)) for i in range(5)]
  assert "[5/5] shampoo_ema ogbg study_0 trial_5: would run" in result.stdout


def test_every_flag_exists_in_the_runners():
  runner_text = open(os.path.join(REPO, "weight_averaging", "runner", "__main__.py")).read()
  embedded = set(checkout._FLAG_DEFINITION.findall(runner_text))
  algoperf_dir = find_algoperf_checkout()
  api = checkout.checkout_api(algoperf_dir) if algoperf_dir else "jit"
  options = grid.GridOptions(experiment_dir="/tmp/x", api=api, data_root=DATA_ROOT,
                             algoperf_dir=algoperf_dir or "/nonexistent", max_global_steps=10,
                             workloads=PAPER_WORKLOADS + ("teacher_student",))
  runs = grid.plan(options)
  for run in runs:
    if run.runner == "embedded":
      assert set(checkout.argv_flags(run.argv)) <= embedded
  if algoperf_dir is None:
    pytest.skip("no algoperf checkout (set ALGOPERF_DIR): official flags not checked")
  official = checkout.official_runner_flags(algoperf_dir)
  for run in runs:
    if run.runner == "official":
      assert set(checkout.argv_flags(run.argv)) <= official, run.label
  checkout.check_official_checkout(runs, algoperf_dir, api)
  other = "pmap" if api == "jit" else "jit"
  with pytest.raises(ValueError, match=f"has the {api} API, but --api={other}"):
    checkout.check_official_checkout(runs, algoperf_dir, other)


@pytest.mark.parametrize("options, message", [
    (dict(workloads=("imagenet_resnet",)), "unknown workload 'imagenet_resnet'"),
    (dict(workloads=("wmt",)), "--algoperf_dir"),
    (dict(workloads=("wmt",), algoperf_dir="/x"), "needs --data_root"),
    (dict(workloads=("wmt",), algoperf_dir="/x", data_root="/d", rng_seed=0),
     "draws a random seed for 0"),
    (dict(workloads=("wmt",), algoperf_dir="/x", data_root="/d", num_devices=2),
     "--num_devices simulates CPU devices for the embedded runner only"),
    (dict(submissions=("sgd",)), "unknown submission 'sgd'"),
    (dict(submissions=("nadamw", "nadamw")), "submission 'nadamw' is listed twice"),
    (dict(num_studies=0), "--num_studies must be >= 1"),
    (dict(max_global_steps=0), "--max_global_steps must be >= 1"),
    (dict(api="tpu"), "--api must be one of"),
])
def test_bad_grid_options_are_errors(options, message):
  options = grid.GridOptions(**dict(dict(experiment_dir="/tmp/x",
                                         workloads=("teacher_student",)), **options))
  with pytest.raises(ValueError) as e:
    grid.plan(options)
  assert message in str(e.value)


def test_cli_errors_exit_2(tmp_path):
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", "--workloads=imagenet_resnet")
  assert result.returncode == 2
  assert "run_study: unknown workload 'imagenet_resnet'" in result.stderr


# ----------------------------------------------------------------------------
# When a trial is finished.


def _csv(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = sorted({k for r in rows for k in r})
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def test_trial_state(tmp_path):
  target = configs.Target("wer", validation=0.1, test=0.05, minimize=True)
  budget = grid.Budget(steps=None, runtime_sec=1000.0, target=target)
  trial = tmp_path / "trial_1"
  assert grid.trial_state(str(trial), budget) == (False, "not started")
  trial.mkdir()
  assert not grid.trial_state(str(trial), budget).finished

  def row(step, val, test, time=1.0):
    return {"global_step": step, "validation/wer": val, "test/wer": test,
            "accumulated_submission_time": time, "score": time}

  _csv(trial / "eval_measurements.csv", [row(100, 0.2, 0.2), row(200, 0.09, 0.2)])
  state = grid.trial_state(str(trial), budget)
  assert not state.finished and "stopped at step 200" in state.reason
  # The step budget, both targets (strictly), the runtime budget, the official end row.
  assert grid.trial_state(str(trial), budget._replace(steps=200)).finished
  _csv(trial / "eval_measurements.csv", [row(100, 0.09, 0.2), row(200, 0.2, 0.04)])
  assert "targets" in grid.trial_state(str(trial), budget).reason
  _csv(trial / "eval_measurements.csv", [row(100, 0.1, 0.05)])  # equal is not reached
  assert not grid.trial_state(str(trial), budget).finished
  _csv(trial / "eval_measurements.csv", [row(100, 0.2, 0.2, time=1000.0)])
  assert "runtime budget" in grid.trial_state(str(trial), budget).reason
  _csv(trial / "eval_measurements.csv", [row(100, 0.2, 0.2)])
  _csv(trial / "measurements.csv", [row(100, 0.2, 0.2), {"global_step": 150, "loss": 1.0}])
  assert not grid.trial_state(str(trial), budget).finished  # a submission's own row
  _csv(trial / "measurements.csv", [row(100, 0.2, 0.2), {"global_step": 100, "score": 1.0}])
  assert not grid.trial_state(str(trial), budget).finished  # the end row of a step cap
  _csv(trial / "measurements.csv", [row(100, 0.2, 0.2), {"global_step": 150, "score": 3.0}])
  assert "ran out of time at step 150" in grid.trial_state(str(trial), budget).reason


# ----------------------------------------------------------------------------
# Running grids.


def _fake_options(tmp_path, **kw):
  defaults = dict(experiment_dir=str(tmp_path / "exp"), submissions=("nadamw", "nadamw_lawa"),
                  workloads=("ogbg", "wmt"), num_studies=1, data_root=DATA_ROOT,
                  algoperf_dir=FAKE_ALGOPERF, python=sys.executable, max_global_steps=300)
  defaults.update(kw)
  return grid.GridOptions(**defaults)


def _calls(path):
  return open(path).read().splitlines() if os.path.exists(path) else []


def test_grid_resumes_and_survives_a_failing_trial(tmp_path, monkeypatch):
  calls = tmp_path / "calls.txt"
  monkeypatch.setenv("RUN_STUDY_FAKE_CALLS", str(calls))
  monkeypatch.setenv("RUN_STUDY_FAKE_FAIL", "ogbg:nadamw_lawa")
  options = _fake_options(tmp_path)
  runs = grid.plan(options)
  grid.check_checkout(runs, options)
  lines = []
  result = grid.run_grid(runs, report=lines.append)
  # One failure; the grid went on with the trials after it.
  assert [r.label for r in result.ran] == [
      "nadamw ogbg study_0 trial_1", "nadamw wmt study_0 trial_1",
      "nadamw_lawa wmt study_0 trial_1"]
  [(failed, error)] = result.failed
  assert failed.label == "nadamw_lawa ogbg study_0 trial_1" and error == "exit status 1"
  assert f"[2/4] nadamw_lawa ogbg study_0 trial_1: FAILED (exit status 1); log: " \
         f"{failed.log_path}" in lines
  assert "injected failure" in open(failed.log_path).read()
  assert "FAILED nadamw_lawa ogbg" in grid.summary(result)
  # The official layout, with the trial's hyperparameters.
  trial = layout.study_trial_dir(options.experiment_dir, "nadamw_lawa", 0, "wmt", 1)
  assert json.load(open(os.path.join(trial, "hparams.json"))) == configs.search_space(
      configs.load("wmt"), "nadamw_lawa", "jit")[0]

  # Again, without the failure: only the failed trial runs, from a clean directory.
  monkeypatch.delenv("RUN_STUDY_FAKE_FAIL")
  lines = []
  result = grid.run_grid(grid.plan(options), report=lines.append)
  assert result.ok and [r.label for r in result.ran] == ["nadamw_lawa ogbg study_0 trial_1"]
  assert len(result.skipped) == 3
  assert any(line.startswith(f"  removing {failed.trial_dirs[0]} (unfinished") for line in lines)
  assert "[1/4] nadamw ogbg study_0 trial_1: finished (reached the step budget (300 steps)); " \
         "skipped" in lines
  assert _calls(calls)[-1] == "nadamw_lawa ogbg study_0 trial_1"
  assert len(_calls(calls)) == 5
  with open(os.path.join(failed.trial_dirs[0], "eval_measurements.csv")) as f:
    assert [int(r["global_step"]) for r in csv.DictReader(f)] == [100, 200, 300]

  # Trials capped at 300 steps are not finished under a larger cap, or under none (then the
  # official runner's budget is time).
  for steps in (400, None):
    result = grid.run_grid(grid.plan(_fake_options(tmp_path, max_global_steps=steps)),
                           dry_run=True, report=lines.append)
    assert len(result.would_run) == 4 and len(_calls(calls)) == 5


def test_a_run_that_exits_0_unfinished_is_a_failure_and_the_cli_exits_1(tmp_path):
  env = {"RUN_STUDY_FAKE_QUIT_EARLY": "wmt"}
  result = run_cli(f"--experiment_dir={tmp_path}", "--workloads=wmt,ogbg",
                   "--submissions=nadamw", "--num_studies=1", f"--data_root={DATA_ROOT}",
                   f"--algoperf_dir={FAKE_ALGOPERF}", "--max_global_steps=300", env=env)
  assert result.returncode == 1, result.stdout + result.stderr
  assert ("[1/2] nadamw wmt study_0 trial_1: FAILED (exited 0, but trial_1 is not finished: "
          "stopped at step 100, before any of its stopping rules)") in result.stdout
  assert "[2/2] nadamw ogbg study_0 trial_1: done" in result.stdout
  assert "1 ran, 0 skipped (finished), 1 failed" in result.stdout


def test_a_checkout_with_the_other_api_is_refused(tmp_path):
  result = run_cli(f"--experiment_dir={tmp_path}", "--workloads=wmt", "--api=pmap",
                   f"--data_root={DATA_ROOT}", f"--algoperf_dir={FAKE_ALGOPERF}")
  assert result.returncode == 2
  assert "has the jit API, but --api=pmap" in result.stderr


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_one_run_study_per_directory_and_sigterm_stops_its_runner_whole(tmp_path):
  """A second run_study on a running grid is refused, naming the first one's pid; SIGTERM
  ends the first one and its runner's process group (the runner and what it started)."""
  hang = tmp_path / "hang"
  hang.mkdir()
  args = [f"--experiment_dir={tmp_path / 'exp'}", "--workloads=wmt", "--submissions=nadamw",
          "--num_studies=1", f"--data_root={DATA_ROOT}", f"--algoperf_dir={FAKE_ALGOPERF}",
          "--max_global_steps=300"]
  output = open(tmp_path / "run_study.log", "w")
  first = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, stdout=output,
                           stderr=subprocess.STDOUT, start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=REPO, RUN_STUDY_FAKE_HANG=str(hang)))
  pgids = {first.pid}
  try:
    process_groups.wait_for_files([hang / "runner.pid", hang / "child.pid"], proc=first)
    pgids.add(int((hang / "runner.pid").read_text()))
    second = run_cli(*args)
    assert second.returncode == 2, second.stdout + second.stderr
    assert (f"is in use by another process (pid {first.pid}, holding "
            f"{tmp_path / 'exp' / '.run_study' / 'lock'})") in second.stderr
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)  # a guard against a hang, not a measurement
    assert first.returncode == 128 + signal.SIGTERM
    assert "run_study: stopped by SIGTERM" in (tmp_path / "run_study.log").read_text()
    assert process_groups.survivors(pgids) == []
  finally:
    process_groups.kill_groups(pgids)
    output.close()


def test_embedded_grid_end_to_end(tmp_path):
  args = (f"--experiment_dir={tmp_path}", "--workloads=teacher_student",
          "--submissions=nadamw,nadamw_ema", "--num_studies=1", "--max_global_steps=200")
  result = run_cli(*args)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "2 ran, 0 skipped (finished), 0 failed" in result.stdout
  config = configs.load("teacher_student")
  for submission in ("nadamw", "nadamw_ema"):
    trial = layout.study_trial_dir(str(tmp_path), submission, 0, "teacher_student", 1)
    for name in ("hparams.json", "eval_measurements.csv", "flags_0.json", "meta_data_0.json"):
      assert os.path.isfile(os.path.join(trial, name)), name
    assert json.load(open(os.path.join(trial, "hparams.json"))) == configs.search_space(
        config, submission, "jit")[0]
    with open(os.path.join(trial, "eval_measurements.csv")) as f:
      rows = list(csv.DictReader(f))
    assert int(rows[-1]["global_step"]) == 200
    meta = json.load(open(os.path.join(trial, "meta_data_0.json")))
    assert meta["rng_seed"] == 1 and meta["api"] == "jit"
  # What scoring reads: both submissions, one study each (the log dir is no submission).
  experiment, _ = scoring.read_experiment(str(tmp_path))
  assert set(experiment.trials["teacher_student"]) == {"nadamw", "nadamw_ema"}
  # Resume: nothing left to run.
  again = run_cli(*args)
  assert again.returncode == 0
  assert "0 ran, 2 skipped (finished), 0 failed" in again.stdout
  assert "[2/2] nadamw_ema teacher_student study_0 trial_1: finished (reached the step " \
         "budget (200 steps)); skipped" in again.stdout


def test_embedded_study_scores_and_plots_what_its_logs_say(tmp_path):
  """run_study -> score -> plot on the embedded workload, checked against the CSV logs.

  A 200-step run does not reach the workload's target, so scoring is given a target the
  runs do reach (validation loss 1.60); the table must say what the CSVs say.
  """
  submissions = ("nadamw", "nadamw_lawa")
  result = run_cli(f"--experiment_dir={tmp_path}", "--workloads=teacher_student",
                   f"--submissions={','.join(submissions)}", "--num_studies=1",
                   "--max_global_steps=200")
  assert result.returncode == 0, result.stdout + result.stderr
  target = 1.60
  spec = scoring.workload_spec("teacher_student")._replace(target=target)
  scores = scoring.score_experiment(str(tmp_path), targets={"teacher_student": spec},
                                    use_algoperf="no")
  scores_file.write(scores, str(tmp_path / "scores.json"))
  scores = scores_file.load(str(tmp_path / "scores.json"))
  steps = {}
  for submission in submissions:
    trial = layout.study_trial_dir(str(tmp_path), submission, 0, "teacher_student", 1)
    with open(os.path.join(trial, "eval_measurements.csv")) as f:
      rows = list(csv.DictReader(f))
    losses = [float(r["validation/loss"]) for r in rows]
    hit = next(r for r in rows if float(r["validation/loss"]) < target)  # the workload's rule
    row = scores["results"]["teacher_student"][submission]
    assert row["median_steps_to_target"] == int(hit["global_step"])
    assert row["median_time_to_target"] == pytest.approx(
        float(hit["accumulated_submission_time"]))
    assert row["best_metric"]["mean"] == pytest.approx(min(losses))
    steps[submission] = int(hit["global_step"])
  lawa = scores["results"]["teacher_student"]["nadamw_lawa"]
  assert lawa["fraction_of_baseline_steps"]["nadamw"] == pytest.approx(
      steps["nadamw_lawa"] / steps["nadamw"])
  from weight_averaging.studies import plots  # pylint: disable=g-import-not-at-top
  figures = plots.all_figures(scores, [], str(tmp_path / "figures"))
  for name in ("fig1_validation_curves", "fig2_steps_to_target"):
    assert figures[name], name
    assert all(os.path.getsize(p) > 1000 for p in figures[name])
  assert figures["fig5_shampoo"] == []  # no Shampoo runs in this study

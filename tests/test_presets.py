"""run_study's presets: the paper's Section 6 grids as search spaces, their commands, bad input."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from weight_averaging import layout
from weight_averaging.algoperf_api import catalog
from weight_averaging.optimizers import common
from weight_averaging.runner import branch as branch_lib
from weight_averaging.studies import configs, grid, presets

REPO = configs.REPO
SCRIPT = os.path.join(REPO, "scripts", "run_study.py")
EMBEDDED = "teacher_student"
STEP_HINT = 2000
ETA = 0.01  # the embedded config's NadamW learning rate
WARMUP = 100  # int(0.05 * 2000): its warmup steps


def run_cli(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def variants(name, submission="nadamw", **kw):
  options = presets.check(presets.PresetOptions(name, **kw))
  return presets.variants(options, configs.load(EMBEDDED), submission, "jit")


def rates(point, last):
  """The point's learning rate at steps 0..last, as the optimizer's schedule gives it."""
  cfg = dict(kind=point["lr_schedule"], step_hint_factor=point["step_hint_factor"])
  if point["lr_end_factor"] is not None:
    cfg["end_factor"] = point["lr_end_factor"]
  if point["cooldown_fraction"] is not None:
    cfg.update(cooldown_fraction=point["cooldown_fraction"], wsd_decay=point["wsd_decay"])
  schedule = common.lr_schedule(point["learning_rate"], point["warmup_factor"], STEP_HINT, **cfg)
  return np.asarray(schedule(np.arange(last + 1)), dtype=np.float64)


def test_every_point_spells_out_the_schedule_with_the_same_names():
  for name in presets.PRESETS:
    for submission in presets.family(["nadamw"]):
      points = [v.point for v in variants(name, submission)]
      assert all(set(p) == set(points[0]) for p in points), (name, submission)
      assert set(presets.SCHEDULE_NAMES) <= set(points[0])


def test_lr_sweep_multiplies_the_configs_rate_alike_in_every_submission():
  by_sub = {s: variants("lr_sweep", s) for s in presets.family(["nadamw"])}
  assert list(by_sub) == ["nadamw", "nadamw_ema", "nadamw_lawa"]
  for submission, items in by_sub.items():
    assert [v.point["learning_rate"] for v in items] == pytest.approx(
        [ETA * f for f in (0.25, 0.5, 1, 2, 4)])
    base = configs.trial_hyperparameters(configs.load(EMBEDDED), submission, "jit")
    for v in items:  # only the rate and the (default) schedule's names change
      assert {k: x for k, x in v.point.items() if k != "learning_rate"
              and k not in presets.SCHEDULE_NAMES} == {
                  k: x for k, x in base.items() if k != "learning_rate"}
      assert v.point["lr_schedule"] == "cosine" and v.point["lr_end_factor"] == 0.0


def test_shorter_schedules_keep_the_warmup_and_reach_zero_at_their_horizon():
  items = variants("schedules")
  assert [v.point["step_hint_factor"] for v in items] == [0.25, 0.5, 0.75, 1.0]
  for v in items:
    horizon = round(v.point["step_hint_factor"] * STEP_HINT)
    lr = rates(v.point, STEP_HINT)
    # The closed form: eta * s / W in the warmup, eta at W, then cosine to 0 at the horizon.
    steps = np.arange(WARMUP)
    np.testing.assert_allclose(lr[:WARMUP], ETA * steps / WARMUP, rtol=1e-5, atol=1e-9)
    mid = (WARMUP + horizon) // 2
    expected_mid = 0.5 * ETA * (1 + math.cos(math.pi * (mid - WARMUP) / (horizon - WARMUP)))
    assert lr[WARMUP] == pytest.approx(ETA) and lr[mid] == pytest.approx(expected_mid, rel=1e-4)
    assert np.all(lr[horizon:] == 0.0) and lr[horizon - 1] > 0
  # The averaged submissions run the full cosine only.
  for submission in ("nadamw_ema", "nadamw_lawa"):
    [full] = variants("schedules", submission)
    assert full.point["step_hint_factor"] == 1.0 and full.point["lr_schedule"] == "cosine"


def test_annealing_to_zero_to_half_and_none():
  items = variants("annealing", "nadamw_lawa")
  assert [(v.point["lr_schedule"], v.point["lr_end_factor"]) for v in items] == [
      ("cosine", 0.0), ("cosine", 0.5), ("constant", None)]
  ends = [rates(v.point, STEP_HINT)[-1] for v in items]
  assert ends == pytest.approx([0.0, ETA / 2, ETA])


def test_cooldown_branches_start_from_the_trunk_where_their_decay_starts():
  items = variants("schedules", cooldown_branches=True)
  trunk, branches, full = items[0], items[1:-1], items[-1]
  assert trunk.point["lr_schedule"] == "constant" and trunk.branch is None
  cooldown = 200  # 0.1 of the step hint
  starts = [round(f * STEP_HINT) - cooldown for f in (0.25, 0.5, 0.75)]
  assert [v.branch for v in branches] == [(1, s) for s in starts]
  assert trunk.keep_steps == tuple(starts)
  trunk_lr = rates(trunk.point, STEP_HINT)
  for v, start in zip(branches, starts):
    lr = rates(v.point, STEP_HINT)
    assert np.array_equal(lr[:start + 1], trunk_lr[:start + 1])
    # Then linear to 0 over the cooldown: eta * (H - s) / C.
    horizon = start + cooldown
    s = np.arange(start, horizon + 1)
    np.testing.assert_allclose(lr[start:horizon + 1], ETA * (horizon - s) / cooldown,
                               rtol=1e-5, atol=1e-9)
    # The runner's own check accepts it.
    branch_lib.check_branch(branch_lib.Branch("trunk", start), trunk.point, v.point, "b",
                            STEP_HINT)
  assert full.point["lr_schedule"] == "cosine" and full.branch is None


def test_a_shampoo_family_runs_too():
  items = variants("lr_sweep", "shampoo_ema")
  assert items[2].point["learning_rate"] == pytest.approx(
      configs.load(EMBEDDED).optimizers["shampoo"].hyperparameters["learning_rate"])
  assert presets.family(["shampoo_lawa"]) == ("shampoo", "shampoo_ema", "shampoo_lawa")


def _plan(tmp_path, preset, **kw):
  return grid.plan(grid.GridOptions(
      experiment_dir=str(tmp_path), workloads=(EMBEDDED,), submissions=("nadamw",),
      num_studies=kw.pop("num_studies", 1), preset=presets.PresetOptions(preset, **kw)))


def test_the_runs_of_a_cooldown_grid(tmp_path):
  runs = _plan(tmp_path, "schedules", cooldown_branches=True)
  nadamw = [r for r in runs if r.submission == "nadamw"]
  assert [r.trials for r in nadamw] == [(1,), (2,), (3,), (4,), (5,)]
  flags = [dict(a[2:].split("=", 1) for a in r.argv if a.startswith("--") and "=" in a)
           for r in nadamw]
  assert flags[0]["checkpoint_steps"] == "300,800,1300"
  trunk_dir = layout.study_trial_dir(str(tmp_path), "nadamw", 0, EMBEDDED, 1)
  for f, step in zip(flags[1:4], (300, 800, 1300)):
    assert f["branch_from"] == os.path.abspath(trunk_dir) and f["branch_step"] == str(step)
  for i, f in enumerate(flags):
    assert (f["hparam_start_index"], f["hparam_end_index"]) == (str(i), str(i + 1))
    assert f["stop_at_target"] == "false" and f["num_tuning_trials"] == "5"
  # Averaged submissions: one run of one trial, no branching.
  ema = [r for r in runs if r.submission == "nadamw_ema"]
  assert len(ema) == 1 and not any("branch" in a for a in ema[0].argv)
  assert not ema[0].budget.stop_at_target


def test_a_dry_run_writes_the_search_spaces_and_the_description(tmp_path):
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", f"--workloads={EMBEDDED}",
                   "--preset=lr_sweep", "--num_studies=2", "--lr_factors=0.5,1")
  assert result.returncode == 0, result.stderr
  assert "6 to run, 0 skipped" in result.stdout
  description = grid.run_study_path(str(tmp_path), "search_spaces", "jit",
                                    f"{EMBEDDED}_lr_sweep.md")
  assert os.path.isfile(description) and description in result.stdout
  for submission in presets.family(["nadamw"]):
    path = grid.run_study_path(str(tmp_path), "search_spaces", "jit", submission,
                               f"{EMBEDDED}_lr_sweep.json")
    with open(path) as f:
      assert [p["learning_rate"] for p in json.load(f)] == pytest.approx([ETA / 2, ETA])


@pytest.mark.parametrize("options, message", [
    (dict(name="bogus"), "unknown --preset 'bogus': use one of lr_sweep, schedules, annealing"),
    (dict(name="schedules", schedule_fractions=(0.0,)),
     r"--schedule_fractions: 0.0 is outside \(0, 1\]"),
    (dict(name="schedules", schedule_fractions=(0.5, 1.5)),
     r"--schedule_fractions: 1.5 is outside \(0, 1\]"),
    (dict(name="annealing", end_factors=(1.5,)), r"--end_factors: 1.5 is outside \[0, 1\]"),
    (dict(name="annealing", end_factors=(-0.1,)), r"--end_factors: -0.1 is outside \[0, 1\]"),
    (dict(name="lr_sweep", lr_factors=(0.0,)), r"--lr_factors: 0.0 is outside \(0, inf\]"),
    (dict(name="schedules", cooldown_fraction=0.1),
     "--cooldown_fraction=0.1 is the length of the cooldowns of --cooldown_branches, and the "
     "cosine schedules have none"),
    (dict(name="lr_sweep", cooldown_fraction=0.1),
     "--cooldown_fraction belongs to --preset=schedules, not --preset=lr_sweep"),
    (dict(name="schedules", cooldown_branches=True, cooldown_fraction=0.3),
     "--cooldown_fraction=0.3: a cooldown of 600 steps does not fit after the 100-step "
     "warmup in the 500-step schedule of fraction 0.25"),
    (dict(name="schedules", schedule_fractions=(0.01,)),
     "--schedule_fractions: 0.01 makes a schedule of 20 steps, shorter than the warmup of "
     "100 steps"),
])
def test_bad_preset_options_name_the_flag_and_the_value(tmp_path, options, message):
  with pytest.raises(ValueError, match=message):
    _plan(tmp_path, options.pop("name"), **options)


def test_bad_preset_grids_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="unknown workload 'imagenet_resnet': .* has configs "
                                       "for criteo1tb, .*teacher_student"):
    grid.plan(grid.GridOptions(experiment_dir=str(tmp_path), workloads=("imagenet_resnet",),
                               preset=presets.PresetOptions("lr_sweep")))
  with pytest.raises(ValueError, match="--cooldown_branches needs the embedded runner"):
    grid.plan(grid.GridOptions(
        experiment_dir=str(tmp_path), workloads=("ogbg",), algoperf_dir="/x", data_root="/d",
        preset=presets.PresetOptions("schedules", cooldown_branches=True)))
  with pytest.raises(ValueError, match="--max_global_steps=500 ends the trunk at or before "
                                       "the branch step 800"):
    grid.plan(grid.GridOptions(
        experiment_dir=str(tmp_path), workloads=(EMBEDDED,), max_global_steps=500,
        preset=presets.PresetOptions("schedules", cooldown_branches=True)))
  with pytest.raises(ValueError, match="--search_space=all conflicts with --preset=annealing"):
    grid.plan(grid.GridOptions(experiment_dir=str(tmp_path), workloads=(EMBEDDED,),
                               search_space="all", preset=presets.PresetOptions("annealing")))


@pytest.mark.parametrize("args, message", [
    (("--preset=lr_sweep", "--search_space=all"),
     "--search_space=all conflicts with --preset=lr_sweep"),
    (("--lr_factors=1,2",), "--lr_factors belongs to a --preset; none is given"),
    (("--preset=schedules", "--schedule_fractions=0.5,x"),
     "--schedule_fractions must list numbers, got 0.5,x"),
    (("--preset=annealing", "--end_factors=2"), r"--end_factors: 2.0 is outside \[0, 1\]"),
])
def test_cli_refuses_conflicting_or_bad_preset_flags_with_exit_2(tmp_path, args, message):
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", f"--workloads={EMBEDDED}",
                   *args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert re.search(message, result.stderr), result.stderr


def test_cli_names_an_unknown_preset(tmp_path):
  result = run_cli("--dry_run", f"--experiment_dir={tmp_path}", "--preset=bogus")
  assert result.returncode != 0 and "--preset" in result.stderr and "bogus" in result.stderr


def test_a_tiny_preset_run_records_each_variant_and_resumes(tmp_path):
  args = (f"--experiment_dir={tmp_path}", f"--workloads={EMBEDDED}", "--preset=annealing",
          "--end_factors=0.5", "--num_studies=1", "--max_global_steps=40")
  result = run_cli(*args)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "3 ran, 0 skipped (finished), 0 failed" in result.stdout
  config = configs.load(EMBEDDED)
  for submission in presets.family(["nadamw"]):
    options = presets.check(presets.PresetOptions("annealing", end_factors=(0.5,)))
    expected = [v.point for v in presets.variants(options, config, submission, "jit")]
    for n, point in enumerate(expected, start=1):
      trial = layout.study_trial_dir(str(tmp_path), submission, 0, EMBEDDED, n)
      with open(os.path.join(trial, layout.HPARAMS_FILE)) as f:
        assert json.load(f) == point  # the trial's own record of its variant
      with open(layout.eval_file(trial)) as f:
        assert int(list(csv.DictReader(f))[-1]["global_step"]) == 40
  assert catalog.get(submission).averager == "lawa"
  again = run_cli(*args)
  assert again.returncode == 0 and "0 ran, 3 skipped (finished), 0 failed" in again.stdout


def test_every_flag_of_a_preset_run_exists_in_the_runner(tmp_path):
  from weight_averaging.studies import checkout
  with open(os.path.join(REPO, "weight_averaging", "runner", "__main__.py")) as f:
    defined = set(checkout._FLAG_DEFINITION.findall(f.read()))  # pylint: disable=protected-access
  for name in presets.PRESETS:
    kw = {"cooldown_branches": True} if name == "schedules" else {}
    for run in _plan(tmp_path, name, **kw):
      assert set(checkout.argv_flags(run.argv)) <= defined, run.label


def test_a_trial_that_started_with_another_point_is_refused_not_skipped(tmp_path):
  runs = _plan(tmp_path, "annealing")
  trial = runs[0].trial_dirs[1]
  os.makedirs(trial)
  with open(os.path.join(trial, layout.HPARAMS_FILE), "w") as f:
    json.dump(dict(runs[0].search_space[1], lr_end_factor=0.1), f)
  result = grid.run_grid(runs, dry_run=True, report=lambda line: None)
  [(run, error)] = result.failed
  assert run is runs[0] and len(result.would_run) == 2
  assert "holds another point than this grid's trial_2 (lr_end_factor: 0.1, the grid's " \
         "0.5)" in error

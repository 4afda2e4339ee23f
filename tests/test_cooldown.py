"""Cooldowns branched from a trunk's checkpoint equal the same schedule run from scratch."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from weight_averaging import layout
from weight_averaging.runner import branch as branch_lib
from weight_averaging.runner import checkpoints, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_HINT = 2000  # the embedded workload's
BASE = {"dropout_rate": 0.0, "label_smoothing": 0.0, "learning_rate": 0.01,
        "one_minus_beta1": 0.1, "beta2": 0.999, "weight_decay": 0.0}
# Trunk: warmup over int(0.01 * 2000) = 20 steps, then constant.
TRUNK = dict(BASE, warmup_factor=0.01, lr_schedule="constant", step_hint_factor=None,
             cooldown_fraction=None)
# Branch: horizon round(0.05 * 2000) = 100 with the same 20-step warmup (0.2 * 100), a
# linear cooldown over round(0.5 * 100) = 50 steps: the decay starts at step 50.
BRANCH = dict(BASE, warmup_factor=0.2, lr_schedule="wsd", step_hint_factor=0.05,
              cooldown_fraction=0.5)
METRICS = ("global_step", "validation/loss", "train/loss", "test/loss", "preemption_count")


def _run(tmp_path, api, trial, **kw):
  path = tmp_path / "space.json"
  path.write_text(json.dumps([TRUNK, BRANCH, BRANCH]))
  return experiment.run_experiment(
      workload_name="teacher_student",
      submission_path=os.path.join(REPO, "submissions", api, "nadamw", "submission.py"),
      tuning_search_space=str(path), experiment_dir=str(tmp_path), experiment_name="e",
      num_tuning_trials=3, rng_seed=3, api=api, max_global_steps=80, eval_every_steps=20,
      resume_last_run=True, stop_at_target=False, hparam_start_index=trial - 1,
      hparam_end_index=trial, **kw)[0]


def _rows(trial_dir):
  with open(layout.eval_file(trial_dir)) as f:
    return [{k: row[k] for k in METRICS} for row in csv.DictReader(f)]


def test_the_reference_schedules_part_where_the_branch_decays():
  """The closed forms: the trunk is constant after its warmup, the branch starts its
  linear decay at step 50 and reaches 0 at 100."""
  trunk = branch_lib.learning_rates(TRUNK, STEP_HINT, 120, "trunk")
  mine = branch_lib.learning_rates(BRANCH, STEP_HINT, 120, "branch")
  steps = np.arange(121)
  expected_trunk = np.where(steps < 20, 0.01 * steps / 20, 0.01)
  expected = np.where(steps < 50, expected_trunk, 0.01 * np.clip(100 - steps, 0, 50) / 50)
  np.testing.assert_allclose(trunk, expected_trunk, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-9)
  assert np.array_equal(trunk[:51], mine[:51]) and mine[51] < trunk[51]


@pytest.mark.parametrize("api", ["jit", "pmap"])
def test_a_branch_equals_the_same_wsd_run_from_scratch(tmp_path, api):
  if api == "pmap" and not hasattr(jax, "pmap"):
    pytest.skip("this jax has no pmap")
  root = layout.experiment_log_dir(str(tmp_path), "e", "teacher_student")
  trunk_dir = layout.trial_dir(root, 1)
  # The trunk keeps step 50, between two evals.
  _run(tmp_path, api, 1, checkpoint_steps=(50,))
  assert 50 in checkpoints.checkpoint_steps(trunk_dir)
  branched = _run(tmp_path, api, 2, branch=branch_lib.Branch(trunk_dir, 50))
  scratch = _run(tmp_path, api, 3)
  assert branched.global_step == scratch.global_step == 80
  for a, b in zip(jax.tree_util.tree_leaves(branched.params),
                  jax.tree_util.tree_leaves(scratch.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  rows = _rows(layout.trial_dir(root, 2))
  assert rows == _rows(layout.trial_dir(root, 3))
  assert [int(r["global_step"]) for r in rows] == [20, 40, 60, 80]
  # The rows before the branch are the trunk's own; after it, the cooldown's.
  trunk_rows = _rows(trunk_dir)
  assert rows[:2] == trunk_rows[:2] and rows[2] != trunk_rows[2]
  # The branch's record is its own full point.
  with open(os.path.join(layout.trial_dir(root, 2), layout.HPARAMS_FILE)) as f:
    assert json.load(f) == BRANCH


def test_a_branch_after_the_schedules_part_is_refused_naming_both_and_the_step(tmp_path):
  trunk_dir = tmp_path / "trial_1"
  trunk_dir.mkdir()
  (trunk_dir / layout.HPARAMS_FILE).write_text(json.dumps(TRUNK))
  trunk = branch_lib.trunk_point(str(trunk_dir))
  branch_lib.check_branch(branch_lib.Branch(str(trunk_dir), 50), trunk, BRANCH, "trial_2",
                          STEP_HINT)
  with pytest.raises(ValueError, match=r"branch trial_2 and its trunk .*trial_1 have "
                                       r"different learning rates at step 51"):
    branch_lib.check_branch(branch_lib.Branch(str(trunk_dir), 70), trunk, BRANCH, "trial_2",
                            STEP_HINT)
  # Another warmup parts them at step 1.
  with pytest.raises(ValueError, match="at step 1 "):
    branch_lib.check_branch(branch_lib.Branch(str(trunk_dir), 50), trunk,
                            dict(BRANCH, warmup_factor=0.1), "trial_2", STEP_HINT)
  with pytest.raises(ValueError, match=r"differ in 'beta2' \(0.99 vs the trunk's 0.999\)"):
    branch_lib.check_branch(branch_lib.Branch(str(trunk_dir), 50), trunk,
                            dict(BRANCH, beta2=0.99), "trial_2", STEP_HINT)


def test_a_missing_branch_step_names_the_steps_there_are(tmp_path):
  (tmp_path / "checkpoint_20").mkdir()
  (tmp_path / "runner_state_20.json").write_text("{}")
  with pytest.raises(ValueError, match=r"no checkpoint at step 50 \(it has \[20\]\).*"
                                       r"--checkpoint_steps=50"):
    checkpoints.restore_checkpoint(str(tmp_path), {}, step=50)


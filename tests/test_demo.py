"""The package's own submissions through the embedded runner, and the demo."""

import json
import os

import jax
import numpy as np
import pytest

from weight_averaging import runner, workloads
from weight_averaging import __main__ as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def submission(api, name):
  return runner.load_submission(os.path.join(REPO, "submissions", api, name, "submission.py"))


def hyperparameters(name):
  with open(os.path.join(REPO, "tuning_search_spaces", "embedded", f"{name}.json")) as f:
    return runner.as_hyperparameters(json.load(f)[0])


@pytest.mark.parametrize("api", ["jit", "pmap"])
def test_lawa_submission_resumes_to_the_uninterrupted_result(tmp_path, api):
  """Each API's checkpoint convention (pmap saves x[0], restores replicated)."""
  workload = workloads.get_workload(api=api)

  def run(name, steps, resume=False):
    return runner.run_trial(workload, submission(api, "nadamw_lawa"),
                            hyperparameters("nadamw_lawa"), log_dir=str(tmp_path / name),
                            rng_seed=1, api=api, max_global_steps=steps,
                            eval_every_steps=20, resume=resume, stop_at_target=False)

  whole = run("whole", 80)
  run("killed", 40)  # stopped after its checkpoint at step 40, as a kill would
  resumed = run("killed", 80, resume=True)
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                  jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = lambda r: [(e["global_step"], e["validation/loss"]) for e in r.eval_results]
  assert losses(resumed) == losses(whole)


def test_demo_writes_summary_runs_and_figures(tmp_path, capsys):
  names = ("nadamw", "shampoo", "shampoo_lawa")
  summary = cli.run_demo(str(tmp_path), seeds=1, progress=False, submissions=names[1:])
  out = capsys.readouterr().out
  assert "/ NadamW" in out and "/ no avg" in out
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["median"] == json.loads(json.dumps(summary["median"]))
  assert list(on_disk["runs"]) == list(names)  # NadamW always runs, first
  steps_of = lambda name: on_disk["runs"][name]["0"]["steps_to_target"]
  med = on_disk["median"]
  assert med["shampoo_lawa"]["ratio_to_base"] == steps_of("shampoo_lawa") / steps_of("shampoo")
  assert med["shampoo_lawa"]["ratio_to_nadamw"] == steps_of("shampoo_lawa") / steps_of("nadamw")
  assert med["shampoo"]["ratio_to_base"] == 1.0
  for name in names:
    run = on_disk["runs"][name]["0"]
    csv_path = os.path.join(run["log_dir"], "eval_measurements.csv")
    assert os.path.isfile(csv_path)
    assert run["log_dir"].endswith(os.path.join(name, "study_0", "teacher_student_jax",
                                                "trial_1"))
    steps = run["steps_to_target"]
    # The table's numbers are the CSV's: the first eval under the target.
    import csv
    with open(csv_path) as f:
      rows = list(csv.DictReader(f))
    first = next((int(r["global_step"]) for r in rows
                  if float(r["validation/loss"]) < on_disk["target"]["value"]), None)
    assert steps == first
  for figure in ("validation_curves.png", "steps_to_target.png"):
    assert (tmp_path / figure).stat().st_size > 10_000

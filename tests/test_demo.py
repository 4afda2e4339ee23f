"""The package's own submissions through the embedded runner, and the demo."""

import json
import os

import jax
import numpy as np
import pytest

from weight_averaging import runner, workloads
from weight_averaging import __main__ as cli
from weight_averaging.studies import scores_file

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
  # The table is the scored one.
  scores = scores_file.load(str(tmp_path / "scores.json"))
  for name in names:
    scored = scores["results"]["teacher_student"][name]
    assert med[name]["steps_to_target"] == scored["median_steps_to_target"]
    assert med[name]["submission_time_to_target"] == scored["median_time_to_target"]
  # The figures these runs allow: curves, and averaging on Shampoo (no NadamW + averaging ran).
  for figure in ("fig1_validation_curves.png", "fig5_shampoo.png"):
    assert (tmp_path / figure).stat().st_size > 10_000
  assert not (tmp_path / "fig2_steps_to_target.png").exists()


def _finished_trial(root, submission="nadamw"):
  """A study grid's finished trial: what the demo must not replace unasked."""
  trial = root / submission / "study_0" / "criteo1tb_jax" / "trial_1"
  trial.mkdir(parents=True)
  (trial / "eval_measurements.csv").write_text("global_step\n100\n")
  return trial


def test_demo_output_dir_new_or_its_own_is_replaced(tmp_path):
  fresh = tmp_path / "fresh"
  cli.prepare_output_dir(str(fresh))
  assert (fresh / cli.MARKER).is_file()
  # A second demo into it: the earlier demo's runs go (all submissions, so none is scored
  # with the new ones), the marker stays.
  old = _finished_trial(fresh, "shampoo")
  cli.prepare_output_dir(str(fresh))
  assert not old.exists() and (fresh / cli.MARKER).is_file()
  # A demo's output from before the marker: known by its summary.json.
  legacy = tmp_path / "legacy"
  old = _finished_trial(legacy)
  (legacy / "summary.json").write_text(json.dumps(
      {"workload": "teacher_student", "seeds": 3, "runs": {}, "median": {}}))
  cli.prepare_output_dir(str(legacy))
  assert not old.exists()


def test_demo_refuses_a_directory_it_did_not_write_unless_overwrite(tmp_path):
  trial = _finished_trial(tmp_path)
  (tmp_path / "summary.json").write_text("{}")   # not a demo's summary
  with pytest.raises(ValueError, match=r"--output_dir .* not empty .*--overwrite"):
    cli.prepare_output_dir(str(tmp_path))
  with pytest.raises(ValueError, match="--overwrite"):   # nothing trains first
    cli.run_demo(str(tmp_path), seeds=1, progress=False)
  assert (trial / "eval_measurements.csv").read_text() == "global_step\n100\n"
  assert not (tmp_path / cli.MARKER).exists()
  cli.prepare_output_dir(str(tmp_path), overwrite=True)
  assert not (tmp_path / "nadamw").exists() and (tmp_path / cli.MARKER).is_file()


def test_demo_runs_again_into_its_own_output(tmp_path, capsys):
  """`make demo` twice: the second run replaces the first, whose extra seed is not scored."""
  out = str(tmp_path / "demo_output")
  args = ["demo", f"--output_dir={out}", "--submissions", "nadamw", "--no_progress"]
  assert cli.main(args + ["--seeds=2"]) == 0
  assert cli.main(args + ["--seeds=1"]) == 0
  assert "error" not in capsys.readouterr().err
  scores = scores_file.load(os.path.join(out, "scores.json"))
  assert list(scores["results"]["teacher_student"]["nadamw"]["studies"]) == ["study_0"]
  assert sorted(os.listdir(os.path.join(out, "nadamw"))) == ["study_0"]

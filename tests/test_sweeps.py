"""Sweeps: trials read with their hparams.json, grouped by what varies; Table 2.

The experiments are written here through `layout`'s own paths and writers, as the study
presets write them: one trial per variant, full points in hparams.json. The expected
numbers are computed in the tests from the values written, with NumPy and by hand.
"""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from weight_averaging import layout
from weight_averaging.algoperf_api import schedules
from weight_averaging.studies import scoring, sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = "teacher_student"          # validation/loss, lower is better, target 1.472
TARGET = 1.472
STEPS = np.arange(100, 1100, 100)
with open(os.path.join(REPO, "tuning_search_spaces", "embedded", "nadamw.json")) as f:
  BASE = json.load(f)[0]              # a full NadamW point: learning_rate 0.01, warmup 0.05


def write_point(root, submission, study, trial, values, steps=STEPS, **hparams):
  """One trial (`study`, `trial`: numbers): hparams.json (the base point updated with `hparams`; ``None`` values are
  left out) and eval_measurements.csv with `values` at `steps`."""
  directory = layout.study_trial_dir(str(root), submission, study, WORKLOAD, trial)
  os.makedirs(directory, exist_ok=True)
  point = {k: v for k, v in dict(BASE, **hparams).items() if v is not None}
  with open(os.path.join(directory, layout.HPARAMS_FILE), "w") as f:
    json.dump(point, f)
  rows = [{"accumulated_eval_time": 1.0, "accumulated_logging_time": 0.0,
           layout.TIME_COLUMN: s / 10, layout.STEP_COLUMN: int(s), "preemption_count": 0,
           "score": s / 10, "total_duration": s / 10 + 1, "validation/loss": repr(float(v))}
          for s, v in zip(steps, values)]
  layout.write_eval_measurements(layout.eval_file(directory), rows)
  return directory


def first_hit(values, steps=STEPS):
  """Independent of scoring: the first step with loss < TARGET, inf if none."""
  for s, v in zip(steps, values):
    if v < TARGET:
      return float(s)
  return math.inf


def decaying(start, rate, floor, n=len(STEPS)):
  """A loss curve from `start` falling by `rate` an eval, not below `floor`."""
  return np.maximum(start - rate * np.arange(n), floor)


# The annealing preset's shape: three decays x {plain, LAWA}, two studies.
DECAYS = {"to 0": dict(lr_schedule="cosine", lr_end_factor=None),
          "to half": dict(lr_schedule="cosine", lr_end_factor=0.5),
          "none": dict(lr_schedule="constant", lr_end_factor=None)}
FLOORS = {("nadamw", "to 0"): 1.44, ("nadamw", "to half"): 1.46, ("nadamw", "none"): 1.49,
          ("nadamw_lawa", "to 0"): 1.438, ("nadamw_lawa", "to half"): 1.45,
          ("nadamw_lawa", "none"): 1.465}


def annealing_values(submission, decay, study):
  return decaying(1.60 + 0.01 * study, 0.02, FLOORS[(submission, decay)] + 0.002 * study)


@pytest.fixture(scope="module")
def annealing(tmp_path_factory):
  root = tmp_path_factory.mktemp("annealing")
  for study in (0, 1):
    for submission in ("nadamw", "nadamw_lawa"):
      for t, (decay, schedule) in enumerate(DECAYS.items(), start=1):
        write_point(root, submission, study, t,
                    annealing_values(submission, decay, study), **schedule,
                    lawa_k=(10 if submission == "nadamw_lawa" else None))
  return str(root)


def test_variants_are_named_by_every_schedule_setting():
  assert set(sweeps.NAMING) == {"learning_rate"} | set(schedules.ScheduleConfig._fields)


def test_settings_fill_the_schedule_defaults():
  settings = sweeps.settings_of({"learning_rate": 0.1, "lawa_k": 5})
  assert settings["learning_rate"] == 0.1 and settings["lawa_k"] == 5
  assert (settings["kind"], settings["step_hint_factor"], settings["end_factor"]) == (
      "cosine", 1.0, 0.0)
  assert "lr_schedule" not in settings and "lr_end_factor" not in settings


def test_what_varies_within_a_study_makes_the_variant(annealing):
  sweep = sweeps.read_sweep(annealing)
  assert sweep.varying[WORKLOAD] == ("kind", "end_factor")
  labels = {sweeps.variant_label(sweeps.variant(sweep, p)) for p in sweep.points[WORKLOAD]}
  # 'constant' has no end of a decay: its variant does not show one.
  assert labels == {"lr_schedule=cosine, lr_end_factor=0",
                    "lr_schedule=cosine, lr_end_factor=0.5", "lr_schedule=constant"}
  keys = list(sweeps.series(sweep, WORKLOAD))
  assert [s for s, _ in keys] == ["nadamw"] * 3 + ["nadamw_lawa"] * 3
  assert all(len(studies) == 2 for studies in sweeps.series(sweep, WORKLOAD).values())


def test_a_setting_that_changes_only_between_studies_is_no_variant(tmp_path):
  for study in (0, 1):
    for t, lr in enumerate((0.01, 0.03), start=1):
      write_point(tmp_path, "nadamw", study, t, decaying(1.6, 0.02, 1.4),
                  learning_rate=lr, data_seed=study)
  sweep = sweeps.read_sweep(str(tmp_path))
  assert sweep.varying[WORKLOAD] == ("learning_rate",)
  assert len(sweeps.series(sweep, WORKLOAD, without=("learning_rate",))) == 1


def test_table2_is_the_mean_and_std_of_each_studys_best(annealing, tmp_path):
  every = sweeps.table2(sweeps.read_sweep(annealing))
  assert [r["variant"] for r in every].count(sweeps.ALL_TRIALS) == 2
  rows = [r for r in every if r["variant"] != sweeps.ALL_TRIALS]
  assert len(rows) == 6
  for row in rows:
    submission = row["submission"]
    decay = {"lr_schedule=cosine, lr_end_factor=0": "to 0",
             "lr_schedule=cosine, lr_end_factor=0.5": "to half",
             "lr_schedule=constant": "none"}[row["variant"]]
    best = [annealing_values(submission, decay, study).min() for study in (0, 1)]
    assert row["best_per_study"] == pytest.approx(best)
    assert row["best_mean"] == pytest.approx(np.mean(best))
    assert row["best_std"] == pytest.approx(np.std(best))   # population std, as scoring's
  # the row of all trials is scoring's own best metric per submission
  scores = scoring.score_experiment(annealing, use_algoperf="no")["results"][WORKLOAD]
  for row in (r for r in every if r["variant"] == sweeps.ALL_TRIALS):
    scored = scores[row["submission"]]["best_metric"]
    assert row["best_per_study"] == pytest.approx(scored["per_study"])
    assert (row["best_mean"], row["best_std"]) == pytest.approx((scored["mean"], scored["std"]))
    assert row["best_per_study"] == pytest.approx(
        [min(r["best_per_study"][i] for r in rows if r["submission"] == row["submission"])
         for i in (0, 1)])
  path = str(tmp_path / "t2.csv")
  sweeps.write_table2_csv(every, path)
  with open(path) as f:
    read = list(csv.DictReader(f))
  assert [r["variant"] for r in read] == [r["variant"] for r in every]
  assert [float(r["best_mean"]) for r in read] == pytest.approx([r["best_mean"] for r in every])
  markdown = sweeps.table2_markdown(every)
  assert markdown.splitlines()[0] == "| submission | variant | teacher_student loss↓ |"
  constant = next(r for r in rows if r["submission"] == "nadamw_lawa"
                  and r["variant"] == "lr_schedule=constant")
  assert f"| NadamW + LAWA | lr_schedule=constant | {constant['best_mean']:.5g} ± " in markdown
  assert "| NadamW + LAWA | all trials | " in markdown


def test_bad_hparams_are_errors_naming_the_file_and_the_hyperparameter(tmp_path):
  d = write_point(tmp_path, "nadamw", 0, 1, decaying(1.6, 0.02, 1.4),
                  lr_schedule="cosine_restarts")
  with pytest.raises(ValueError, match=r"trial_1: .*lr_schedule.*cosine_restarts"):
    sweeps.read_sweep(str(tmp_path))
  with open(os.path.join(d, layout.HPARAMS_FILE), "w") as f:
    f.write('{"learning_rate": 0.1')
  with pytest.raises(ValueError, match=r"hparams.json: not valid JSON"):
    sweeps.read_sweep(str(tmp_path))
  with open(os.path.join(d, layout.HPARAMS_FILE), "w") as f:
    f.write("[0.1]")
  with pytest.raises(ValueError, match=r"hparams.json: not a JSON object"):
    sweeps.read_sweep(str(tmp_path))


def test_trials_without_hparams_have_the_default_schedule(tmp_path):
  d = write_point(tmp_path, "nadamw", 0, 1, decaying(1.6, 0.02, 1.4))
  os.remove(os.path.join(d, layout.HPARAMS_FILE))
  sweep = sweeps.read_sweep(str(tmp_path))
  (point,) = sweep.points[WORKLOAD]
  assert point.hparams is None and point.settings["kind"] == "cosine"
  assert sweep.varying[WORKLOAD] == ()
  (row,) = sweeps.table2(sweep)
  assert row["variant"] == "" and row["best_mean"] == pytest.approx(1.42)


def test_score_cli_prints_table2_and_writes_its_csv(annealing, tmp_path):
  out_csv = str(tmp_path / "s.csv")
  proc = subprocess.run(
      [sys.executable, os.path.join("scripts", "score.py"), f"--experiment_dir={annealing}",
       f"--output_json={tmp_path / 's.json'}", f"--output_csv={out_csv}", "--use_algoperf=no"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| submission | variant | teacher_student loss↓ |" in proc.stdout
  with open(str(tmp_path / "s_table2.csv")) as f:
    assert len(list(csv.DictReader(f))) == 8


def test_a_setting_derived_from_another_does_not_name_the_variant(tmp_path):
  """As the schedules preset writes them: shorter cosines keep the full run's warmup steps
  through a rescaled warmup_factor, and every schedule name is spelled out (null: n/a)."""
  for study in (0, 1):
    for t, factor in enumerate((0.25, 0.5, 1.0), start=1):
      write_point(tmp_path, "nadamw", study, t, decaying(1.6, 0.02, 1.4),
                  warmup_factor=0.05 / factor, lr_schedule="cosine", step_hint_factor=factor,
                  lr_end_factor=0.0, cooldown_fraction=None, wsd_decay=None)
  sweep = sweeps.read_sweep(str(tmp_path))
  assert sweep.varying[WORKLOAD] == ("step_hint_factor",)
  assert [sweeps.variant_label(v) for _, v in sweeps.series(sweep, WORKLOAD)] == [
      "step_hint_factor=0.25", "step_hint_factor=0.5", "step_hint_factor=1"]

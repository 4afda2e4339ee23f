"""The figures: drawn from scored fixtures, with the values the scores hold."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

from weight_averaging.studies import plots, scores_file, scoring

import test_scoring  # the hand-built experiment fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# teacher_student runs: per submission, the validation loss at steps 100..600 (target 1.472).
CURVES = {
    "nadamw": [1.60, 1.55, 1.50, 1.48, 1.471, 1.46],      # hits at 500
    "nadamw_ema": [1.58, 1.52, 1.48, 1.470, 1.46, 1.45],  # 400 -> 0.8
    "nadamw_lawa": [1.57, 1.50, 1.471, 1.46, 1.45, 1.44],  # 300 -> 0.6
    "shampoo": [1.55, 1.50, 1.48, 1.471, 1.46, 1.45],     # 400 -> 0.8 of NadamW
    "shampoo_lawa": [1.52, 1.49, 1.470, 1.46, 1.45, 1.44],  # 300 -> 0.75 of Shampoo
}


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
  root = tmp_path_factory.mktemp("experiments")
  for sub, values in CURVES.items():
    for study in ("study_0", "study_1"):
      test_scoring.write_trial(root, sub, study, "teacher_student", "trial_1", 0, values)
  path = str(root / "scores.json")
  scores_file.write(scoring.score_experiment(str(root), use_algoperf="no"), path)
  return scores_file.load(path)


def _bars(fig):
  ax = fig.axes[0]
  return {p.get_label(): p.get_height() for p in ax.patches if not p.get_label().startswith("_")}


def _heights(fig):
  return [round(p.get_height(), 6) for p in fig.axes[0].patches]


def test_steps_to_target_bars_are_the_scored_fractions(scores, tmp_path, captured):
  paths = plots.steps_to_target(scores, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["fig2_steps_to_target.png",
                                                  "fig2_steps_to_target.pdf"]
  assert all(os.path.getsize(p) > 1000 for p in paths)
  assert _heights(captured["fig2_steps_to_target"]) == [0.8, 0.6]  # 400/500, 300/500


def test_shampoo_figure_compares_to_shampoo_and_nadamw(scores, tmp_path, captured):
  plots.shampoo(scores, str(tmp_path))
  # Shampoo / NadamW = 400/500, Shampoo + LAWA / Shampoo = 300/400.
  assert _heights(captured["fig5_shampoo"]) == [0.8, 0.75]


def test_validation_curves_are_the_fastest_trials(scores, tmp_path, captured):
  plots.validation_curves(scores, str(tmp_path))
  ax = captured["fig1_validation_curves"].axes[0]
  lines = [l for l in ax.get_lines() if len(l.get_xdata()) > 2]
  assert len(lines) == 2 * len(CURVES)  # two studies each
  for line in lines:
    assert list(line.get_xdata()) == list(test_scoring.STEPS)
  ys = sorted(tuple(line.get_ydata()) for line in lines)
  assert ys == sorted(tuple(v) for v in CURVES.values() for _ in range(2))


OFFLINE = {
    "format": "weight_averaging.offline/1", "workload": "teacher_student",
    "submission": "nadamw", "snapshot_every": 10, "step_hint": 2000,
    "baseline": {"steps_to_target": 1000},
    "grid": [
        {"scheme": "lawa", "every": 10, "k": 5, "beta": None, "window": 50,
         "steps_to_target": 900},
        {"scheme": "lawa", "every": 20, "k": 5, "beta": None, "window": 100,
         "steps_to_target": 800},
        {"scheme": "lawa", "every": 10, "k": 10, "beta": None, "window": 100,
         "steps_to_target": None},
        {"scheme": "ema", "every": 10, "k": None, "beta": 0.9, "window": 100,
         "steps_to_target": 700},
    ]}


def test_offline_heatmaps_hold_the_relative_steps(tmp_path, captured):
  paths = plots.offline_heatmaps(OFFLINE, str(tmp_path))
  assert paths and all(os.path.getsize(p) > 1000 for p in paths)
  fig = captured["fig10_11_heatmaps_teacher_student"]
  lawa = np.asarray(fig.axes[0].images[0].get_array())
  # rows k = (5, 10), columns every = (10, 20); a miss is NaN (drawn as "miss").
  np.testing.assert_allclose(lawa, [[0.9, 0.8], [np.nan, np.nan]])
  ema = np.asarray(fig.axes[1].images[0].get_array())
  np.testing.assert_allclose(ema, [[0.7]])


def test_window_vs_speedup_plots_fraction_of_step_hint(tmp_path, captured):
  plots.window_vs_speedup([OFFLINE], str(tmp_path))
  ax = captured["fig3_window_vs_speedup"].axes[0]
  points = sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())
  assert points == sorted([(0.025, 0.9), (0.05, 0.8), (0.05, 0.7)])


def test_figures_without_their_runs_are_skipped(scores, tmp_path):
  nadamw_only = dict(scores, submissions=["nadamw"],
                     results={w: {"nadamw": r["nadamw"]} for w, r in scores["results"].items()})
  assert plots.steps_to_target(nadamw_only, str(tmp_path)) == []
  assert plots.shampoo(nadamw_only, str(tmp_path)) == []
  assert plots.window_vs_speedup([], str(tmp_path)) == []


def _all_missed(scores):
  """`scores` as if no submission had reached the target: no fraction of a base."""
  missed = copy.deepcopy(scores)
  for by_sub in missed["results"].values():
    for r in by_sub.values():
      r["fraction_of_baseline_steps"] = {b: None for b in r["fraction_of_baseline_steps"]}
  return missed


def test_a_figure_of_misses_only_is_not_drawn_and_says_why(scores, tmp_path):
  missed = _all_missed(scores)
  for figure in (plots.steps_to_target, plots.shampoo):
    paths, why = plots.attempt(figure, missed, str(tmp_path))
    assert paths == [] and "every bar would be a miss" in why
    assert figure(missed, str(tmp_path)) == []
  assert os.listdir(tmp_path) == []   # no empty frame on disk


def test_validation_curves_draw_only_workloads_with_a_curve(scores, tmp_path, captured):
  no_curves = copy.deepcopy(scores)
  for by_sub in no_curves["results"].values():
    for r in by_sub.values():
      for study in r["studies"].values():
        study["curve"]["metric"] = [None] * len(study["curve"]["metric"])
  paths, why = plots.attempt(plots.validation_curves, no_curves, str(tmp_path))
  assert paths == [] and "no validation curve" in why
  # a second workload without curves gets no panel: one axes, teacher_student's
  two = copy.deepcopy(scores)
  two["results"]["other"] = no_curves["results"]["teacher_student"]
  two["workloads"]["other"] = scores["workloads"]["teacher_student"]
  plots.validation_curves(two, str(tmp_path))
  axes = [ax for ax in captured["fig1_validation_curves"].axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == ["teacher_student"]


def test_offline_figures_without_a_hit_are_not_drawn(tmp_path):
  no_base = dict(OFFLINE, baseline={"steps_to_target": None})
  assert "without averaging never reached" in plots.attempt(plots.offline_heatmaps, no_base,
                                                            str(tmp_path))[1]
  no_hit = dict(OFFLINE, grid=[dict(p, steps_to_target=None) for p in OFFLINE["grid"]])
  assert "every cell would be a miss" in plots.attempt(plots.offline_heatmaps, no_hit,
                                                       str(tmp_path))[1]
  assert "missed the target" in plots.attempt(plots.window_vs_speedup, [no_base, no_hit],
                                              str(tmp_path))[1]
  skipped = {}
  figures = plots.all_figures(None, [no_hit], str(tmp_path), skipped)
  assert figures == {"fig3_window_vs_speedup": [], "fig10_11_heatmaps_teacher_student": []}
  assert set(skipped) == set(figures)
  assert os.listdir(tmp_path) == []


def test_cli_says_which_figures_it_skipped_and_why(scores, tmp_path):
  path = tmp_path / "missed.json"
  scores_file.write(_all_missed(scores), str(path))
  out = tmp_path / "figs"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "plot.py"), f"--scores={path}",
       f"--output_dir={out}"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert any(l.startswith("fig2_steps_to_target: skipped, not drawn: no submission and its base")
             for l in lines), lines
  assert sorted(os.listdir(out)) == ["fig1_validation_curves.pdf", "fig1_validation_curves.png"]


def test_cli(scores, tmp_path):
  scores_path = tmp_path / "scores.json"
  scores_file.write(scores, str(scores_path))
  offline_path = tmp_path / "offline.json"
  offline_path.write_text(__import__("json").dumps(OFFLINE))
  out = tmp_path / "figs"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "plot.py"), f"--scores={scores_path}",
       f"--offline={offline_path}", f"--output_dir={out}"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = sorted(os.listdir(out))
  for name in ("fig1_validation_curves", "fig2_steps_to_target", "fig3_window_vs_speedup",
               "fig5_shampoo", "fig10_11_heatmaps_teacher_student"):
    assert f"{name}.png" in written and f"{name}.pdf" in written, written
  bad = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "plot.py"), f"--offline={scores_path}",
       f"--output_dir={out}"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert bad.returncode != 0 and "not an offline-averaging results file" in bad.stderr

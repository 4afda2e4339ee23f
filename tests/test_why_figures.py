"""The Section 6 figures (Fig. 4, 6, 7a/12, 7b/8): what each draws, pulled back out of its
matplotlib artists, equals what the eval CSVs and the hyperparameters say, computed here
independently (first eval under the target, means over studies, the schedule's closed form)
and, where `scoring` scores the same trials, the scored values."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from weight_averaging.studies import plots, scoring, sweeps, why_plots

import test_scoring  # an experiment without hparams.json
import test_sweeps
from test_sweeps import STEPS, WORKLOAD, decaying, first_hit, write_point

REPO = test_sweeps.REPO
LRS = (0.003, 0.01, 0.03, 0.1)
SUBMISSIONS = ("nadamw", "nadamw_ema", "nadamw_lawa")
LABELS = {"nadamw": "NadamW", "nadamw_ema": "NadamW + EMA", "nadamw_lawa": "NadamW + LAWA"}


def lr_values(submission, lr, study):
  """0.1 never reaches the target; NadamW at 0.03 misses in study 2 only."""
  floor = {0.003: 1.468, 0.01: 1.45, 0.03: 1.46, 0.1: 1.50}[lr]
  if (submission, lr, study) == ("nadamw", 0.03, 2):
    floor = 1.48
  speed = {"nadamw": 0.0, "nadamw_ema": 0.006, "nadamw_lawa": 0.004}[submission]
  return decaying(1.56 + 0.004 * study, 0.012 + speed + 0.02 * lr, floor)


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("lr_sweep")
  for study in range(3):
    for submission in SUBMISSIONS:
      for t, lr in enumerate(LRS, start=1):
        write_point(root, submission, study, t, lr_values(submission, lr, study),
                    learning_rate=lr)
  return str(root)


FACTORS = (0.25, 0.5, 1.0)


def schedule_values(submission, factor, study):
  return decaying(1.58 - 0.003 * study, 0.01 / factor ** 0.5, 1.44 + 0.01 * factor)


@pytest.fixture(scope="module")
def schedules(tmp_path_factory):
  root = tmp_path_factory.mktemp("schedules")
  for study in range(2):
    for t, factor in enumerate(FACTORS, start=1):
      write_point(root, "nadamw", study, t, schedule_values("nadamw", factor, study),
                  step_hint_factor=factor)
    write_point(root, "nadamw_lawa", study, 1, schedule_values("nadamw_lawa", 1.0, study),
                step_hint_factor=1.0, lawa_k=10)
  return str(root)


def _bars(ax, label):
  """``{x: (low, high)}`` of the min-max bars drawn for the series `label`."""
  (bars,) = [c for c in ax.collections if c.get_label() == f"_{label}: min-max"]
  return {float(seg[0][0]): tuple(sorted((float(seg[0][1]), float(seg[1][1]))))
          for seg in bars.get_segments()}


def _lines(ax):
  return {l.get_label(): l for l in ax.get_lines() if not l.get_label().startswith("_")}


def test_fig4_steps_vs_lr_is_the_mean_of_each_studys_first_hit(lr_sweep, tmp_path, captured):
  paths = why_plots.steps_vs_lr(sweeps.read_sweep(lr_sweep), str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["fig4_steps_vs_lr.png", "fig4_steps_vs_lr.pdf"]
  ax = captured["fig4_steps_vs_lr"].axes[0]
  lines = _lines(ax)
  scores = scoring.score_experiment(lr_sweep, use_algoperf="no")["results"][WORKLOAD]
  misses = {tuple(map(float, xy)) for c in ax.collections if c.get_label().endswith("missed")
            for xy in c.get_offsets()}
  miss_y = {y for _, y in misses}
  assert len(miss_y) == 1
  for submission in SUBMISSIONS:
    per_lr = {lr: [first_hit(lr_values(submission, lr, study)) for study in range(3)]
              for lr in LRS}
    # the scored values: each trial's steps to target in the scores (trial t is LRS[t-1])
    for study in range(3):
      trials = scores[submission]["studies"][f"study_{study}"]["trials"]
      assert [trials[f"trial_{t}"]["steps_to_target"] for t in range(1, 5)] == [
          None if math.isinf(per_lr[lr][study]) else per_lr[lr][study] for lr in LRS]
    hit_lrs = [lr for lr in LRS if any(math.isfinite(v) for v in per_lr[lr])]
    line = lines[LABELS[submission]]
    np.testing.assert_allclose(line.get_xdata(), hit_lrs)
    np.testing.assert_allclose(line.get_ydata(), [
        np.mean([v for v in per_lr[lr] if math.isfinite(v)]) for lr in hit_lrs])
    missed = {lr for lr in LRS if any(math.isinf(v) for v in per_lr[lr])}
    assert _bars(ax, LABELS[submission]) == {   # steps: exact
        lr: (min(v for v in per_lr[lr] if math.isfinite(v)),
             max(v for v in per_lr[lr] if math.isfinite(v))) for lr in hit_lrs}
    drawn_missed = {float(xy[0]) for c in ax.collections
                    if c.get_label() == f"{LABELS[submission]}: missed" for xy in c.get_offsets()}
    assert drawn_missed == missed
  assert {x for x, _ in misses} == {0.03, 0.1} and next(iter(miss_y)) > max(
      v for s in SUBMISSIONS for lr in LRS for study in range(3)
      for v in [first_hit(lr_values(s, lr, study))] if math.isfinite(v))
  # NadamW at 0.03: 2 of 3 studies hit, the min-max bar spans them, "1/3" missed is written
  values = why_plots.steps_vs_lr_values(sweeps.read_sweep(lr_sweep))[WORKLOAD]
  spread = values[("nadamw", ())][0.03]
  hits = [first_hit(lr_values("nadamw", 0.03, s)) for s in range(2)]
  assert (spread.misses, spread.low, spread.high) == (1, min(hits), max(hits))
  assert "1/3" in [t.get_text() for t in ax.texts]


def test_fig6_best_vs_lr_is_the_mean_of_each_studys_best(lr_sweep, tmp_path, captured):
  why_plots.best_vs_lr(sweeps.read_sweep(lr_sweep), str(tmp_path))
  ax = captured["fig6_best_vs_lr"].axes[0]
  lines = _lines(ax)
  assert lines["target"].get_ydata()[0] == pytest.approx(test_sweeps.TARGET)
  for submission in SUBMISSIONS:
    np.testing.assert_allclose(lines[LABELS[submission]].get_ydata(), [
        np.mean([lr_values(submission, lr, study).min() for study in range(3)]) for lr in LRS])
    bars = _bars(ax, LABELS[submission])
    for lr in LRS:
      best = [lr_values(submission, lr, study).min() for study in range(3)]
      assert bars[lr] == pytest.approx((min(best), max(best)))


def _cosine(lr, warmup_factor, step_hint, factor, steps):
  """The closed form: warmup over int(w * H), cosine to 0 at H = round(f * T), then 0."""
  horizon = round(factor * step_hint)
  warmup = int(warmup_factor * horizon)
  out = []
  for s in steps:
    if s < warmup:
      out.append(lr * s / warmup)
    else:
      decay = max(horizon - warmup, 1)
      out.append(0.5 * lr * (1 + math.cos(math.pi * min(s - warmup, decay) / decay)))
  return np.array(out)


def test_fig7a_curves_are_means_over_studies_and_each_schedule_is_drawn_above(
    schedules, tmp_path, captured):
  why_plots.schedules(sweeps.read_sweep(schedules), str(tmp_path))
  lr_ax, curve_ax = captured["fig7a_12_schedules"].axes
  curves, rates = _lines(curve_ax), _lines(lr_ax)
  step_hint = scoring.workload_spec(WORKLOAD).step_hint
  series = [("nadamw", f) for f in FACTORS] + [("nadamw_lawa", 1.0)]
  for submission, factor in series:
    label = f"{LABELS[submission]} (step_hint_factor={factor:g})"
    np.testing.assert_allclose(curves[label].get_xdata(), STEPS)
    np.testing.assert_allclose(curves[label].get_ydata(), np.mean(
        [schedule_values(submission, factor, study) for study in range(2)], axis=0))
    steps = np.arange(STEPS[-1] + 1)
    np.testing.assert_allclose(rates[label].get_xdata(), steps)
    np.testing.assert_allclose(rates[label].get_ydata(), _cosine(
        test_sweeps.BASE["learning_rate"], test_sweeps.BASE["warmup_factor"], step_hint,
        factor, steps), rtol=1e-5, atol=1e-9)
  # the shortest schedule has ended at a quarter of the step hint: rate 0 from there
  assert rates["NadamW (step_hint_factor=0.25)"].get_ydata()[step_hint // 4:].max() == 0.0


def test_fig7b_decay_times_averaging_with_the_target(tmp_path, captured):
  root = tmp_path / "exp"
  for study in (0, 1):
    for submission in ("nadamw", "nadamw_lawa"):
      for t, schedule in enumerate(test_sweeps.DECAYS.values(), start=1):
        write_point(root, submission, study, t,
                    test_sweeps.annealing_values(submission, list(test_sweeps.DECAYS)[t - 1],
                                                 study), **schedule)
  why_plots.annealing(sweeps.read_sweep(str(root)), str(tmp_path / "figs"))
  ax = captured["fig7b_8_annealing"].axes[0]
  lines = _lines(ax)
  assert lines["target"].get_ydata()[0] == pytest.approx(test_sweeps.TARGET)
  names = {"to 0": "lr_schedule=cosine, lr_end_factor=0",
           "to half": "lr_schedule=cosine, lr_end_factor=0.5", "none": "lr_schedule=constant"}
  for submission in ("nadamw", "nadamw_lawa"):
    for decay, name in names.items():
      line = lines[f"{LABELS[submission]} ({name})"]
      np.testing.assert_allclose(line.get_ydata(), np.mean(
          [test_sweeps.annealing_values(submission, decay, s) for s in (0, 1)], axis=0))
      assert line.get_linestyle() == ("-" if submission == "nadamw" else ":")
  # one colour per decay, shared with and without averaging
  assert (lines["NadamW (lr_schedule=constant)"].get_color()
          == lines["NadamW + LAWA (lr_schedule=constant)"].get_color())


def test_a_curve_is_averaged_on_the_steps_every_study_has(tmp_path):
  write_point(tmp_path, "nadamw", 0, 1, [1.6, 1.5, 1.4], steps=[100, 200, 300], lr_end_factor=0.5)
  write_point(tmp_path, "nadamw", 0, 2, [1.6, 1.5, 1.4], steps=[100, 200, 300])
  write_point(tmp_path, "nadamw", 1, 1, [1.7, 1.45], steps=[100, 300], lr_end_factor=0.5)
  write_point(tmp_path, "nadamw", 1, 2, [1.7, 1.45], steps=[100, 300])
  sweep = sweeps.read_sweep(str(tmp_path))
  values = why_plots.curves_values(sweep, sweeps.DECAY_SETTINGS, "annealing")[WORKLOAD]
  steps, mean = values[("nadamw", (("end_factor", 0.5),))]
  np.testing.assert_allclose(steps, [100, 300])
  np.testing.assert_allclose(mean, [1.65, 1.425])


def test_figures_the_trials_do_not_support_are_skipped_and_say_why(tmp_path):
  root = test_scoring.write_fixture(tmp_path / "exp")   # no hparams.json: nothing varies
  skipped = {}
  figures = why_plots.all_figures(sweeps.read_sweep(root), str(tmp_path / "figs"), skipped)
  assert figures == {name: [] for name, _ in why_plots.FIGURES}
  assert "learning_rate" in skipped["fig4_steps_vs_lr"] and "lr_sweep" in skipped[
      "fig4_steps_vs_lr"]
  assert "step_hint_factor or cooldown_fraction" in skipped["fig7a_12_schedules"]
  assert "lr_schedule or lr_end_factor" in skipped["fig7b_8_annealing"]
  assert not os.path.exists(tmp_path / "figs")


def test_an_lr_sweep_that_never_hits_is_not_drawn(tmp_path):
  for t, lr in enumerate((0.01, 0.1), start=1):
    write_point(tmp_path, "nadamw", 0, t, decaying(1.6, 0.01, 1.5), learning_rate=lr)
  sweep = sweeps.read_sweep(str(tmp_path))
  paths, why = plots.attempt(why_plots.steps_vs_lr, sweep, str(tmp_path / "figs"))
  assert paths == [] and "every point would be a miss" in why
  assert plots.attempt(why_plots.best_vs_lr, sweep, str(tmp_path / "figs"))[1] is None


def test_cli_draws_them_from_the_scored_experiment(lr_sweep, tmp_path):
  scores = tmp_path / "scores.json"
  score = subprocess.run(
      [sys.executable, os.path.join("scripts", "score.py"), f"--experiment_dir={lr_sweep}",
       f"--output_json={scores}", f"--output_csv={tmp_path / 'scores.csv'}",
       "--use_algoperf=no"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert score.returncode == 0, score.stderr[-3000:]
  out = tmp_path / "figs"
  proc = subprocess.run(
      [sys.executable, os.path.join("scripts", "plot.py"), f"--scores={scores}",
       f"--output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = sorted(os.listdir(out))
  for name in ("fig4_steps_vs_lr", "fig6_best_vs_lr"):
    assert f"{name}.png" in written
  assert any(l.startswith("fig7b_8_annealing: skipped, not drawn: no workload's trials vary")
             for l in proc.stdout.splitlines()), proc.stdout


def _wsd(lr, warmup_factor, step_hint, factor, cooldown_fraction, steps):
  """The closed form: warmup, constant until H - C, linear to 0 at H, then 0."""
  horizon = round(factor * step_hint)
  warmup = int(warmup_factor * horizon)
  start = max(warmup, horizon - round(cooldown_fraction * horizon))
  return np.array([lr * s / warmup if s < warmup else
                   lr if s < start else lr * max(0.0, 1 - (s - start) / (horizon - start))
                   for s in steps])


def test_cooldowns_branched_from_a_constant_trunk_are_the_schedules_figure(tmp_path, captured):
  """The schedules preset with cooldown branches: trial 1 a constant trunk, trial 2 a WSD
  branch decaying over steps 800-1000 (half the step hint), whose eval CSV holds the
  trunk's rows up to 800; the full cosine; LAWA on the full cosine."""
  nulls = dict(lr_end_factor=None, cooldown_fraction=None, wsd_decay=None)
  steps = np.arange(100, 2100, 100)
  trunk = decaying(1.6, 0.01, 1.48, len(steps))
  branch = np.concatenate([trunk[:8], decaying(trunk[7] - 0.01, 0.012, 1.45, 12)])
  full = decaying(1.6, 0.008, 1.44, len(steps))
  for study in (0, 1):
    write_point(tmp_path, "nadamw", study, 1, trunk, steps=steps, lr_schedule="constant",
                step_hint_factor=1.0, **nulls)
    write_point(tmp_path, "nadamw", study, 2, branch, steps=steps, lr_schedule="wsd",
                step_hint_factor=0.5, warmup_factor=0.1, lr_end_factor=0.0,
                cooldown_fraction=0.2, wsd_decay="linear")
    write_point(tmp_path, "nadamw", study, 3, full, steps=steps, lr_schedule="cosine",
                step_hint_factor=1.0, lr_end_factor=0.0)
    write_point(tmp_path, "nadamw_lawa", study, 1, full - 0.005, steps=steps,
                lr_schedule="cosine", step_hint_factor=1.0, lr_end_factor=0.0, lawa_k=10)
  sweep = sweeps.read_sweep(str(tmp_path))
  assert sweep.varying[WORKLOAD] == ("step_hint_factor", "kind")
  skipped = {}
  figures = why_plots.all_figures(sweep, str(tmp_path / "figs"), skipped)
  assert figures["fig7a_12_schedules"] and set(skipped) == {
      "fig4_steps_vs_lr", "fig6_best_vs_lr", "fig7b_8_annealing"}
  assert "the schedules figure shows them" in skipped["fig7b_8_annealing"]
  lr_ax, curve_ax = captured["fig7a_12_schedules"].axes
  label = "NadamW (step_hint_factor=0.5, lr_schedule=wsd)"
  np.testing.assert_allclose(_lines(curve_ax)[label].get_ydata(), branch)
  rates = _lines(lr_ax)[label]
  np.testing.assert_allclose(rates.get_ydata(), _wsd(
      test_sweeps.BASE["learning_rate"], 0.1, 2000, 0.5, 0.2, rates.get_xdata()),
      rtol=1e-5, atol=1e-9)
  constant = _lines(lr_ax)["NadamW (step_hint_factor=1, lr_schedule=constant)"].get_ydata()
  assert constant[100:].min() == constant[100:].max() == pytest.approx(
      test_sweeps.BASE["learning_rate"])


def test_cli_with_an_experiment_dir_alone(tmp_path):
  root = tmp_path / "exp"
  for t, decay in enumerate(test_sweeps.DECAYS, start=1):
    write_point(root, "nadamw", 0, t, test_sweeps.annealing_values("nadamw", decay, 0),
                **test_sweeps.DECAYS[decay])
  out = tmp_path / "figs"
  run = lambda d: subprocess.run(
      [sys.executable, os.path.join("scripts", "plot.py"), f"--experiment_dir={d}",
       f"--output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  proc = run(root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["fig7b_8_annealing.pdf", "fig7b_8_annealing.png"]
  assert "fig4_steps_vs_lr: skipped, not drawn: no workload's trials vary learning_rate" in (
      proc.stdout)
  bad = run(tmp_path / "missing")
  assert bad.returncode != 0 and "does not exist" in bad.stderr

"""The paper's Section 6 figures ("why average"), drawn from a `sweeps.Sweep`.

Each figure draws what `sweeps` computes (one function per figure gives those values,
`*_values`), saves PNG and PDF as `plots` does, and is skipped with the reason
(`plots.attempt`, `plots.NothingToDraw`) when the trials do not vary what it is about:

* Fig. 4, `steps_vs_lr`: steps to target against the top learning rate, a line per
  series (submission, and any other setting that varies) through the mean over studies
  of each study's fewest steps (`sweeps.steps_to_target`), the min-max over studies as a
  bar; a study that never reached the target is an ``x`` on the dotted "missed" line at
  the top, with ``k/n`` missed written next to it. Needs ``learning_rate`` to vary.
* Fig. 6, `best_vs_lr`: the best validation metric (`sweeps.best_score`) against the top
  learning rate, mean and min-max over studies, with the target.
* Fig. 7a/12, `schedules`: per workload, the validation curves (mean over studies,
  `sweeps.mean_curve`) of every series, the shorter schedules (``step_hint_factor`` < 1,
  cooldowns; a colour each) against the averaged long run (its submission's colour, a
  line style per averager), and above them each series' learning rate
  against the step, from its own hyperparameters through the recipe
  (`sweeps.learning_rates`). Needs ``step_hint_factor`` or ``cooldown_fraction`` to vary.
* Fig. 7b/8, `annealing`: per workload, the validation curves of each decay (to 0, to a
  fraction, none) with and without averaging (a colour per decay, a line style per
  averager), with the target. Needs ``lr_end_factor`` to vary, or ``lr_schedule`` where
  the horizon does not vary with it (then the trials are the schedules figure's).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from weight_averaging.algoperf_api import catalog
from weight_averaging.studies import plots
from weight_averaging.studies import sweeps
from weight_averaging.studies.plots import NothingToDraw

STYLES = {None: "-", "ema": "--", "lawa": ":"}   # line style by averager
MISSED = "missed"
SPREAD = "min-max"


def _averager(submission: str) -> Optional[str]:
  return catalog.get(submission).averager if submission in catalog.SUBMISSIONS else None


def _spec(sweep: sweeps.Sweep, w: str) -> Dict[str, Any]:
  spec = sweep.specs[w]
  return {"target": spec.target, "minimize": spec.minimize}


def _about(settings: Sequence[str], varying: Sequence[str]) -> bool:
  """Whether trials that vary `varying` show what a figure about `settings` is about; the
  schedule kind alone belongs to the decay figure only where the horizon does not vary
  too (a cooldown preset's constant trunk and WSD branches are the schedules figure's)."""
  found = set(settings) & set(varying)
  if found == {"kind"} and set(sweeps.HORIZON_SETTINGS) & set(varying):
    return False
  return bool(found)


def _workloads(sweep: sweeps.Sweep, settings: Sequence[str], preset: str) -> List[str]:
  found = [w for w in sorted(sweep.points) if _about(settings, sweep.varying[w])]
  if not found:
    names = " or ".join(sweeps.SHOWN.get(s, s) for s in settings)
    with_horizon = [w for w in sorted(sweep.points) if set(settings) & set(sweep.varying[w])]
    raise NothingToDraw(f"no workload's trials vary {names} within a study (run_study "
                        f"--preset={preset} makes such trials)" + (
                            f"; the trials of {', '.join(with_horizon)} vary the schedule "
                            "together with its horizon (the schedules figure shows them)"
                            if with_horizon else ""))
  return found


# ----------------------------------------------------------------------------- Fig. 4, 6


def steps_vs_lr_values(sweep: sweeps.Sweep) -> Dict[str, Dict[Tuple[str, sweeps.Variant],
                                                              Dict[float, sweeps.Spread]]]:
  """Fig. 4's values: ``{workload: {series: {learning rate: Spread of steps}}}``."""
  return {w: sweeps.by_learning_rate(sweep, w, sweeps.steps_to_target)
          for w in _workloads(sweep, [sweeps.LEARNING_RATE], "lr_sweep")}


def best_vs_lr_values(sweep: sweeps.Sweep) -> Dict[str, Dict[Tuple[str, sweeps.Variant],
                                                             Dict[float, sweeps.Spread]]]:
  """Fig. 6's values: ``{workload: {series: {learning rate: Spread of best metric}}}``."""
  return {w: sweeps.by_learning_rate(sweep, w, sweeps.best_score)
          for w in _workloads(sweep, [sweeps.LEARNING_RATE], "lr_sweep")}


def _style(key, index_of_variant):
  s, _ = key
  return {"color": plots._color(s, 0), "ls": ["-", "--", "-.", ":"][index_of_variant % 4]}


def _variant_indices(keys):
  """The index of each series' variant among its submission's series (its line style)."""
  seen: Dict[str, int] = {}
  out = {}
  for s, v in keys:
    out[(s, v)] = seen.get(s, 0)
    seen[s] = out[(s, v)] + 1
  return out


def _draw_lr_panel(ax, values, miss_line: Optional[float]):
  """Means with min-max bars per series; misses as ``x`` on `miss_line` (when given)."""
  indices = _variant_indices(values)
  for n, (key, by_lr) in enumerate(values.items()):
    style = _style(key, indices[key])
    lrs = np.array(list(by_lr))
    spreads = list(by_lr.values())
    means = np.array([p.mean for p in spreads])
    hit = np.isfinite(means)
    ax.plot(lrs[hit], means[hit], marker="o", ms=4, label=sweeps.series_label(*key), **style)
    ax.vlines(lrs[hit], [p.low for p, h in zip(spreads, hit) if h],
              [p.high for p, h in zip(spreads, hit) if h], color=style["color"], lw=1,
              label=f"_{sweeps.series_label(*key)}: {SPREAD}")   # "_": not in the legend
    if miss_line is None:
      continue
    missed = [(lr, p) for lr, p in by_lr.items() if p.misses]
    if missed:
      ax.scatter([lr for lr, _ in missed], [miss_line] * len(missed), marker="x",
                 color=style["color"], zorder=3, label=f"{sweeps.series_label(*key)}: {MISSED}")
      for lr, p in missed:
        ax.annotate(f"{p.misses}/{len(p.per_study)}", (lr, miss_line), fontsize=6,
                    color=style["color"], textcoords="offset points", xytext=(-4, -10 - 7 * n),
                    ha="right")
  ax.set_xscale("log")
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  lrs = sorted({lr for by_lr in values.values() for lr in by_lr})
  ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=7)
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _lr_figure(values, sweep, output_dir, name, title, ylabel, with_misses):
  fig, axes = plots._grid(len(values))
  for ax, (w, by_series) in zip(axes, values.items()):
    miss_line = None
    if with_misses:
      hits = [v for by_lr in by_series.values() for p in by_lr.values() for v in p.per_study
              if math.isfinite(v)]
      miss_line = 1.1 * max(hits) if hits else 1.0
      ax.axhline(miss_line, color="k", ls=":", lw=0.8)
      ax.text(0.01, miss_line, f" {MISSED}", transform=ax.get_yaxis_transform(), fontsize=7,
              va="bottom")
    else:
      ax.axhline(sweep.specs[w].target, color="k", ls=":", lw=1, label="target")
    _draw_lr_panel(ax, by_series, miss_line)
    ax.set(title=w, xlabel="top learning rate", ylabel=ylabel)
    ax.legend(fontsize=6)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return plots._save(fig, output_dir, name)


@plots._figure
def steps_vs_lr(sweep: sweeps.Sweep, output_dir: str) -> List[str]:
  """Fig. 4: steps to target against the top learning rate, with and without averaging."""
  values = steps_vs_lr_values(sweep)
  if all(not math.isfinite(v) for by_series in values.values() for by_lr in by_series.values()
         for p in by_lr.values() for v in p.per_study):
    raise NothingToDraw("no trial at any learning rate reached the target: every point "
                        "would be a miss")
  return _lr_figure(values, sweep, output_dir, "fig4_steps_vs_lr",
                    "Steps to target vs top LR\n(mean, min-max over studies; x: missed)",
                    "steps to target", with_misses=True)


@plots._figure
def best_vs_lr(sweep: sweeps.Sweep, output_dir: str) -> List[str]:
  """Fig. 6: best validation metric against the top learning rate."""
  values = best_vs_lr_values(sweep)
  if all(math.isnan(p.mean) for by_series in values.values() for by_lr in by_series.values()
         for p in by_lr.values()):
    raise NothingToDraw("no trial has a validation metric value")
  return _lr_figure(values, sweep, output_dir, "fig6_best_vs_lr",
                    "Best validation metric vs top LR\n(mean, min-max over studies)",
                    "best " + next(sweep.specs[w].metric for w in values), with_misses=False)


# ----------------------------------------------------------------------------- Fig. 7, 8


def curves_values(sweep: sweeps.Sweep, settings: Sequence[str], preset: str
                  ) -> Dict[str, Dict[Tuple[str, sweeps.Variant], Tuple[np.ndarray, np.ndarray]]]:
  """``{workload: {series: (steps, mean validation metric over studies)}}`` for the
  workloads whose trials vary one of `settings`."""
  return {w: {key: sweeps.mean_curve(studies, sweep.specs[w])
              for key, studies in sweeps.series(sweep, w).items()}
          for w in _workloads(sweep, settings, preset)}


def schedule_values(sweep: sweeps.Sweep, workload: str, last_step: int
                    ) -> Dict[Tuple[str, sweeps.Variant], Tuple[np.ndarray, np.ndarray]]:
  """``{series: (steps 0..last_step, learning rate)}``: each series' schedule from the
  hyperparameters of its first trial (a series' trials share their schedule)."""
  spec = sweep.specs[workload]
  steps = np.arange(last_step + 1)
  out = {}
  for key, studies in sweeps.series(sweep, workload).items():
    point = next(iter(studies.values()))[0]
    out[key] = (steps, sweeps.learning_rates(point, spec.step_hint or last_step, steps))
  return out


def _curve_colors(keys, averaged_by_submission: bool = False
                  ) -> Dict[Tuple[str, sweeps.Variant], Any]:
  """A colour per variant (viridis), shared by the submissions at that variant; with
  `averaged_by_submission`, an averaged submission's own colour (`plots.COLORS`)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  own = {k: plots._color(k[0], 0) for k in keys if averaged_by_submission and _averager(k[0])}
  variants = list(dict.fromkeys(k[1] for k in keys if k not in own))
  cmap = colormaps["viridis"]
  return {k: own[k] if k in own else
          cmap(0.85 * variants.index(k[1]) / max(len(variants) - 1, 1)) for k in keys}


def _draw_curves(ax, curves, colors, spec):
  for key, (steps, mean) in curves.items():
    s, _ = key
    ax.plot(steps, mean, color=colors[key], ls=STYLES.get(_averager(s), "-"), lw=1.2,
            label=sweeps.series_label(*key))
  ax.axhline(spec["target"], color="k", ls=":", lw=1, label="target")
  plots._zoom_on_target(ax, spec)


def _legend_below(ax):
  # Below the axes: the curves end close together, where a legend inside would sit.
  longest = max((len(l) for l in ax.get_legend_handles_labels()[1]), default=0)
  ax.legend(fontsize=6, ncol=2 if longest <= 48 else 1, loc="upper center",
            bbox_to_anchor=(0.5, -0.14))


@plots._figure
def schedules(sweep: sweeps.Sweep, output_dir: str) -> List[str]:
  """Fig. 7a/12: the averaged long run against shorter schedules, each schedule above."""
  values = curves_values(sweep, sweeps.HORIZON_SETTINGS, "schedules")
  plt = plots._pyplot()
  fig, axes = plt.subplots(2, len(values), figsize=(6.4 * len(values), 7.2), squeeze=False,
                           gridspec_kw={"height_ratios": [1, 2.6]}, sharex="col")
  for col, (w, curves) in enumerate(values.items()):
    colors = _curve_colors(curves, averaged_by_submission=True)
    last = int(max(steps.max() for steps, _ in curves.values()))
    for key, (steps, lrs) in schedule_values(sweep, w, last).items():
      axes[0][col].plot(steps, lrs, color=colors[key], ls=STYLES.get(_averager(key[0]), "-"),
                        lw=1.1, label=sweeps.series_label(*key))
    axes[0][col].set(title=w, ylabel="learning rate")
    _draw_curves(axes[1][col], curves, colors, _spec(sweep, w))
    axes[1][col].set(xlabel="step", ylabel=sweep.specs[w].metric)
    _legend_below(axes[1][col])
  fig.suptitle("Averaging the long run vs shorter schedules\n(mean over studies)", fontsize=9)
  fig.tight_layout()
  return plots._save(fig, output_dir, "fig7a_12_schedules")


@plots._figure
def annealing(sweep: sweeps.Sweep, output_dir: str) -> List[str]:
  """Fig. 7b/8: anneal to 0, to a fraction, or not at all; with and without averaging."""
  values = curves_values(sweep, sweeps.DECAY_SETTINGS, "annealing")
  cols = min(len(values), 3)
  fig, axes = plots._pyplot().subplots(math.ceil(len(values) / cols), cols, squeeze=False,
                                       figsize=(6.4 * cols, 5.6 * math.ceil(len(values) / cols)))
  for ax in axes.flat[len(values):]:
    ax.set_visible(False)
  for ax, (w, curves) in zip(axes.flat, values.items()):
    _draw_curves(ax, curves, _curve_colors(curves), _spec(sweep, w))
    ax.set(title=w, xlabel="step", ylabel=sweep.specs[w].metric)
    _legend_below(ax)
  fig.suptitle("LR decay x averaging (mean over studies)", fontsize=9)
  fig.tight_layout()
  return plots._save(fig, output_dir, "fig7b_8_annealing")


FIGURES = (("fig4_steps_vs_lr", steps_vs_lr), ("fig6_best_vs_lr", best_vs_lr),
           ("fig7a_12_schedules", schedules), ("fig7b_8_annealing", annealing))


def all_figures(sweep: Optional[sweeps.Sweep], output_dir: str,
                skipped: Optional[Dict[str, str]] = None,
                why_not: str = "no experiment directory") -> Dict[str, List[str]]:
  """Every figure of this module the sweep supports, as `plots.all_figures` does; with no
  sweep, each is skipped for `why_not`."""
  figures: Dict[str, List[str]] = {}
  for name, figure in FIGURES:
    if sweep is None:
      figures[name], why = [], why_not
    else:
      figures[name], why = plots.attempt(figure, sweep, output_dir)
    if why is not None and skipped is not None:
      skipped[name] = why
  return figures

"""The paper's figures from scored studies (`scoring`) and offline-averaging grids (`offline`).

Every function takes the loaded results (plain dicts, as `scores_file.load` and the offline
results file give them), draws one figure with matplotlib and saves it as PNG and PDF under
``output_dir``; it returns the paths written, or ``[]`` when the results hold nothing to draw
(no Shampoo runs for the Shampoo figure; no curve; no hit, so that every bar or cell would be
a miss), so a study with some of the submissions still gets the figures it can have and no
figure is an empty frame. `attempt` gives the reason a figure is not drawn, and `all_figures`
collects them.

* Figure 1, `validation_curves`: per workload, the validation metric of every study's fastest
  trial against the step, with and without averaging, and the target.
* Figure 2, `steps_to_target`: per workload, the median steps to target of each averaged
  submission as a fraction of its optimizer's steps without averaging (the paper's headline;
  below 1 is faster), with one dot per study.
* Figure 3, `window_vs_speedup`: from offline grids, steps to target relative to no averaging
  against the averaging window as a fraction of the step hint (LAWA ``nu * k``, EMA
  ``nu / (1 - beta)``).
* Figure 5, `shampoo`: the same bars as Figure 2 for Shampoo + EMA / LAWA against Shampoo, with
  Shampoo against NadamW for reference.
* Figures 10-11, `offline_heatmaps`: steps to target relative to no averaging over the LAWA grid
  ``(nu, k)`` and the EMA grid ``(nu, beta)`` of one offline run.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from weight_averaging.algoperf_api import catalog

LABELS = {name: catalog.label(name) for name in catalog.NAMES}
COLORS = {"nadamw": "tab:gray", "nadamw_ema": "tab:blue", "nadamw_lawa": "tab:orange",
          "shampoo": "black", "shampoo_ema": "tab:cyan", "shampoo_lawa": "tab:red"}
FORMATS = ("png", "pdf")


class NothingToDraw(Exception):
  """The results hold nothing a figure could show; the message says what is missing."""


def _figure(draw: Callable[..., List[str]]):
  """`draw` as a figure function: its paths, or ``[]`` when it raises `NothingToDraw`."""
  @functools.wraps(draw)
  def figure(*args, **kwargs):
    return attempt(figure, *args, **kwargs)[0]
  figure.draw = draw
  return figure


def attempt(figure, *args, **kwargs) -> Tuple[List[str], Optional[str]]:
  """``(paths, None)`` when `figure` (a figure function of this module) draws, ``([], why)``
  when the results hold nothing for it."""
  try:
    return figure.draw(*args, **kwargs), None
  except NothingToDraw as e:
    return [], str(e)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, output_dir: str, name: str) -> List[str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for fmt in FORMATS:
    path = os.path.join(output_dir, f"{name}.{fmt}")
    fig.savefig(path, dpi=130 if fmt == "png" else None)
    paths.append(path)
  _pyplot().close(fig)
  return paths


def _label(name: str) -> str:
  return LABELS.get(name, name)


def _color(name: str, index: int) -> str:
  return COLORS.get(name, f"C{index % 10}")


def _grid(n: int):
  cols = min(n, 4)
  rows = math.ceil(n / cols)
  plt = _pyplot()
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def _curves(scores, w, submissions):
  """``[(submission, index, curves)]`` of workload `w` with a finite point to draw."""
  by_sub = scores["results"][w]
  names = [s for s in (submissions or list(by_sub)) if s in by_sub]
  out = []
  for i, s in enumerate(names):
    curves = [c for c in (study.get("curve") for study in by_sub[s]["studies"].values())
              if c and any(v is not None for v in c["metric"])]
    if curves:
      out.append((s, i, curves))
  return out


@_figure
def validation_curves(scores: Mapping[str, Any], output_dir: str,
                      submissions: Optional[Sequence[str]] = None) -> List[str]:
  """Figure 1: validation metric of each study's fastest trial, per workload (a panel per
  workload with a curve)."""
  drawn = {w: _curves(scores, w, submissions) for w in scores["results"]}
  workloads = [w for w, curves in drawn.items() if curves]
  if not workloads:
    raise NothingToDraw("no validation curve in the scores (no eval with a metric value)")
  fig, axes = _grid(len(workloads))
  for ax, w in zip(axes, workloads):
    spec = scores["workloads"][w]
    for s, i, curves in drawn[w]:
      for j, curve in enumerate(curves):
        ax.plot(curve["global_step"], curve["metric"], color=_color(s, i), lw=1.1, alpha=0.8,
                label=_label(s) if j == 0 else None)
    ax.axhline(spec["target"], color="k", ls=":", lw=1, label="target")
    ax.set(title=w, xlabel="step", ylabel=spec["metric"])
    _zoom_on_target(ax, spec)
    ax.legend(fontsize=7)
  fig.suptitle("Validation curves with and without averaging")
  fig.tight_layout()
  return _save(fig, output_dir, "fig1_validation_curves")


def _zoom_on_target(ax, spec):
  """Shows the last part of the curves, where they cross the target."""
  lo, hi = ax.get_ylim()
  t = spec["target"]
  span = abs(t) * 0.1 or 0.1
  if spec.get("minimize", True):
    ax.set_ylim(min(lo, t - 0.2 * span), min(hi, t + span))
  else:
    ax.set_ylim(max(lo, t - span), max(hi, t + 0.2 * span))


def _fraction_bars(scores, output_dir, name, title, pairs) -> List[str]:
  """Bars of median steps(s) / median steps(base) per workload for (s, base) pairs."""
  workloads = [w for w in scores["results"]
               if any(s in scores["results"][w] and b in scores["results"][w]
                      for s, b in pairs)]
  if not workloads:
    raise NothingToDraw(f"no workload has both of any of {pairs}")
  if all(scores["results"][w][s]["fraction_of_baseline_steps"].get(b) is None
         for w in workloads for s, b in pairs
         if s in scores["results"][w] and b in scores["results"][w]):
    raise NothingToDraw(f"no submission and its base both reached the target (pairs {pairs}): "
                        "every bar would be a miss")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(workloads) * len(pairs)), 3.8))
  width = 0.8 / len(pairs)
  for i, (s, b) in enumerate(pairs):
    for x, w in enumerate(workloads):
      by_sub = scores["results"][w]
      if s not in by_sub or b not in by_sub:
        continue
      frac = by_sub[s]["fraction_of_baseline_steps"].get(b)
      pos = x + (i - (len(pairs) - 1) / 2) * width
      if frac is not None:
        ax.bar(pos, frac, width, color=_color(s, i), alpha=0.85,
               label=f"{_label(s)} / {_label(b)}" if x == 0 else None)
      else:
        ax.text(pos, 0.05, "miss", rotation=90, ha="center", fontsize=7)
      base_steps = by_sub[b]["median_steps_to_target"]
      per_study = [v / base_steps for v in by_sub[s]["steps_to_target_per_study"]
                   if v is not None and base_steps]
      ax.scatter([pos] * len(per_study), per_study, color="k", s=10, zorder=3)
  ax.axhline(1.0, color="k", lw=1, ls=":")
  ax.set_xticks(range(len(workloads)), workloads, rotation=20)
  ax.set(ylabel="steps to target (fraction)", title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, output_dir, name)


def _against_base(scores: Mapping[str, Any], optimizer: str) -> List[Tuple[str, str]]:
  """``(s, base)`` for each averaged submission on `optimizer` scored together with its base
  (`catalog.base_of`)."""
  subs = scores["submissions"]
  return [(s, catalog.base_of(s)) for s in catalog.averaged(optimizer)
          if s in subs and catalog.base_of(s) in subs]


@_figure
def steps_to_target(scores: Mapping[str, Any], output_dir: str) -> List[str]:
  """Figure 2: NadamW + EMA / LAWA steps to target as a fraction of NadamW's."""
  pairs = _against_base(scores, "nadamw")
  if not pairs:
    raise NothingToDraw("no NadamW + EMA or NadamW + LAWA runs scored with NadamW")
  return _fraction_bars(scores, output_dir, "fig2_steps_to_target",
                        "Steps to target / NadamW (median, studies)", pairs)


@_figure
def shampoo(scores: Mapping[str, Any], output_dir: str) -> List[str]:
  """Figure 5: Shampoo + EMA / LAWA against Shampoo (and Shampoo against NadamW)."""
  subs = scores["submissions"]
  if "shampoo" not in subs:
    raise NothingToDraw("no Shampoo runs")
  pairs = _against_base(scores, "shampoo")
  if "nadamw" in subs:
    pairs.insert(0, ("shampoo", "nadamw"))
  if not pairs:
    raise NothingToDraw("no Shampoo + EMA / LAWA or NadamW runs to compare Shampoo with")
  return _fraction_bars(scores, output_dir, "fig5_shampoo",
                        "Averaging on Shampoo: steps to target", pairs)


def _relative(point, baseline_steps):
  steps = point.get("steps_to_target")
  if steps is None or not baseline_steps:
    return None
  return steps / baseline_steps


def _window_points(runs, step_hints):
  """``[(run index, run, scheme, [(window / hint, relative steps)])]`` where some point hit."""
  out = []
  for i, run in enumerate(runs):
    base = (run.get("baseline") or {}).get("steps_to_target")
    hint = (step_hints or {}).get(run.get("workload")) or run.get("step_hint")
    for scheme in ("lawa", "ema"):
      points = [(p["window"] / hint if hint else p["window"], _relative(p, base))
                for p in run["grid"] if p["scheme"] == scheme]
      points = [(x, y) for x, y in points if y is not None]
      if points:
        out.append((i, run, scheme, points))
  return out


@_figure
def window_vs_speedup(offline_results: Sequence[Mapping[str, Any]], output_dir: str,
                      step_hints: Optional[Mapping[str, int]] = None) -> List[str]:
  """Figure 3: relative steps to target against the window / step hint, per offline run."""
  runs = [r for r in offline_results if r.get("grid")]
  if not runs:
    raise NothingToDraw("no offline-averaging grid (scripts/offline_average.py results)")
  series = _window_points(runs, step_hints)
  if not series:
    raise NothingToDraw("no offline grid point with a relative speed-up: the runs without "
                        "averaging, or every grid point, missed the target")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  markers = {"lawa": "o", "ema": "^"}
  for i, run, scheme, points in series:
    xs, ys = zip(*points)
    ax.scatter(xs, ys, marker=markers[scheme], color=f"C{i}", alpha=0.8,
               label=f"{run.get('workload', '?')} {scheme.upper()}")
  ax.axhline(1.0, color="k", lw=1, ls=":")
  ax.set_xscale("log")
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
  ax.set(xlabel="averaging window / step hint" if step_hints or any(
      r.get("step_hint") for r in runs) else "averaging window (steps)",
         ylabel="steps to target / no averaging",
         title="Averaging window vs speed-up (offline)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, output_dir, "fig3_window_vs_speedup")


def _heatmap(ax, points, row_key, col_key, base, title):
  rows = sorted({p[row_key] for p in points})
  cols = sorted({p["every"] for p in points})
  grid = np.full((len(rows), len(cols)), np.nan)
  for p in points:
    rel = _relative(p, base)
    if rel is not None:
      grid[rows.index(p[row_key]), cols.index(p["every"])] = rel
  image = ax.imshow(grid, cmap="RdYlGn_r", vmin=0.5, vmax=1.5, origin="lower", aspect="auto")
  for r in range(len(rows)):
    for c in range(len(cols)):
      text = "miss" if np.isnan(grid[r, c]) else f"{grid[r, c]:.2f}"
      ax.text(c, r, text, ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(cols)), [str(c) for c in cols])
  ax.set_yticks(range(len(rows)), [str(r) for r in rows])
  ax.set(xlabel=f"{col_key} (nu, steps)", ylabel=row_key, title=title)
  return image


def heatmaps_name(offline_result: Mapping[str, Any]) -> str:
  """The name of `offline_heatmaps`' figure for one offline run."""
  return f"fig10_11_heatmaps_{offline_result.get('workload', 'offline')}"


@_figure
def offline_heatmaps(offline_result: Mapping[str, Any], output_dir: str) -> List[str]:
  """Figures 10-11: relative steps to target over (nu, k) for LAWA and (nu, beta) for EMA."""
  base = (offline_result.get("baseline") or {}).get("steps_to_target")
  lawa = [p for p in offline_result.get("grid", []) if p["scheme"] == "lawa"]
  ema = [p for p in offline_result.get("grid", []) if p["scheme"] == "ema"]
  panels = [(lawa, "k", "LAWA"), (ema, "beta", "EMA")]
  panels = [p for p in panels if p[0]]
  if not panels:
    raise NothingToDraw("the offline results hold no grid point")
  if not base:
    raise NothingToDraw("the run without averaging never reached the target: steps relative "
                        "to it are undefined")
  if all(p.get("steps_to_target") is None for p in lawa + ema):
    raise NothingToDraw("no grid point reached the target: every cell would be a miss")
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.2),
                           squeeze=False, layout="constrained")
  image = None
  for ax, (points, key, name) in zip(axes[0], panels):
    image = _heatmap(ax, points, key, "every", base,
                     f"{name}: steps to target / no averaging")
  fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
  fig.suptitle(f"{offline_result.get('workload', '')} {offline_result.get('submission', '')} "
               f"(offline, snapshots every {offline_result.get('snapshot_every', '?')})")
  return _save(fig, output_dir, heatmaps_name(offline_result))


def all_figures(scores: Optional[Mapping[str, Any]], offline_results: Sequence[Mapping[str, Any]],
                output_dir: str, skipped: Optional[Dict[str, str]] = None
                ) -> Dict[str, List[str]]:
  """Every figure the results allow; ``{figure: [paths]}``, an empty list for a figure not
  drawn, and its reason in `skipped` (when given) under the same name."""
  hints = ({w: spec.get("step_hint") for w, spec in scores["workloads"].items()}
           if scores is not None else None)
  calls = []
  if scores is not None:
    calls += [("fig1_validation_curves", validation_curves, (scores, output_dir)),
              ("fig2_steps_to_target", steps_to_target, (scores, output_dir)),
              ("fig5_shampoo", shampoo, (scores, output_dir))]
  calls.append(("fig3_window_vs_speedup", window_vs_speedup, (offline_results, output_dir, hints)))
  calls += [(heatmaps_name(r), offline_heatmaps, (r, output_dir)) for r in offline_results]
  figures: Dict[str, List[str]] = {}
  for name, figure, args in calls:
    figures[name], why = attempt(figure, *args)
    if why is not None and skipped is not None:
      skipped[name] = why
  return figures

"""Offline averaging: snapshots written during training, replayed into EMA and LAWA grids."""

import importlib.util
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from weight_averaging import layout, runner, snapshots, workloads
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.studies import offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 200
EVAL_EVERY = 20


def _point(name, **extra):
  with open(os.path.join(ROOT, "tuning_search_spaces", "embedded", f"{name}.json")) as f:
    point = json.load(f)[0]
  point.update(extra)
  return point


def _train(root, name, api="jit", steps=STEPS, **extra):
  """Trains submission `name` through the embedded runner; (trial result, snapshot dir)."""
  snap_dir = str(root / f"snapshots_{name}_{api}")
  space = root / f"{name}_{api}.json"
  space.write_text(json.dumps([_point(name, snapshot_dir=snap_dir, **extra)]))
  (result,) = runner.run_experiment(
      workload_name="teacher_student",
      submission_path=os.path.join(ROOT, "submissions", api, name, "submission.py"),
      tuning_search_space=str(space), experiment_dir=str(root / "experiments"),
      experiment_name=f"{name}_{api}", api=api, max_global_steps=steps,
      eval_every_steps=EVAL_EVERY, save_checkpoints=False, stop_at_target=False)
  snapshots.flush_all()
  return result, snap_dir


@pytest.fixture(scope="module")
def lawa_run(tmp_path_factory):
  # nu0 = 5 divides the online nu = 10: the replay samples every other snapshot.
  return _train(tmp_path_factory.mktemp("lawa"), "nadamw_lawa", snapshot_every=5)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("ema"), "nadamw_ema", snapshot_every=10)


@pytest.fixture(scope="module")
def pmap_run(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("pmap"), "nadamw_ema", api="pmap", steps=100,
                snapshot_every=10)


def _online_rows(result):
  return layout.read_rows(layout.eval_file(result.log_dir))


# ----------------------------------------------------------------------------
# (1) Offline replay with the online hyperparameters is the online run.


@pytest.mark.parametrize("scheme", ["lawa", "ema", "ema_pmap"])
def test_offline_replay_reproduces_the_online_averaged_evaluation(scheme, request):
  result, snap_dir = request.getfixturevalue(
      {"lawa": "lawa_run", "ema": "ema_run", "ema_pmap": "pmap_run"}[scheme])
  point = (offline.GridPoint("lawa", 10, k=20) if scheme == "lawa"
           else offline.GridPoint("ema", 10, beta=0.9))
  out = offline.run_offline(snap_dir, [point])
  rows = _online_rows(result)
  online_steps = [int(r["global_step"]) for r in rows]
  assert online_steps == list(range(EVAL_EVERY, result.global_step + 1, EVAL_EVERY))
  # Default eval steps: the workload's cadence up to the trained steps, the end included.
  assert out["eval_steps"] == online_steps
  (entry,) = out["grid"]
  assert [e["global_step"] for e in entry["evals"]] == online_steps
  for row, live, offline_eval in zip(rows, result.eval_results, entry["evals"]):
    for name in ("train/loss", "validation/loss", "test/loss", "validation/accuracy"):
      # Bit for bit: the same averager functions on the same float32 snapshots.
      assert offline_eval[name] == live[name], (row["global_step"], name)
      assert repr(offline_eval[name]) == row[name]  # the CSV the runner wrote
  assert entry["curve"] == [[s, e["validation/loss"]]
                            for s, e in zip(online_steps, result.eval_results)]
  assert entry["window"] == (200.0 if scheme == "lawa" else pytest.approx(100.0))


def test_replayed_average_matches_a_numpy_average_of_the_snapshots(lawa_run, ema_run):
  # An independent reference for the replay: brute-force means and EMAs in float64.
  workload = workloads.get_workload(api="jit")
  like = offline._like(workload, "jit")  # pylint: disable=protected-access
  for (_, snap_dir), point in ((lawa_run, offline.GridPoint("lawa", 20, k=3)),
                               (ema_run, offline.GridPoint("ema", 30, beta=0.7))):
    snaps = offline.Snapshots(snap_dir, like)
    eval_steps = [41, 100, 150]
    replayed = list(offline.replay(offline.averager_for(point), point.every, 0, snaps,
                                   eval_steps))
    for s, averaged, _ in replayed:
      sampled = [t for t in range(0, s) if t % point.every == 0]
      flat = [jax.tree_util.tree_leaves(snaps.get(t)["params"]) for t in sampled]
      for i, leaf in enumerate(jax.tree_util.tree_leaves(averaged)):
        series = [np.asarray(f[i], np.float64) for f in flat]
        if point.scheme == "lawa":
          expected = np.mean(series[-point.k:], axis=0)
        else:
          expected = series[0]
          for x in series[1:]:
            expected = point.beta * expected + (1 - point.beta) * x
        np.testing.assert_allclose(leaf, expected, rtol=2e-6, atol=2e-7)


# ----------------------------------------------------------------------------
# (2) Snapshots: complete, equal to the live params, written off the step.


def test_snapshots_are_complete_and_equal_the_final_live_params(lawa_run, ema_run):
  for (result, snap_dir), nu0 in ((lawa_run, 5), (ema_run, 10)):
    manifest = snapshots.read_manifest(snap_dir)
    assert manifest.snapshot_every == nu0 and manifest.trained_steps == STEPS
    assert snapshots.snapshot_steps(snap_dir) == list(range(0, STEPS, nu0))
    assert not [n for n in os.listdir(snap_dir) if n.endswith(".tmp")]
    assert manifest.paths[0].startswith("['params']")


@pytest.mark.parametrize("api", ["jit", "pmap"])
def test_snapshot_writes_do_not_hold_up_training_and_hold_the_live_params(
    tmp_path, monkeypatch, api):
  # The writer thread is held at its first file: training must go on regardless
  # (one snapshot in the writer, one queued), then everything lands on release.
  gate, real_write = threading.Event(), snapshots._write_atomic  # pylint: disable=protected-access

  def held_write(path, write):
    if path.endswith(".npz"):  # the manifest is written when the writer opens
      gate.wait()
    real_write(path, write)

  monkeypatch.setattr(snapshots, "_write_atomic", held_write)
  snap_dir = str(tmp_path / "snaps")
  workload = workloads.get_workload(api=api)
  submission = runner.load_submission(
      os.path.join(ROOT, "submissions", api, "nadamw", "submission.py"))
  hparams = runner.as_hyperparameters(_point("nadamw", snapshot_every=10,
                                             snapshot_dir=snap_dir))
  params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
  opt_state = submission.init_optimizer_state(workload, params, model_state, hparams,
                                              jax.random.PRNGKey(1))
  batches = workload.input_queue(jax.random.PRNGKey(2), 64)
  live = {}
  for t in range(15):
    opt_state, params, model_state = submission.update_params(
        workload, params, workload.model_params_types, model_state, hparams,
        next(batches), workload.loss_type, opt_state, [], t, jax.random.PRNGKey(t))
    host = jax.device_get(params)
    live[t] = jax.tree_util.tree_map(lambda x: np.array(x[0] if api == "pmap" else x),
                                     host)
  # 15 steps trained, two snapshots due, none written yet: the step did not wait.
  assert snapshots.snapshot_steps(snap_dir) == []
  gate.set()
  snapshots.flush_all()
  assert snapshots.snapshot_steps(snap_dir) == [0, 10]
  like = {"params": live[0], "model_state": None}
  for t in (0, 10):
    saved = snapshots.load(snap_dir, t, like)["params"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved, live[t])
  assert not np.array_equal(live[0]["dense_0"]["w"], live[10]["dense_0"]["w"])


def test_a_directory_of_another_run_is_refused_and_a_resume_is_accepted(tmp_path):
  like = {"params": {"w": np.zeros(3, np.float32)}, "model_state": None}
  first = snapshots.SnapshotWriter(str(tmp_path), 5, like, run="run-a")
  first.save(0, like)
  first.flush()
  snapshots.SnapshotWriter(str(tmp_path), 5, like, run="run-a").flush()  # a resume
  with pytest.raises(ValueError, match="another run"):
    snapshots.SnapshotWriter(str(tmp_path), 5, like, run="run-b")
  with pytest.raises(ValueError, match="another run"):
    snapshots.SnapshotWriter(str(tmp_path), 10, like, run="run-a")


# ----------------------------------------------------------------------------
# (3) Clear errors.


def test_bad_grids_are_refused_with_clear_errors():
  with pytest.raises(ValueError, match="every = 15 is not a multiple .* nu0 = 10"):
    offline.make_grid([10, 15], lawa_k=[5], snapshot_every=10)
  with pytest.raises(ValueError, match="lawa_k must hold integers >= 1"):
    offline.make_grid([10], lawa_k=[0])
  with pytest.raises(ValueError, match="lawa_k"):
    offline.make_grid([10], lawa_k=[2.5])
  for beta in (1.0, -0.1, float("nan"), True):
    with pytest.raises(ValueError, match=r"ema_beta must hold numbers in \[0, 1\)"):
      offline.make_grid([10], ema_beta=[beta])
  with pytest.raises(ValueError, match="every must hold integers >= 1"):
    offline.make_grid([0], lawa_k=[2])
  with pytest.raises(ValueError, match="at least one lawa_k or ema_beta"):
    offline.make_grid([10])
  grid = offline.make_grid([10, 20], lawa_k=[2, 4], ema_beta=[0.9], snapshot_every=10)
  assert len(grid) == 6 and grid[0] == offline.GridPoint("lawa", 10, k=2)
  assert grid[-1].window == pytest.approx(200.0)


def test_bad_snapshot_hyperparameters_are_refused_by_name(tmp_path):
  assert hp.snapshot_config({}) is None
  for bad in (0, 2.5, True, "10"):
    with pytest.raises(ValueError, match="'snapshot_every' must be an integer >= 1"):
      hp.snapshot_config({"snapshot_every": bad, "snapshot_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="'snapshot_dir' or the environment variable"):
    hp.snapshot_config({"snapshot_every": 10}, environ={})
  with pytest.raises(ValueError, match="'snapshot_dir' is set but 'snapshot_every'"):
    hp.snapshot_config({"snapshot_dir": str(tmp_path)})
  cfg = hp.snapshot_config({"snapshot_every": 10.0},
                           environ={hp.SNAPSHOT_DIR_ENV: str(tmp_path)})
  assert cfg == hp.SnapshotConfig(every=10, directory=str(tmp_path))


def test_replaying_at_a_step_without_its_snapshot_is_refused(lawa_run, tmp_path):
  _, snap_dir = lawa_run
  with pytest.raises(ValueError, match="is not a multiple of the snapshot interval"):
    offline.run_offline(snap_dir, [offline.GridPoint("lawa", 4, k=2)])
  with pytest.raises(ValueError, match="not a snapshot directory"):
    offline.run_offline(str(tmp_path), [offline.GridPoint("lawa", 10, k=2)])


# ----------------------------------------------------------------------------
# (4) The CLI end to end.


def test_cli_writes_the_results_json(lawa_run, tmp_path):
  _, snap_dir = lawa_run
  out = tmp_path / "offline.json"
  script = os.path.join(ROOT, "scripts", "offline_average.py")
  done = subprocess.run(
      [sys.executable, script, f"--snapshot_dir={snap_dir}", "--every=10,20",
       "--lawa_k=2,20", "--ema_beta=0.9", "--eval_every=40", "--submission=nadamw_lawa",
       f"--output_json={out}"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results["format"] == offline.FORMAT and results["snapshot_every"] == 5
  assert results["eval_steps"] == [40, 80, 120, 160, 200]
  assert results["target"] == {"metric": "validation/loss", "value": 1.472}
  assert [(p["scheme"], p["every"], p["k"], p["beta"]) for p in results["grid"]] == [
      ("lawa", 10, 2, None), ("lawa", 10, 20, None), ("lawa", 20, 2, None),
      ("lawa", 20, 20, None), ("ema", 10, None, 0.9), ("ema", 20, None, 0.9)]
  # The baseline is the live params at the latest snapshot before each eval step.
  assert [s for s, _ in results["baseline"]["curve"]] == [36, 76, 116, 156, 196]
  for p in results["grid"] + [results["baseline"]]:
    assert p["best_metric"] == min(v for _, v in p["curve"])
    hit = next((s for s, v in p["curve"] if v < 1.472), None)
    assert p["steps_to_target"] == hit
  bad = subprocess.run(
      [sys.executable, script, f"--snapshot_dir={snap_dir}", "--every=7",
       "--lawa_k=2", f"--output_json={tmp_path / 'bad.json'}"], cwd=ROOT,
      capture_output=True, text=True, check=False)
  assert bad.returncode != 0 and "not a multiple" in bad.stderr
  if importlib.util.find_spec("matplotlib") is not None:  # what plot.py makes of the file
    from weight_averaging.studies import plots  # pylint: disable=g-import-not-at-top
    # 200 steps are short of the target: no relative steps, so no heatmap of misses only
    # (test_plots draws one from a grid that hits).
    assert results["baseline"]["steps_to_target"] is None
    paths, why = plots.attempt(plots.offline_heatmaps, results, str(tmp_path / "figs"))
    assert paths == [] and "never reached the target" in why


class _Bomb:
  """Unpickled, it writes a file: what loading a snapshot with pickles allowed would run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def _damage_truncate(path, tmp_path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return "damaged snapshot"


def _damage_pickle(path, tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as f:
    pickle.dump(_Bomb(str(tmp_path / "ran")), f)
  return "not a .npz (zip) archive"


def _damage_missing_leaf(path, tmp_path):
  np.savez(path, other=np.zeros(3, np.float32))
  return "leaf_00000"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_pickle, _damage_missing_leaf])
def test_a_damaged_snapshot_is_named_and_never_unpickled(tmp_path, damage):
  like = {"params": {"w": np.arange(3, dtype=np.float32)}, "model_state": None}
  snap_dir = tmp_path / "snaps"
  writer = snapshots.SnapshotWriter(str(snap_dir), 5, like, run="run-a")
  writer.save(0, like)
  writer.flush()
  path = snapshots.step_path(str(snap_dir), 0)
  expected = damage(path, tmp_path)
  with pytest.raises(ValueError) as info:
    snapshots.load(str(snap_dir), 0, like)
  message = str(info.value)
  assert message.startswith(f"{path}: damaged snapshot") and expected in message
  assert "allow_pickle" not in message and not (tmp_path / "ran").exists()
  with pytest.raises(ValueError, match="damaged snapshot"):
    offline.Snapshots(str(snap_dir), like)   # the replay's first read


def test_a_damaged_manifest_is_named(tmp_path):
  (tmp_path / snapshots.MANIFEST).write_text('{"format": "weight_averaging.snaps')
  with pytest.raises(ValueError, match=f"{tmp_path / snapshots.MANIFEST}: damaged, not valid"):
    snapshots.read_manifest(str(tmp_path))
  (tmp_path / snapshots.MANIFEST).write_text(json.dumps({"format": snapshots.FORMAT}))
  with pytest.raises(ValueError, match="damaged manifest, missing or malformed 'snapshot_every'"):
    snapshots.read_manifest(str(tmp_path))

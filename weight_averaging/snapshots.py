"""Params snapshots on disk, written off the training step's critical path, for offline averaging.

A run that snapshots every ``nu0`` steps lets `weight_averaging.studies.offline`
replay any EMA or LAWA whose sampling interval is a multiple of ``nu0`` without
retraining (Ajroldi et al. 2025, Sec. 3 and App. E).

What is saved. With ``t`` the 0-based global step of an update (the ``t`` of the
averagers' schedule, AlgoPerf's ``global_step`` as passed to ``update_params``),
the params *after* update ``t`` are saved when ``t % nu0 == 0``: exactly the params
an averager with ``every = nu0`` samples at step ``t``. They are the live params
of the run after ``t + 1`` updates. A snapshot may carry the model state
(batch-norm statistics) too.

Layout of a snapshot directory::

  manifest.json        {"format": "weight_averaging.snapshots/1", "snapshot_every": nu0,
                        "paths": [key path of every leaf, in flatten order],
                        "shapes": [...], "dtypes": [...], "run": identity of the run,
                        "trained_steps": updates the run is known to have completed}
  step_<t>.npz         leaf_00000, leaf_00001, ...: the flattened leaves after update t

Each file is written to a temporary name and renamed, so a reader (or a resumed
run) never sees half a snapshot; a resumed run rewrites the steps it retrains with
the same names, so nothing is duplicated. ``run`` fingerprints the initial params
and the hyperparameters: a different run pointed at the same directory is refused
instead of mixing its snapshots in.

Asynchrony. `SnapshotWriter.save` enqueues a device-side copy of the params (so
the step may donate its buffers), starts its device-to-host transfer
(``copy_to_host_async``) and returns; a background thread waits for the transfer
and writes the file. At most one snapshot waits behind the one being written
(`save` blocks only if the disk is slower than ``nu0`` training steps). Writers
are flushed at interpreter exit; `flush_all` flushes them explicitly.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import re
import threading
import weakref
import zipfile
from typing import Any, List, NamedTuple, Optional, Sequence

import jax
import numpy as np

FORMAT = "weight_averaging.snapshots/1"
MANIFEST = "manifest.json"
ENV_DIR = "WEIGHT_AVERAGING_SNAPSHOT_DIR"
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


class Manifest(NamedTuple):
  """A snapshot directory's `manifest.json`, parsed."""

  snapshot_every: int
  paths: List[str]
  shapes: List[List[int]]
  dtypes: List[str]
  run: str
  trained_steps: Optional[int]


def _damage(error: BaseException) -> str:
  """What a failed `np.load` says of the file, without numpy's advice to allow pickles (it
  gives that for any file that does not start as an archive)."""
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  return "not a .npz (zip) archive" if "pickle" in text else text


def step_path(directory: str, step: int) -> str:
  return os.path.join(directory, f"step_{int(step)}.npz")


def leaf_paths(tree: Any) -> List[str]:
  """The key path of every leaf of `tree`, in `jax.tree_util` flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(path) for path, _ in flat]


def run_identity(tree: Any, hyperparameters: Any = None) -> str:
  """A fingerprint of the initial params (or any pytree) and the hyperparameters."""
  h = hashlib.sha256()
  for path, leaf in zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree)):
    a = np.asarray(jax.device_get(leaf))
    h.update(path.encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  if hyperparameters is not None:
    items = (hyperparameters._asdict() if hasattr(hyperparameters, "_asdict")
             else dict(hyperparameters))
    h.update(json.dumps(items, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# ----------------------------------------------------------------------------
# Reading.


def read_manifest(directory: str) -> Manifest:
  """The manifest of a snapshot directory; `ValueError` naming the file if it is not one or
  is damaged."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"{directory} is not a snapshot directory (no {MANIFEST}); "
                     "train with the hyperparameter 'snapshot_every' to write one")
  try:
    with open(path) as f:
      raw = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: damaged, not valid JSON ({e})") from None
  if not isinstance(raw, dict) or raw.get("format") != FORMAT:
    found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
  try:
    return Manifest(snapshot_every=int(raw["snapshot_every"]), paths=list(raw["paths"]),
                    shapes=[list(s) for s in raw["shapes"]], dtypes=list(raw["dtypes"]),
                    run=str(raw.get("run", "")), trained_steps=raw.get("trained_steps"))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: damaged manifest, missing or malformed {e}") from None


def snapshot_steps(directory: str) -> List[int]:
  """The steps ``t`` of the complete snapshots in `directory`, ascending."""
  steps = []
  for name in os.listdir(directory):
    m = _STEP_FILE.match(name)
    if m:
      steps.append(int(m.group(1)))
  return sorted(steps)


def load_leaves(directory: str, step: int, manifest: Optional[Manifest] = None
                ) -> List[np.ndarray]:
  """The flattened leaves of snapshot `step`, checked against the manifest.

  Read without pickles (``allow_pickle=False``: a snapshot holds plain arrays, and unpickling a
  file runs code). A file that is not a readable archive of those arrays is a `ValueError`
  naming it as damaged.
  """
  manifest = manifest or read_manifest(directory)
  path = step_path(directory, step)
  try:
    with np.load(path, allow_pickle=False) as data:
      leaves = [data[f"leaf_{i:05d}"] for i in range(len(manifest.paths))]
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: damaged snapshot ({_damage(e)}; its manifest lists "
                     f"{len(manifest.paths)} leaves): rerun the training to write it again, "
                     "or delete it and the later step_*.npz files to replay up to the step "
                     "before") from None
  for i, (leaf, shape, dtype) in enumerate(zip(leaves, manifest.shapes, manifest.dtypes)):
    if list(leaf.shape) != shape or leaf.dtype.str != dtype:
      raise ValueError(f"snapshot {step} in {directory}: leaf {manifest.paths[i]} is "
                       f"{leaf.shape} {leaf.dtype.str}, manifest says {shape} {dtype}")
  return leaves


def load(directory: str, step: int, like: Any, manifest: Optional[Manifest] = None):
  """Snapshot `step` as a pytree structured like `like` (same key paths)."""
  manifest = manifest or read_manifest(directory)
  paths = leaf_paths(like)
  if paths != manifest.paths:
    raise ValueError(f"snapshots in {directory} hold leaves {manifest.paths[:4]}..., "
                     f"the workload's params have {paths[:4]}...: not this workload?")
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, load_leaves(directory, step, manifest))


# ----------------------------------------------------------------------------
# Writing.

_WRITERS: "weakref.WeakSet[SnapshotWriter]" = weakref.WeakSet()


def flush_all() -> None:
  """Waits until every live writer has written everything queued so far."""
  for writer in list(_WRITERS):
    writer.flush()


atexit.register(flush_all)


class SnapshotWriter:
  """Writes snapshots of one run into `directory`, every `every` steps, in a thread.

  Args:
    directory: where to write (created if needed).
    every: ``nu0``; `save` keeps the steps with ``t % every == 0``.
    like: a pytree shaped like what `save` receives (key paths, shapes, dtypes).
    run: `run_identity` of the run; a directory holding another run's snapshots
      is refused.
    enabled: ``False`` on processes other than the first (they hold the same
      replicated params).
  """

  def __init__(self, directory: str, every: int, like: Any, run: str,
               enabled: bool = True):
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
      raise ValueError(f"snapshot_every must be an integer >= 1, got {every!r}")
    self.directory = os.path.abspath(directory)
    self.every = int(every)
    self.enabled = enabled
    leaves = jax.tree_util.tree_leaves(like)
    self._manifest = {
        "format": FORMAT, "snapshot_every": self.every, "paths": leaf_paths(like),
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [np.dtype(x.dtype).str for x in leaves], "run": run,
        "trained_steps": None}
    self._queue: "queue.Queue" = queue.Queue(maxsize=1)
    self._error: Optional[BaseException] = None
    self._thread: Optional[threading.Thread] = None
    if enabled:
      self._open()
    _WRITERS.add(self)

  def _open(self):
    os.makedirs(self.directory, exist_ok=True)
    path = os.path.join(self.directory, MANIFEST)
    if os.path.exists(path):
      old = read_manifest(self.directory)
      mine = self._manifest
      if (old.run != mine["run"] or old.snapshot_every != self.every
          or old.paths != mine["paths"]):
        raise ValueError(
            f"snapshot_dir {self.directory} already holds snapshots of another run "
            f"(run {old.run}, snapshot_every {old.snapshot_every}; this run is "
            f"{mine['run']}, snapshot_every {self.every}): give each run its own "
            "directory, or delete the old one")
      self._manifest["trained_steps"] = old.trained_steps  # a resume
    else:
      _write_json(path, self._manifest)
    for name in os.listdir(self.directory):  # leftovers of a killed writer
      if name.endswith(".tmp"):
        os.remove(os.path.join(self.directory, name))
    self._thread = threading.Thread(target=self._work, name="snapshot-writer",
                                    daemon=True)
    self._thread.start()

  def wants(self, step: int) -> bool:
    return self.enabled and step % self.every == 0

  def save(self, step: int, tree: Any) -> None:
    """Queues snapshot `step` of `tree`: device arrays we own (not donated later)."""
    self._raise()
    if not self.wants(step):
      return
    leaves = jax.tree_util.tree_leaves(tree)
    for leaf in leaves:
      if isinstance(leaf, jax.Array):
        leaf.copy_to_host_async()
    self._queue.put(("save", int(step), leaves))

  def mark_trained(self, steps: int) -> None:
    """Records that the run has completed `steps` updates (readers trust evals up to it)."""
    self._raise()
    if self.enabled:
      self._queue.put(("mark", int(steps), None))

  def flush(self) -> None:
    """Blocks until everything queued is on disk; re-raises a writer error."""
    if self._thread is not None:
      self._queue.join()
    self._raise()

  def _raise(self):
    if self._error is not None:
      error, self._error = self._error, None
      raise RuntimeError(f"writing snapshots to {self.directory} failed") from error

  def _work(self):
    while True:
      kind, step, leaves = self._queue.get()
      try:
        if kind == "save":
          arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
          del leaves
          _write_atomic(step_path(self.directory, step),
                        lambda f, a=arrays: np.savez(f, **a))
        else:
          known = self._manifest["trained_steps"] or 0
          self._manifest["trained_steps"] = max(known, step)
          _write_json(os.path.join(self.directory, MANIFEST), self._manifest)
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e
      finally:
        self._queue.task_done()

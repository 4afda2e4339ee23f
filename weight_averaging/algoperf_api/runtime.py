"""The compiled step of one trial and the state it carries: `TrainState` and `Runtime`.

`builder.build_submission` states the contract (the eval swap, the holding flag,
snapshots, model-state averaging, restores); this module implements it. One
training step is one compiled program: gradient, optimizer update and the
averager's sample fuse into it.

What is averaged, the *tracked* tree: the params, or with
``averaging_model_state='average'`` the pair ``(params, model_state)``. The
averager's state in `TrainState` is its state over that tree, and the stash holds
that tree's live value during an eval. With ``'live'`` (the default) the tracked
tree is the params alone, so the state is exactly what it was before the option.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging import averagers
from weight_averaging import snapshots as snapshots_lib
from weight_averaging.algoperf_api import restore
from weight_averaging.optimizers import common

AXIS = "batch"  # the mesh axis (jit) and the mapped axis (pmap) the runner uses


class TrainState(NamedTuple):
  """Element 0 of ``optimizer_state``: every array a resume needs.

  optimizer: the optax state.
  averager: the averager's state over the tracked tree (module docstring), ``()``
    without averaging.
  stash: the live tracked tree while ``holding`` is 1; a scratch buffer of its
    size otherwise; ``()`` without averaging.
  holding: int32, 1 from `prepare_for_eval` until the next `update_params`.
  """

  optimizer: Any
  averager: Any
  stash: Any
  holding: jnp.ndarray


def batch_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The jit runner's mesh: one axis ``'batch'`` over every device (or `devices`)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def _train_mode():
  """`spec.ForwardPassMode.TRAIN` of whichever algoperf is installed."""
  for module in ("algoperf.spec", "algorithmic_efficiency.spec"):
    try:
      return importlib.import_module(module).ForwardPassMode.TRAIN
    except ImportError:
      continue
  # No algoperf: workloads compare the mode by its member's name, as the embedded one does.
  return "TRAIN"


def _takes_dropout(model_fn) -> bool:
  try:
    return "dropout_rate" in inspect.signature(model_fn).parameters
  except (TypeError, ValueError):
    return False


def tracked(params, model_state, average_model_state: bool):
  """The tree the averager samples: `params`, or ``(params, model_state)``."""
  return (params, model_state) if average_model_state else params


def make_train_step(workload, optimizer: optax.GradientTransformation,
                    averager: Optional[averagers.Averager], label_smoothing: float,
                    dropout_rate: Optional[float], pmap: bool,
                    average_model_state: bool):
  """``step(state, params, model_state, batch, rng) -> (state, params, model_state, aux)``.

  The mean loss over the global batch's valid examples, its gradient with respect to
  the floating params, the optimizer's update, then the averager samples the tracked
  tree *after* this update (integer leaves pass through live).
  """
  mode = _train_mode()
  model_kwargs = {"update_batch_norm": True}
  if dropout_rate is not None and _takes_dropout(workload.model_fn):
    model_kwargs["dropout_rate"] = dropout_rate

  def train_step(state, params, model_state, batch, rng):
    trainable = averagers.floating_part(params)

    def loss_fn(t):
      logits, new_model_state = workload.model_fn(
          averagers.with_live(params, t), batch, model_state, mode, rng, **model_kwargs)
      losses = workload.loss_fn(label_batch=batch["targets"], logits_batch=logits,
                                mask_batch=batch.get("weights"),
                                label_smoothing=label_smoothing)
      return losses["summed"], (losses["n_valid_examples"], new_model_state)

    (summed, (n_valid, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    if pmap:
      # Sum, then divide by the global count: exact with masked (padded) batches,
      # where a mean of per-device means would weight devices unequally.
      summed, n_valid, grads = jax.lax.psum((summed, n_valid, grads), AXIS)
    grads = jax.tree_util.tree_map(lambda g: g / n_valid, grads)
    updates, opt_state = optimizer.update(grads, state.optimizer, trainable)
    new_params = averagers.with_live(params, optax.apply_updates(trainable, updates))
    avg_state = (averager.update(state.averager, tracked(
        new_params, new_model_state, average_model_state))
                 if averager is not None else state.averager)
    new_state = TrainState(opt_state, avg_state, state.stash, jnp.zeros_like(state.holding))
    return new_state, new_params, new_model_state, (summed / n_valid,
                                                    common.global_norm(grads))

  return train_step


class Runtime:
  """Element 1 of ``optimizer_state``: the compiled functions of one trial.

  Calling it is the optimizer's ``update`` (optax's signature), so it still reads
  as the ``update_fn`` AlgoPerf expects in that slot.
  """

  def __init__(self, api: str, workload, optimizer: optax.GradientTransformation,
               averager: Optional[averagers.Averager], label_smoothing: float,
               dropout_rate: Optional[float], devices: Optional[Sequence[Any]] = None,
               snapshots: Optional[snapshots_lib.SnapshotWriter] = None,
               average_model_state: bool = False):
    self.api = api
    self.snapshots = snapshots
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.optimizer = optimizer
    self.averager = averager
    self.average_model_state = averager is not None and average_model_state
    # The official runner attaches the trial's metrics logger to the workload *after*
    # `init_optimizer_state`, and a new one each trial: look it up when logging.
    self._workload = workload
    # The flag array this runtime returned last, and whether it says "holding".
    self._flag = None
    self._holding = False
    self._state_shardings = None
    self._expected = None  # shapes of (state, params, model_state) as initialised
    pmap = api == "pmap"
    train_step = make_train_step(workload, optimizer, averager, label_smoothing,
                                 dropout_rate, pmap, self.average_model_state)

    def init(params, model_state):
      tree = tracked(params, model_state, self.average_model_state)
      return TrainState(
          optimizer=optimizer.init(averagers.floating_part(params)),
          averager=averager.init(tree) if averager is not None else (),
          stash=(jax.tree_util.tree_map(jnp.zeros_like, tree)
                 if averager is not None else ()),
          holding=jnp.zeros([], jnp.int32))

    def average(avg_state, live):
      return averager.average(avg_state, live)

    if pmap:
      kw = {"axis_name": AXIS, "devices": self.devices}
      self._init = jax.pmap(init, **kw)
      self._step = jax.pmap(train_step, donate_argnums=(0, 1, 2), **kw)
      self._average = jax.pmap(average, **kw)
      return
    mesh = batch_mesh(devices)
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    self._init_fn = init
    self._train_step = train_step
    self._average = jax.jit(average, out_shardings=self._replicated)

  # -- jit needs the state's shardings, which depend on its shapes.

  def _jit_shardings(self, params, model_state):
    abstract = jax.eval_shape(self._init_fn, params, model_state)
    r = self._replicated
    avg = (self.averager.state_shardings(abstract.averager)
           if self.averager is not None else ())
    return TrainState(optimizer=r, averager=avg, stash=r, holding=r)

  def init(self, params, model_state=None) -> TrainState:
    """The initial `TrainState`; compiles the step (jit) for these shapes."""
    if self.api == "pmap":
      state = self._init(params, model_state)
    else:
      shardings = self._jit_shardings(params, model_state)
      self._state_shardings = shardings
      r = self._replicated
      self._init = jax.jit(self._init_fn, out_shardings=shardings)
      self._step = jax.jit(
          self._train_step, donate_argnums=(0, 1, 2),
          in_shardings=(shardings, r, r, self._batch_sharding, r),
          out_shardings=(shardings, r, r, r))
      state = self._init(params, model_state)
    self._expected = (restore.shapes(state), restore.shapes(params),
                      restore.shapes(model_state))
    self._remember(state, holding=False)
    return state

  # -- The holding flag, and states this runtime did not produce.

  @staticmethod
  def _flag_like(flag, value: int):
    """A new flag array holding `value`, laid out like `flag` (no compilation)."""
    host = np.full(np.shape(flag), value, np.int32)
    if isinstance(flag, jax.Array):
      return jax.device_put(host, flag.sharding)
    return host  # a restored host array: the compiled step places it

  def _remember(self, state: TrainState, holding: bool):
    self._flag, self._holding = state.holding, holding

  def adopt(self, state: TrainState, params=None, model_state=None):
    """``(state, holding, params, model_state)``, a restored state made this runtime's.

    A state this runtime returned last passes as it is. Any other (the first call
    after a checkpoint restore) has the device axis of the runner's restore taken
    off each of the three trees that carry it (`restore.strip_device_axis`),
    every leaf placed where the compiled step expects it, and its flag read once.
    """
    if state.holding is self._flag:
      return state, self._holding, params, model_state
    want_state, want_params, want_model_state = self._expected
    state, _ = restore.strip_device_axis(state, want_state, "optimizer state")
    params, _ = restore.strip_device_axis(params, want_params, "params")
    model_state, _ = restore.strip_device_axis(model_state, want_model_state,
                                               "model state")
    if self.api == "jit":
      state = jax.device_put(state, self._state_shardings)
      params, model_state = jax.device_put((params, model_state), self._replicated)
    else:
      n = len(self.devices)
      for leaf in jax.tree_util.tree_leaves(state):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
          raise ValueError(
              "pmap optimizer state leaves need a leading axis of size "
              f"{n} (the local devices), got shape {np.shape(leaf)}; replicate "
              "the restored state as the runner does.")
    holding = bool(np.asarray(jax.device_get(state.holding)).reshape(-1)[0])
    return state, holding, params, model_state

  # -- The three operations.

  def update(self, state: TrainState, params, model_state, batch, rng, global_step):
    state, holding, params, model_state = self.adopt(state, params, model_state)
    if holding:
      # Train from the live tree; park the runner's (averaged) one in the slot.
      live = state.stash
      state = state._replace(stash=tracked(params, model_state, self.average_model_state))
      params, model_state = live if self.average_model_state else (live, model_state)
    if self.api == "pmap":
      rng = jax.random.split(rng, len(self.devices))
    state, params, model_state, (loss, grad_norm) = self._step(
        state, params, model_state, batch, rng)
    self._remember(state, holding=False)
    if self.snapshots is not None and self.snapshots.wants(global_step):
      # The params after update t = global_step: what an averager samples at t.
      self.snapshots.save(global_step, one_copy(
          {"params": params, "model_state": model_state}, self.api))
    logger = getattr(self._workload, "metrics_logger", None)
    if logger is not None and global_step % 100 == 0:
      # Every 100 steps, like the reference: reading the loss waits for the step.
      logger.append_scalar_metrics(
          {"loss": float(np.asarray(loss).reshape(-1)[0]),
           "grad_norm": float(np.asarray(grad_norm).reshape(-1)[0])}, global_step)
    return state, params, model_state

  def prepare_for_eval(self, state: TrainState, params, model_state=None,
                       global_step=None):
    """``(state, params, model_state)`` to evaluate: the averages, the live ones stashed."""
    if self.snapshots is not None and global_step is not None:
      self.snapshots.mark_trained(global_step)
    if self.averager is None:
      return state, params, model_state
    state, holding, params, model_state = self.adopt(state, params, model_state)
    if not holding:
      state = state._replace(stash=tracked(params, model_state, self.average_model_state),
                             holding=self._flag_like(state.holding, 1))
    # A fresh buffer: the runner passes it to the next `update_params`, which
    # donates it; it must not alias anything in the state.
    averaged = self._average(state.averager, state.stash)
    self._remember(state, holding=True)
    if self.average_model_state:
      return (state,) + tuple(averaged)
    return state, averaged, model_state

  def __call__(self, updates, state, params=None):
    return self.optimizer.update(updates, state, params)


@functools.partial(jax.jit, static_argnums=1)
def _fresh_copy(leaves, shapes):
  # `jnp.array(copy=True)` keeps jit from handing back the input buffer itself.
  return [jnp.reshape(jnp.array(x, copy=True), s) for x, s in zip(leaves, shapes)]


def one_copy(tree, api: str):
  """One device's copy of replicated `tree` (``x[0]`` under pmap), in fresh buffers.

  The copy is enqueued on the device, so it is ordered before the next step that
  donates the originals, and nothing waits for it here.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = list(leaves)
  picked, shapes, where = [], [], []
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array) and (api == "pmap" or x.sharding.is_fully_replicated):
      picked.append(x.addressable_shards[0].data)
      shapes.append(tuple(x.shape[1:]) if api == "pmap" else tuple(x.shape))
      where.append(i)
    elif isinstance(x, jax.Array):  # not replicated: the writer's host copy gathers it
      out[i] = jnp.array(x, copy=True)
  for i, x in zip(where, _fresh_copy(picked, tuple(shapes)) if picked else ()):
    out[i] = x
  return jax.tree_util.tree_unflatten(treedef, out)

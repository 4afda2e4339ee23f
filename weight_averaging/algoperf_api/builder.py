"""Turns (optimizer, averager) into AlgoPerf's five submission functions, for both APIs.

``api='jit'`` follows algoperf main at 2c90454f ("v0.6"): params and optimizer state
replicated over ``Mesh(jax.devices(), ('batch',))``, batches sharded along their
first axis, one `jax.jit` step that donates its state. ``api='pmap'`` follows
algoperf main at fb2f492a: every array carries a leading device axis and the step
is a `jax.pmap` over the axis ``'batch'``.

``optimizer_state`` is ``(TrainState, runtime)``. The runner saves only the first
element, so everything a resume needs is an array in `TrainState`: the optimizer
state, the averager state, the stashed live params and the ``holding`` flag. The
second element, a `Runtime`, holds the compiled functions of one trial; the runner
re-attaches it from `init_optimizer_state` after a restore.

The eval swap. The runner evaluates the params `prepare_for_eval` returns *and then
keeps training from them*. So `prepare_for_eval` moves the live params into
``TrainState.stash``, sets ``holding = 1`` and returns a fresh copy of the average;
the next `update_params` trains from the stash instead of the params it is handed,
which it parks in the stash slot (the slot always holds one params-sized buffer, so
the pytree keeps its structure). Both moves are Python re-bindings: no array is
copied. While ``holding`` is 1 a second `prepare_for_eval` leaves the stash alone
and recomputes the average from it, so the live params are never overwritten by an
average.

Snapshots (opt-in, ``snapshot_every`` = ``nu0``; `hp.snapshot_config`). After update
``t`` with ``t % nu0 == 0`` the live params (and model state) go to
`snapshots_lib.SnapshotWriter`: one copy (device 0's shard of the replicated
params, ``x[0]`` under pmap) is copied on the device so the next step may donate
its buffers, its transfer to the host is started, and a thread writes it. Every
`prepare_for_eval` records how many updates the run has completed. Works with or
without an averager: offline averaging of a plain run is the paper's main use.

Integer and boolean params leaves are neither trained (the gradient is taken with
respect to the floating leaves only, `averagers.floating_part`) nor averaged: they
pass through every step and every eval as the model has them.

Reading ``holding`` from the device would make every step wait for the one before.
The runtime instead remembers which flag array it returned last and what it holds;
only a state it has not seen (the first call after a checkpoint restore) is read
back from the device, and then also placed where the compiled step expects it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging import snapshots as snapshots_lib
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import batch_sizes, memory, names, recipes
from weight_averaging.optimizers import common

APIS = ("jit", "pmap")
AXIS = "batch"  # the mesh axis (jit) and the mapped axis (pmap) the runner uses

MakeOptimizer = Callable[[Any, int, recipes.Distribution], optax.GradientTransformation]
MakeAverager = Callable[[Any, hp.AveragingConfig, placement_lib.Placement],
                        averagers.Averager]


class TrainState(NamedTuple):
  """Element 0 of ``optimizer_state``: every array a resume needs.

  optimizer: the optax state.
  averager: the averager's state, ``()`` without averaging.
  stash: the live params while ``holding`` is 1; a params-sized scratch buffer
    otherwise; ``()`` without averaging.
  holding: int32, 1 from `prepare_for_eval` until the next `update_params`.
  """

  optimizer: Any
  averager: Any
  stash: Any
  holding: jnp.ndarray


def batch_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The jit runner's mesh: one axis ``'batch'`` over every device (or `devices`)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def resolve_placement(name: str, api: str,
                      devices: Optional[Sequence[Any]] = None
                      ) -> placement_lib.Placement:
  """The `Placement` for ``averaging_placement`` under `api`, or a `ValueError`.

  Under pmap the runner checkpoints ``x[0]`` of every leaf and restores by
  replicating it. A ``'sharded'`` state keeps only device 0's slice in ``x[0]``,
  so a resume would silently lose the rest of the average: refused. ``'host'``
  is refused too: a pmapped step reads and writes device memory only, so the
  state would have to be moved to the host and back around every step.
  """
  if api == "jit":
    return placement_lib.get(name, mesh=batch_mesh(devices))
  if name == "replicated":
    return placement_lib.get("replicated", axis_name=AXIS)
  if name == "sharded":
    raise ValueError(
        "hyperparameter 'averaging_placement' = 'sharded' is not supported with the "
        "pmap API: its checkpoints keep x[0] of every leaf, which for a sharded "
        "averaging state is only device 0's slice, so a resume would lose the rest "
        "of the average. Use 'replicated', or the jit API for 'sharded'.")
  raise ValueError(
      f"hyperparameter 'averaging_placement' = {name!r} is not supported with the "
      "pmap API: a pmapped step works on device memory only, so a host-resident "
      "state would be copied to the device and back around every step. Use "
      "'replicated', or the jit API for 'host'.")


def distribution(api: str, devices: Optional[Sequence[Any]] = None
                 ) -> recipes.Distribution:
  """The pmap axis (pmap API) or the batch mesh (jit API) a step runs over."""
  if api == "pmap":
    return recipes.Distribution(axis_name=AXIS)
  return recipes.Distribution(mesh=batch_mesh(devices), mesh_axis_name=AXIS)


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


class Runtime:
  """Element 1 of ``optimizer_state``: the compiled functions of one trial.

  Calling it is the optimizer's ``update`` (optax's signature), so it still reads
  as the ``update_fn`` AlgoPerf expects in that slot.
  """

  def __init__(self, api: str, workload, optimizer: optax.GradientTransformation,
               averager: Optional[averagers.Averager], label_smoothing: float,
               dropout_rate: Optional[float], devices: Optional[Sequence[Any]] = None,
               snapshots: Optional[snapshots_lib.SnapshotWriter] = None):
    self.api = api
    self.snapshots = snapshots
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.optimizer = optimizer
    self.averager = averager
    self.logger = getattr(workload, "metrics_logger", None)
    # The flag array this runtime returned last, and whether it says "holding".
    self._flag = None
    self._holding = False
    self._state_shardings = None

    mode = _train_mode()
    model_kwargs = {"update_batch_norm": True}
    if dropout_rate is not None and _takes_dropout(workload.model_fn):
      model_kwargs["dropout_rate"] = dropout_rate
    pmap = api == "pmap"

    def train_step(state, params, model_state, batch, rng):
      trainable = averagers.floating_part(params)

      def loss_fn(t):
        logits, new_model_state = workload.model_fn(
            averagers.with_live(params, t), batch, model_state, mode, rng,
            **model_kwargs)
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
      # The averager samples the params *after* this step's update.
      avg_state = (averager.update(state.averager, new_params)
                   if averager is not None else state.averager)
      new_state = TrainState(opt_state, avg_state, state.stash,
                             jnp.zeros_like(state.holding))
      return new_state, new_params, new_model_state, (summed / n_valid,
                                                      common.global_norm(grads))

    def init(params):
      return TrainState(
          optimizer=optimizer.init(averagers.floating_part(params)),
          averager=averager.init(params) if averager is not None else (),
          stash=(jax.tree_util.tree_map(jnp.zeros_like, params)
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
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    self._replicated = replicated
    self._init_fn = init
    self._train_step = train_step
    self._batch_sharding = batch_sharding
    self._average = jax.jit(average, out_shardings=replicated)

  # -- jit needs the state's shardings, which depend on its shapes.

  def _jit_shardings(self, params):
    abstract = jax.eval_shape(self._init_fn, params)
    r = self._replicated
    avg = (self.averager.state_shardings(abstract.averager)
           if self.averager is not None else ())
    return TrainState(optimizer=r, averager=avg, stash=r, holding=r)

  def init(self, params) -> TrainState:
    if self.api == "pmap":
      state = self._init(params)
    else:
      shardings = self._jit_shardings(params)
      self._state_shardings = shardings
      r = self._replicated
      self._init = jax.jit(self._init_fn, out_shardings=shardings)
      self._step = jax.jit(
          self._train_step, donate_argnums=(0, 1, 2),
          in_shardings=(shardings, r, r, self._batch_sharding, r),
          out_shardings=(shardings, r, r, r))
      state = self._init(params)
    self._remember(state, holding=False)
    return state

  # -- The holding flag.

  @staticmethod
  def _flag_like(flag, value: int):
    """A new flag array holding `value`, laid out like `flag` (no compilation)."""
    host = np.full(np.shape(flag), value, np.int32)
    if isinstance(flag, jax.Array):
      return jax.device_put(host, flag.sharding)
    return host  # a restored host array: the compiled step places it

  def _remember(self, state: TrainState, holding: bool):
    self._flag, self._holding = state.holding, holding

  def adopt(self, state: TrainState):
    """``(state, holding)``; a state this runtime did not produce is placed first."""
    if state.holding is self._flag:
      return state, self._holding
    # A restored checkpoint: put every leaf where the compiled step expects it,
    # then read the flag once.
    if self.api == "jit":
      state = jax.device_put(state, self._state_shardings)
    else:
      n = len(self.devices)
      for leaf in jax.tree_util.tree_leaves(state):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
          raise ValueError(
              "pmap optimizer state leaves need a leading axis of size "
              f"{n} (the local devices), got shape {np.shape(leaf)}; replicate "
              "the restored state as the runner does.")
    holding = bool(np.asarray(jax.device_get(state.holding)).reshape(-1)[0])
    return state, holding

  # -- The three operations.

  def update(self, state: TrainState, params, model_state, batch, rng, global_step):
    state, holding = self.adopt(state)
    if holding:
      # Train from the live params; park the runner's (averaged) params in the slot.
      params, state = state.stash, state._replace(stash=params)
    if self.api == "pmap":
      rng = jax.random.split(rng, len(self.devices))
    state, params, model_state, (loss, grad_norm) = self._step(
        state, params, model_state, batch, rng)
    self._remember(state, holding=False)
    if self.snapshots is not None and self.snapshots.wants(global_step):
      # The params after update t = global_step: what an averager samples at t.
      self.snapshots.save(global_step, one_copy(
          {"params": params, "model_state": model_state}, self.api))
    if self.logger is not None and global_step % 100 == 0:
      # Every 100 steps, like the reference: reading the loss waits for the step.
      self.logger.append_scalar_metrics(
          {"loss": float(np.asarray(loss).reshape(-1)[0]),
           "grad_norm": float(np.asarray(grad_norm).reshape(-1)[0])}, global_step)
    return state, params, model_state

  def prepare_for_eval(self, state: TrainState, params, global_step=None):
    if self.snapshots is not None and global_step is not None:
      self.snapshots.mark_trained(global_step)
    if self.averager is None:
      return state, params
    state, holding = self.adopt(state)
    if not holding:
      state = state._replace(stash=params, holding=self._flag_like(state.holding, 1))
    # A fresh buffer: the runner passes it to the next `update_params`, which
    # donates it; it must not alias anything in the state.
    averaged = self._average(state.averager, state.stash)
    self._remember(state, holding=True)
    return state, averaged

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


def snapshot_writer(hyperparameters, api: str, model_params, model_state
                    ) -> Optional[snapshots_lib.SnapshotWriter]:
  """The run's `SnapshotWriter`, or ``None`` without ``snapshot_every``."""
  cfg = hp.snapshot_config(hyperparameters)
  if cfg is None:
    return None
  like = {"params": model_params, "model_state": model_state}  # one copy, on the host
  like = jax.device_get(placement_lib.pmap_unreplicate(like) if api == "pmap" else like)
  return snapshots_lib.SnapshotWriter(
      cfg.directory, cfg.every, like,
      run=snapshots_lib.run_identity(like, hyperparameters),
      enabled=jax.process_index() == 0)


def build_submission(make_optimizer: MakeOptimizer,
                     make_averager: Optional[MakeAverager] = None,
                     api: str = "jit",
                     devices: Optional[Sequence[Any]] = None) -> types.SimpleNamespace:
  """The five AlgoPerf API functions for `make_optimizer` (+ `make_averager`).

  Args:
    make_optimizer: ``(hyperparameters, step_hint, distribution) -> optax
      transform``; ``distribution`` (`recipes.Distribution`): the pmap axis or mesh.
    make_averager: ``(hyperparameters, averaging, placement) -> Averager``, given
      `hp.averaging_config` (read once, here) and its placement for `api`; ``None``
      for no averaging (then `prepare_for_eval` is the identity).
    api: ``'jit'`` (algoperf 2c90454f) or ``'pmap'`` (algoperf fb2f492a).
    devices: the devices to run on; ``None`` (what the runner needs) means all of
      them (`jax.devices()` for jit, `jax.local_devices()` for pmap).

  `init_optimizer_state` refuses hyperparameters no submission here reads and logs
  those only others read (`names.checked`: recipes read through `hp.lookup`).

  Returns:
    A namespace with ``get_batch_size``, ``init_optimizer_state``,
    ``update_params``, ``prepare_for_eval`` and ``data_selection``, with the
    signatures of ``algoperf/spec.py``.
  """
  if api not in APIS:
    raise ValueError(f"api must be one of {APIS}, got {api!r}")

  def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
    del rng
    with names.checked(hyperparameters):  # unknown names refused, unused ones logged
      base = hp.training_config(hyperparameters)
      writer = snapshot_writer(hyperparameters, api, model_params, model_state)
      optimizer = make_optimizer(hyperparameters, workload.step_hint,
                                 distribution(api, devices))
      averager = None
      if make_averager is not None:
        # Fractions of the step hint become steps here, once.
        averaging = hp.averaging_config(hyperparameters, workload.step_hint)
        where = memory.placement_for(  # decides 'auto' from the bytes and the device
            averaging.placement, api, model_params, optimizer,
            functools.partial(make_averager, hyperparameters, averaging), devices)
        averager = make_averager(hyperparameters, averaging, resolve_placement(where, api, devices))
    runtime = Runtime(api, workload, optimizer, averager, base.label_smoothing,
                      base.dropout_rate, devices, snapshots=writer)
    return runtime.init(model_params), runtime

  def update_params(workload, current_param_container, current_params_types,
                    model_state, hyperparameters, batch, loss_type, optimizer_state,
                    eval_results, global_step, rng, train_state=None):
    del workload, current_params_types, hyperparameters, loss_type, eval_results
    del train_state
    state, runtime = optimizer_state
    state, params, model_state = runtime.update(
        state, current_param_container, model_state, batch, rng, global_step)
    return (state, runtime), params, model_state

  def prepare_for_eval(workload, current_param_container, current_params_types,
                       model_state, hyperparameters, loss_type, optimizer_state,
                       eval_results, global_step, rng):
    del workload, current_params_types, hyperparameters, loss_type, eval_results
    del rng
    state, runtime = optimizer_state
    state, params = runtime.prepare_for_eval(state, current_param_container,
                                             global_step)
    # Model state (batch-norm statistics) stays live, as in the paper.
    return (state, runtime), params, model_state

  def data_selection(workload, input_queue, optimizer_state, current_param_container,
                     model_state, hyperparameters, global_step, rng):
    del workload, optimizer_state, current_param_container, model_state
    del hyperparameters, global_step, rng
    return next(input_queue)

  init_optimizer_state.algoperf_api = api  # runners of the other API refuse it by name
  return types.SimpleNamespace(
      get_batch_size=batch_sizes.get_batch_size,
      init_optimizer_state=init_optimizer_state,
      update_params=update_params,
      prepare_for_eval=prepare_for_eval,
      data_selection=data_selection)

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
re-attaches it from `init_optimizer_state` after a restore. Both live in `runtime`.

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

The model state (batch-norm statistics; ``averaging_model_state``,
`hp.averaging_config`). ``'live'`` (the default, the paper's): the averaged params
are evaluated with the live run's statistics; `prepare_for_eval` hands back the model
state it was given, and the state is exactly what it was before the option.
``'average'``: the averager averages the pair ``(params, model_state)``, so the
model state is sampled at the same steps as the params (``averager.update`` after
every step) and averaged the same way (integer leaves pass through live);
`prepare_for_eval` returns the averaged model state (the API allows it) and stashes
the live one with the live params, and the next `update_params` trains from both.
``TrainState.averager`` is then the averager's state over the pair and ``stash``
the pair. A model state of ``None`` or ``{}`` has nothing to average.

Reading ``holding`` from the device would make every step wait for the one before.
The runtime instead remembers which flag array it returned last and what it holds;
only a state it has not seen (the first call after a checkpoint restore) is read
back from the device, and then also placed where the compiled step expects it.

Restores through the official runner. AlgoPerf's JAX restore hands back the
optimizer state's first element, the params and the model state each with an extra
leading device axis (``flax.jax_utils.replicate``, `restore`). On the first call
after it (`update_params`, or `prepare_for_eval`) each of the three trees is compared
with the shapes `init_optimizer_state` produced: one of shape ``(n, *initialised)``
for one ``n`` is cut to ``x[0]``, then every leaf is placed where the compiled step
expects it, and the params and model state returned are clean, so the run continues
exactly as if it had not been interrupted. Under the jit API (2c90454f) that is
always the case after a restore; under the pmap API (fb2f492a) the runner saves
``x[0]`` of the state, which already carries the device axis, so the restored shapes
are the initialised ones and nothing is cut. A tree in neither layout is a
`ValueError` naming the leaf and both shapes.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional, Sequence

import jax
import optax

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging import snapshots as snapshots_lib
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import batch_sizes, memory, names, recipes
# The runtime's names, importable from here as before the runtime had its own module.
from weight_averaging.algoperf_api.runtime import (AXIS, Runtime, TrainState, tracked,  # noqa: F401
                                                   batch_mesh, one_copy)

APIS = ("jit", "pmap")

MakeOptimizer = Callable[[Any, int, recipes.Distribution], optax.GradientTransformation]
MakeAverager = Callable[[Any, hp.AveragingConfig, placement_lib.Placement],
                        averagers.Averager]


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


def build_averager(make_averager: MakeAverager, hyperparameters, step_hint: int,
                   api: str, model_params, model_state, optimizer,
                   devices: Optional[Sequence[Any]] = None):
  """``(averager, hp.AveragingConfig)``: the averaging read once, placed for `api`.

  Fractions of the step hint become steps here; ``'auto'`` placement is decided
  from the bytes of what is averaged and the device (`memory.placement_for`).
  """
  averaging = hp.averaging_config(hyperparameters, step_hint)
  where = memory.placement_for(
      averaging.placement, api, model_params, optimizer,
      functools.partial(make_averager, hyperparameters, averaging), devices,
      tracked=tracked(model_params, model_state, averaging.model_state == "average"))
  return (make_averager(hyperparameters, averaging, resolve_placement(where, api, devices)),
          averaging)


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
      averager, averaging = (None, None) if make_averager is None else build_averager(
          make_averager, hyperparameters, workload.step_hint, api, model_params,
          model_state, optimizer, devices)
    runtime = Runtime(api, workload, optimizer, averager, base.label_smoothing,
                      base.dropout_rate, devices, snapshots=writer,
                      average_model_state=(averaging is not None
                                           and averaging.model_state == "average"))
    return runtime.init(model_params, model_state), runtime

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
    # The model state comes back live ('live', the paper's) or averaged ('average').
    state, params, model_state = runtime.prepare_for_eval(
        state, current_param_container, model_state, global_step)
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

"""Schedule-free AdamW (optax) as a self-tuning AlgoPerf jit-API submission: a comparison.

Not one of this package's submissions. It rebuilds the self-tuning board's leader
from `optax.contrib.schedule_free_adamw` so that our self-tuning entries can be
measured against it with the same data, model, loss and runner
(`benchmarks/vs_schedule_free.py`). Self-tuning only: `hyperparameters` must be
None (``--tuning_ruleset=self``).

The point, and what is done with it, is the AlgoPerf working group's JAX entry
(mlcommons/submissions_algorithms, ``submissions/self_tuning/
schedule_free_adamw_jax_v2/submission.py`` at 7b05219f, its ``HPARAMS``):

* learning rate 0.0025 after a linear warm-up over
  ``int(warmup_factor * step_hint * 0.75)`` steps, constant afterwards (no schedule,
  no horizon); ``b1 = 1 - one_minus_beta1``, ``b2``, ``eps``, decoupled weight decay,
  ``weight_lr_power`` 2;
* the entry reads label smoothing and gradient clipping with ``hasattr`` on
  ``hyperparameters``, which is None under self-tuning: label smoothing 0 (its
  ``HPARAMS['label_smoothing']`` 0.2 is never read) and no clipping. It passes no
  ``dropout_rate`` to ``model_fn``: the model's default;
* the gradient is that of the mean loss over the batch's valid examples,
  ``grad(summed) / n_valid``.

Schedule-free keeps ``y`` (where gradients are taken: the params the runner holds
while training) and ``z`` (in the optax state), and evaluates at
``x = (y - (1 - b1) z) / b1`` (`optax.contrib.schedule_free_eval_params`).
`prepare_for_eval` returns a fresh ``x`` and keeps ``y`` in the state by reference
(``holding = 1``); the next `update_params` trains from that ``y`` and parks the
runner's ``x`` in its slot, so training continues from exactly the live params.
The entry instead donates ``y`` to compute ``x`` and rebuilds
``y = (1 - b1) z + b1 x`` after the eval: equal up to rounding, one params buffer
smaller. The entry also recomputes batch-norm statistics at ``x`` every 3 steps;
the embedded workload has no model state, and `init_optimizer_state` refuses a
workload that has one rather than evaluate wrong statistics.

One jitted step (gradient and update, the state and params donated), replicated
over the runner's batch mesh with the batch sharded along it, as this package's own
jit submissions step; the holding flag is tracked on the host so that no step
waits for the previous one. Needs optax >= 0.2.3: AlgoPerf's pin (0.2.2) lacks
`optax.contrib.schedule_free_adamw`; ``.venvs/latest`` has it.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from weight_averaging import algoperf_api

try:
  from optax.contrib import schedule_free_adamw, schedule_free_eval_params
except ImportError as e:  # pragma: no cover - depends on the stack
  raise ImportError(
      f"the schedule-free comparison submission needs optax >= 0.2.3 "
      f"(optax.contrib.schedule_free_adamw); this environment has optax "
      f"{optax.__version__}. Run it with .venvs/latest/bin/python.") from e

# The working group's self-tuning point (schedule_free_adamw_jax_v2, `HPARAMS`).
# label_smoothing is listed there but never read under self-tuning (see above).
HPARAMS = {
    "learning_rate": 0.0025,
    "one_minus_beta1": 0.1,
    "beta2": 0.9955159689799007,
    "weight_decay": 0.08121616522670176,
    "warmup_factor": 0.02,
    "weight_lr_power": 2,
    "eps": 1e-8,
}
# The entry's warm-up runs over this fraction of the step hint's warm-up_factor
# share: ``int(warmup_factor * step_hint * 0.75)``.
WARMUP_STEP_HINT_FACTOR = 0.75


class SFState(NamedTuple):
  """Element 0 of ``optimizer_state``: every array a resume needs.

  optimizer: optax's `ScheduleFreeState` (``z``, ``b1``, the weight sum, the second
    moment).
  live: ``y`` while ``holding`` is 1; a params-sized scratch buffer otherwise.
  holding: int32, 1 from `prepare_for_eval` until the next `update_params`.
  """

  optimizer: Any
  live: Any
  holding: jnp.ndarray


def _train_mode():
  """`spec.ForwardPassMode.TRAIN` where algoperf is installed, as the builder passes."""
  try:
    return importlib.import_module("algoperf.spec").ForwardPassMode.TRAIN
  except ImportError:
    return "train"  # no algoperf; the embedded workload applies no default dropout


def make_optimizer(step_hint: int) -> optax.GradientTransformation:
  """`optax.contrib.schedule_free_adamw` at `HPARAMS` for a workload of `step_hint`."""
  return schedule_free_adamw(
      learning_rate=HPARAMS["learning_rate"],
      warmup_steps=int(HPARAMS["warmup_factor"] * step_hint * WARMUP_STEP_HINT_FACTOR),
      b1=1.0 - HPARAMS["one_minus_beta1"], b2=HPARAMS["beta2"], eps=HPARAMS["eps"],
      weight_decay=HPARAMS["weight_decay"], weight_lr_power=HPARAMS["weight_lr_power"])


class Runtime:
  """Element 1 of ``optimizer_state``: the compiled step and eval-point functions.

  Calling it is the optimizer's ``update`` (optax's signature), as AlgoPerf expects
  in that slot.
  """

  def __init__(self, workload, optimizer: optax.GradientTransformation):
    self.optimizer = optimizer
    mesh = algoperf_api.batch_mesh()
    r = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(algoperf_api.builder.AXIS))
    mode = _train_mode()

    def train_step(state: SFState, params, batch, rng):
      def loss_fn(p):
        logits, _ = workload.model_fn(p, batch, None, mode, rng, update_batch_norm=True)
        losses = workload.loss_fn(label_batch=batch["targets"], logits_batch=logits,
                                  mask_batch=batch.get("weights"), label_smoothing=0.0)
        return losses["summed"], losses["n_valid_examples"]

      (_, n_valid), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      grads = jax.tree_util.tree_map(lambda g: g / n_valid, grads)
      updates, opt_state = optimizer.update(grads, state.optimizer, params)
      return (state._replace(optimizer=opt_state, holding=jnp.zeros_like(state.holding)),
              optax.apply_updates(params, updates))

    def init(params):
      return SFState(optimizer.init(params), jax.tree_util.tree_map(jnp.zeros_like, params),
                     jnp.zeros([], jnp.int32))

    self._init = jax.jit(init, out_shardings=r)
    self._step = jax.jit(train_step, donate_argnums=(0, 1),
                         in_shardings=(r, r, batch_sharding, r), out_shardings=(r, r))
    self._eval_params = jax.jit(schedule_free_eval_params, out_shardings=r)
    self._replicated = r
    self._flag, self._holding = None, False  # the flag array returned last, its value

  def init(self, params) -> SFState:
    state = self._init(params)
    self._flag, self._holding = state.holding, False
    return state

  def adopt(self, state: SFState):
    """``(state, holding)``; a state this runtime did not return (a restored
    checkpoint) is placed on the mesh and its flag read once."""
    if state.holding is self._flag:
      return state, self._holding
    state = jax.device_put(state, self._replicated)
    return state, bool(np.asarray(jax.device_get(state.holding)))

  def update(self, state: SFState, params, batch, rng):
    state, holding = self.adopt(state)
    if holding:  # train from y; the runner's x goes into the slot
      params, state = state.live, state._replace(live=params)
    state, params = self._step(state, params, batch, rng)
    self._flag, self._holding = state.holding, False
    return state, params

  def prepare_for_eval(self, state: SFState, params):
    state, holding = self.adopt(state)
    if not holding:
      flag = jax.device_put(np.ones((), np.int32), state.holding.sharding)
      state = state._replace(live=params, holding=flag)
    x = self._eval_params(state.optimizer, state.live)  # a fresh buffer, never y
    self._flag, self._holding = state.holding, True
    return state, x

  def __call__(self, updates, state, params=None):
    return self.optimizer.update(updates, state, params)


def _check_self_tuning(hyperparameters, model_state) -> None:
  if hyperparameters is not None:
    raise ValueError(
        "the schedule-free comparison submission is self-tuning only (it reads no "
        "hyperparameters); run it with --tuning_ruleset=self, without "
        "--tuning_search_space")
  if jax.tree_util.tree_leaves(model_state):
    raise ValueError(
        "the schedule-free comparison submission does not recompute batch-norm "
        "statistics at the eval point x, so it runs only on workloads without model "
        "state (model_state None), such as the embedded teacher_student")


def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
  """``(SFState, Runtime)`` at `HPARAMS`; `ValueError` for hyperparameters or model
  state (see `_check_self_tuning`)."""
  del rng
  _check_self_tuning(hyperparameters, model_state)
  runtime = Runtime(workload, make_optimizer(workload.step_hint))
  return runtime.init(model_params), runtime


init_optimizer_state.algoperf_api = "jit"  # the runner refuses it under --api=pmap


def update_params(workload, current_param_container, current_params_types, model_state,
                  hyperparameters, batch, loss_type, optimizer_state, eval_results,
                  global_step, rng, train_state=None):
  """One schedule-free AdamW step from ``y`` (the stashed one after an eval)."""
  del workload, current_params_types, hyperparameters, loss_type, eval_results
  del global_step, train_state
  state, runtime = optimizer_state
  state, params = runtime.update(state, current_param_container, batch, rng)
  return (state, runtime), params, model_state


def prepare_for_eval(workload, current_param_container, current_params_types,
                     model_state, hyperparameters, loss_type, optimizer_state,
                     eval_results, global_step, rng):
  """The eval point ``x``; ``y`` stays in the state for the next `update_params`."""
  del workload, current_params_types, hyperparameters, loss_type, eval_results
  del global_step, rng
  state, runtime = optimizer_state
  state, params = runtime.prepare_for_eval(state, current_param_container)
  return (state, runtime), params, model_state


def data_selection(workload, input_queue, optimizer_state, current_param_container,
                   model_state, hyperparameters, global_step, rng):
  del workload, optimizer_state, current_param_container, model_state
  del hyperparameters, global_step, rng
  return next(input_queue)


# This package's batch sizes (AlgoPerf's reference NadamW ones), so that every
# submission compared sees the same batches (the embedded workload's default, 64).
get_batch_size = algoperf_api.get_batch_size

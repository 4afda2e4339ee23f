"""Training mode reaches the model without algoperf: dropout applies in training, not in eval."""

import json
import os

import jax
import numpy as np
from weight_averaging import runner, workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_step(dropout_rate):
  workload = workloads.get_workload("teacher_student", api="jit")
  submission = runner.load_submission(
      os.path.join(ROOT, "submissions", "jit", "nadamw", "submission.py"))
  with open(os.path.join(ROOT, "tuning_search_spaces", "embedded", "nadamw.json")) as f:
    point = dict(json.load(f)[0], dropout_rate=dropout_rate)
  hparams = runner.as_hyperparameters(point)
  rng = jax.random.PRNGKey(0)
  params, model_state = workload.init_model_fn(rng)
  state = submission.init_optimizer_state(workload, params, model_state, hparams, rng)
  batches = workload.input_queue(rng, 64)
  for step in range(2):  # the warmup's learning rate is zero at step 0
    state, params, _ = submission.update_params(
        workload=workload, current_param_container=params,
        current_params_types=workload.model_params_types, model_state=model_state,
        hyperparameters=hparams, batch=next(batches), loss_type=workload.loss_type,
        optimizer_state=state, eval_results=[], global_step=step,
        rng=jax.random.PRNGKey(1 + step))
  return jax.tree_util.tree_leaves(jax.device_get(params))


def test_dropout_applies_in_training_without_algoperf():
  without, with_dropout = _one_step(0.0), _one_step(0.5)
  assert any(not np.array_equal(a, b) for a, b in zip(without, with_dropout)), (
      "dropout 0.5 left the updates unchanged: the model never saw training mode")

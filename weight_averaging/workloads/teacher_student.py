"""An embedded AlgoPerf-style workload: a student MLP learns a noisy teacher's labels.

Inputs are standard normal vectors; a fixed random teacher network turns each into
class probabilities, and the label is *sampled* from them, so even the teacher has
a cross-entropy of about 1.48 nats on its own labels. The student, an MLP trained
with minibatches, therefore sees genuinely noisy gradients down to the end of
training: the regime of AlgoPerf's workloads, where averaging the trajectory (or
decaying the learning rate) removes noise that the live weights keep.

Everything is generated from fixed seeds: the data are the same on every machine,
nothing is downloaded, and the validation target is a constant of this file.

The workload implements the parts of AlgoPerf's `Workload` interface that
submissions and runners use, for both APIs: with ``api='pmap'`` the params come
back replicated with a leading device axis and batches are shaped
``(devices, per_device_batch, ...)``; with ``api='jit'`` params are replicated over
``Mesh(devices, ('batch',))`` and batches are global arrays sharded along axis 0.
Under jit the mesh may span several processes (`jax.distributed`): each process
then builds only its own rows of every batch.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Dict, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from weight_averaging import placement

try:  # Use AlgoPerf's own enums where it is installed, so its submissions see them.
  from algoperf import spec as _algoperf_spec
except ImportError:  # pragma: no cover - depends on the environment
  _algoperf_spec = None


class ForwardPassMode(enum.Enum):
  TRAIN = 0
  EVAL = 1


class ParameterType(enum.Enum):
  WEIGHT = 0
  BIAS = 1
  BATCH_NORM_SCALE = 3  # AlgoPerf's numbering
  BATCH_NORM_BIAS = 4


if _algoperf_spec is not None:  # pragma: no cover - depends on the environment
  ForwardPassMode = _algoperf_spec.ForwardPassMode  # noqa: F811
  ParameterType = _algoperf_spec.ParameterType  # noqa: F811


class ShapeTuple(NamedTuple):
  """A parameter's shape, exposed as ``.shape_tuple`` like AlgoPerf's."""

  shape_tuple: tuple


INPUT_DIM = 32
NUM_CLASSES = 10
HIDDEN = (64, 64)
TEACHER_HIDDEN = 64
TEACHER_SCALE = 3.0
DATA_SEED = 1234
SPLIT_SEEDS = {"train": 1, "eval_train": 1, "validation": 2, "test": 3}
SPLIT_SIZES = {"train": 65536, "eval_train": 4096, "validation": 4096, "test": 4096}


def _teacher_logits(x: np.ndarray) -> np.ndarray:
  rng = np.random.default_rng([DATA_SEED, 0])
  w1 = rng.standard_normal((INPUT_DIM, TEACHER_HIDDEN)) / math.sqrt(INPUT_DIM)
  w2 = (rng.standard_normal((TEACHER_HIDDEN, NUM_CLASSES)) * TEACHER_SCALE
        / math.sqrt(TEACHER_HIDDEN))
  return np.tanh(x @ w1) @ w2


@functools.lru_cache(maxsize=None)
def split_data(split: str):
  """The examples of a split as NumPy arrays ``(inputs, targets)``; deterministic.

  Generated with NumPy from fixed seeds, so they are the same whatever the JAX
  version. ``eval_train`` is the first 4096 examples of ``train``.
  """
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
  size = SPLIT_SIZES["train" if split == "eval_train" else split]
  rng = np.random.default_rng([DATA_SEED, SPLIT_SEEDS[split]])
  inputs = rng.standard_normal((size, INPUT_DIM))
  # A label drawn from the teacher's softmax (Gumbel-max sampling).
  targets = np.argmax(_teacher_logits(inputs) + rng.gumbel(size=(size, NUM_CLASSES)), -1)
  inputs, targets = inputs.astype(np.float32), targets.astype(np.int32)
  if split == "eval_train":
    return inputs[:SPLIT_SIZES["eval_train"]], targets[:SPLIT_SIZES["eval_train"]]
  return inputs, targets


class TeacherStudentWorkload:
  """The embedded default workload (AlgoPerf `Workload` interface)."""

  name = "teacher_student"
  target_metric_name = "loss"
  # Fixed, not tuned per run: NadamW at tuning_search_spaces/embedded/nadamw.json
  # reaches it at 75-90% of its step_hint schedule, as AlgoPerf's baselines reach
  # theirs (the teacher's own loss on its sampled labels is about 1.364).
  validation_target_value = 1.472
  test_target_value = 1.450
  step_hint = 2000
  eval_every_steps = 20  # the embedded runner evaluates by step interval
  eval_period_time_sec = 0.0
  max_allowed_runtime_sec = 600.0
  num_train_examples = SPLIT_SIZES["train"]
  num_eval_train_examples = SPLIT_SIZES["eval_train"]
  num_validation_examples = SPLIT_SIZES["validation"]
  num_test_examples = SPLIT_SIZES["test"]
  eval_batch_size = 4096
  default_batch_size = 64
  loss_type = "softmax_cross_entropy"
  # The examples of a split, ``data(split) -> (inputs, targets)``: a subclass may
  # transform them, the batching and sharding below stay.
  data = staticmethod(split_data)

  def __init__(self, api: str = "jit", hidden: tuple = HIDDEN):
    """`hidden` widens the student (benchmarks); the target is for the default."""
    self.hidden = tuple(hidden)
    if api not in ("jit", "pmap"):
      raise ValueError(f"api must be 'jit' or 'pmap', got {api!r}")
    self.api = api
    self._eval_fn = None

  # -- AlgoPerf interface ---------------------------------------------------

  def has_reached_validation_target(self, eval_result: Dict[str, float]) -> bool:
    return eval_result["validation/loss"] < self.validation_target_value

  def has_reached_test_target(self, eval_result: Dict[str, float]) -> bool:
    return eval_result["test/loss"] < self.test_target_value

  @property
  def param_shapes(self):
    return jax.tree_util.tree_map(
        lambda x: ShapeTuple(tuple(x.shape)), self._init_params(jax.random.PRNGKey(0)))

  @property
  def model_params_types(self):
    return {name: {"w": ParameterType.WEIGHT, "b": ParameterType.BIAS}
            for name in self._layer_names()}

  def _layer_names(self):
    return [f"dense_{i}" for i in range(len(self.hidden) + 1)]

  def _init_params(self, rng):
    sizes = (INPUT_DIM,) + self.hidden + (NUM_CLASSES,)
    keys = jax.random.split(rng, len(sizes) - 1)
    params = {}
    for name, key, fan_in, fan_out in zip(self._layer_names(), keys, sizes[:-1], sizes[1:]):
      scale = math.sqrt(2.0 / fan_in) * (0.1 if fan_out == NUM_CLASSES else 1.0)
      params[name] = {"w": scale * jax.random.normal(key, (fan_in, fan_out)),
                      "b": jnp.zeros((fan_out,))}
    return params

  def init_model_fn(self, rng, dropout_rate: Optional[float] = None,
                    aux_dropout_rate: Optional[float] = None):
    """Params (replicated as each API expects) and ``model_state=None``."""
    del dropout_rate, aux_dropout_rate  # dropout is a model_fn argument here
    params = self._init_params(rng)
    if self.api == "pmap":
      params = placement.pmap_replicate(params)
    else:
      params = jax.device_put(params, NamedSharding(self.mesh(), PartitionSpec()))
    return params, None

  def is_output_params(self, param_key) -> bool:
    return self._layer_names()[-1] in str(param_key)

  def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state,
               mode, rng, update_batch_norm: bool, dropout_rate: float = 0.0):
    """Logits of the student MLP; dropout on the hidden layers in training."""
    del update_batch_norm
    x = augmented_and_preprocessed_input_batch["inputs"]
    names = self._layer_names()
    train = getattr(mode, "name", mode) == "TRAIN"
    for i, name in enumerate(names):
      x = x @ params[name]["w"] + params[name]["b"]
      if i < len(names) - 1:
        x = jax.nn.relu(x)
        if train and dropout_rate:
          rng, key = jax.random.split(rng)
          keep = jax.random.bernoulli(key, 1.0 - dropout_rate, x.shape)
          x = jnp.where(keep, x / (1.0 - dropout_rate), 0.0)
    return x, model_state

  def loss_fn(self, label_batch, logits_batch, mask_batch=None,
              label_smoothing: float = 0.0) -> Dict[str, Any]:
    """Cross-entropy with optional label smoothing: summed, count, per example."""
    one_hot = jax.nn.one_hot(label_batch, NUM_CLASSES)
    smoothed = one_hot * (1.0 - label_smoothing) + label_smoothing / NUM_CLASSES
    per_example = -jnp.sum(smoothed * jax.nn.log_softmax(logits_batch), axis=-1)
    if mask_batch is None:
      mask_batch = jnp.ones_like(per_example)
    per_example = per_example * mask_batch
    return {"summed": per_example.sum(), "n_valid_examples": mask_batch.sum(),
            "per_example": per_example}

  # -- Data -----------------------------------------------------------------

  def mesh(self) -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("batch",))

  def _batch(self, idx: np.ndarray):
    """The examples `idx` of the training split, laid out for the API.

    Under jit a global array sharded along the batch axis, of which this process
    builds only the rows its own devices hold: with several processes each one
    reads and transfers its share of the batch only.
    """
    inputs, targets = self.data("train")
    if self.api == "pmap":
      n = jax.local_device_count()
      return jax.tree_util.tree_map(
          lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]),
          {"inputs": inputs[idx], "targets": targets[idx]})
    sharding = NamedSharding(self.mesh(), PartitionSpec("batch"))

    def rows(data):
      return jax.make_array_from_callback(
          (len(idx),) + data.shape[1:], sharding, lambda index: data[idx[index[0]]])

    return {"inputs": rows(inputs), "targets": rows(targets)}

  def input_queue(self, data_rng, global_batch_size: int,
                  start_step: int = 0) -> Iterator[Dict[str, Any]]:
    """Training batches: shuffled epochs over the training split, from `start_step`.

    Batch ``i`` depends only on ``(data_rng, i)``, so a resumed run sees the same
    batches as an uninterrupted one.
    """
    n = jax.local_device_count() if self.api == "pmap" else jax.device_count()
    if global_batch_size % n:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{n} devices")
    inputs, targets = self.data("train")
    seed = [int(v) for v in np.asarray(data_rng, np.uint32).ravel()]
    per_epoch = len(inputs) // global_batch_size
    step = start_step
    while True:
      epoch, offset = divmod(step, per_epoch)
      order = np.random.default_rng(seed + [epoch]).permutation(len(inputs))
      idx = order[offset * global_batch_size:(offset + 1) * global_batch_size]
      yield self._batch(idx)
      step += 1

  def _build_input_queue(self, data_rng, split, data_dir, global_batch_size, **kwargs):
    del split, data_dir, kwargs
    return self.input_queue(data_rng, global_batch_size)

  # -- Evaluation -----------------------------------------------------------

  def eval_model(self, global_batch_size, params, model_state, rng, data_dir=None,
                 imagenet_v2_data_dir=None, global_step=None) -> Dict[str, float]:
    """Loss and accuracy on eval_train, validation and test (full splits)."""
    del global_batch_size, rng, data_dir, imagenet_v2_data_dir, global_step
    if self.api == "pmap":
      params = jax.tree_util.tree_map(lambda x: x[0], params)
    if self._eval_fn is None:
      def metrics(p, inputs, targets):
        logits, _ = self.model_fn(p, {"inputs": inputs}, None, ForwardPassMode.EVAL,
                                  None, False)
        loss = self.loss_fn(targets, logits)
        return {"loss": loss["summed"] / loss["n_valid_examples"],
                "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}
      self._eval_fn = jax.jit(metrics)
    params = jax.device_get(params)
    results = {}
    for split in ("train", "validation", "test"):
      inputs, targets = self.data("eval_train" if split == "train" else split)
      for name, value in self._eval_fn(params, inputs, targets).items():
        results[f"{split}/{name}"] = float(value)
    return results

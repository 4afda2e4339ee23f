"""The flax.linen model of the `teacher_student_bn` workload: an MLP with batch norm.

Each hidden layer is ``Dense (no bias) -> BatchNorm -> ReLU``, as a ResNet block is
``Conv (no bias) -> BatchNorm -> ReLU``; the output layer is a plain ``Dense``.
``BatchNorm`` is flax's, with AlgoPerf ResNet's momentum and epsilon, so the
variables are ``{"params": ..., "batch_stats": ...}`` exactly as on AlgoPerf's
ResNet, Conformer and DeepSpeech. In training mode (``use_running_average=False``)
a layer normalises with the batch's mean and (biased) variance ``var = E[h^2] -
E[h]^2`` and, when the collection is mutable, moves its running statistics:

    mean <- momentum * mean + (1 - momentum) * batch_mean
    var  <- momentum * var  + (1 - momentum) * batch_var

In eval mode it normalises with the running statistics, so an example's output
does not depend on the rest of its batch. With ``axis_name`` (under ``pmap``) the
batch's moments are ``lax.pmean``-ed over that mapped axis before use: every device
normalises with, and accumulates, the statistics of the global batch.

This module imports flax; `teacher_student_bn` imports it only when a model is
built, so the rest of the package runs without flax.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax

# AlgoPerf's ResNet (imagenet_jax/models.py) uses these for every BatchNorm.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class BatchNormMLP(nn.Module):
  """``hidden`` widths of ``Dense -> BatchNorm -> ReLU``, then ``Dense(num_classes)``.

  ``axis_name``: the mapped axis whose devices share batch statistics (pmap), or None.
  """

  hidden: Sequence[int]
  num_classes: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    for i, width in enumerate(self.hidden):
      # No bias: the batch norm's own bias (beta) follows.
      x = nn.Dense(width, use_bias=False, kernel_init=nn.initializers.he_normal(),
                   name=f"dense_{i}")(x)
      x = nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON,
                       axis_name=None if use_running_average else self.axis_name,
                       name=f"batch_norm_{i}")(x)
      x = nn.relu(x)
    # A small last layer, as in teacher_student: the first logits are near uniform.
    return nn.Dense(self.num_classes, name="output",
                    kernel_init=nn.initializers.variance_scaling(0.02, "fan_in", "normal"))(x)


def init_variables(model: BatchNormMLP, rng, input_dim: int):
  """``{"params", "batch_stats"}`` of `model` for inputs of `input_dim` features
  (running mean 0, running variance 1, flax's initial statistics)."""
  return model.init({"params": rng}, jax.numpy.zeros((1, input_dim)),
                    use_running_average=True)

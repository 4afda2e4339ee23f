"""The two recipes of Distributed Shampoo, Google's and Meta's 2024 one, as `ShampooConfig`
keyword arguments."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from weight_averaging.optimizers.shampoo.config import ShampooConfig


_HYPERPARAMETER_NAMES = frozenset(f.name for f in dataclasses.fields(ShampooConfig))

#: The two recipes. `ShampooConfig`'s defaults (so `scale_by_shampoo`'s) are the Google ones.
PRESETS: Dict[str, Dict[str, Any]] = {
    # google-research's distributed_shampoo with the AlgoPerf JAX baseline's
    # intended settings (preconditioning actually on).
    "google": dict(
        block_size=1024, merge_dims_threshold=4096, skip_dim_gt=4096,
        beta1=0.0, use_nadam=False, beta2=0.999, diagonal_epsilon=1e-8,
        matrix_epsilon=1e-6, relative_matrix_epsilon=True, statistics_init_scale=None,
        statistics_bias_correction=False, statistics_every=1, preconditioning_every=20,
        start_preconditioning_step=101, exponent_override=0,
        graft_type="rmsprop_normalized", graft_per_block=False, momentum=0.9,
        nesterov=True, moving_average_for_momentum=True, graft_momentum_buffer=True,
        inverse_failure_threshold=0.1, root_method="eigh"),
    # Meta's Distributed Shampoo as configured for its AlgoPerf 2024 submission.
    "meta": dict(
        block_size=1024, merge_dims_threshold=1024, skip_dim_gt=999_999,
        beta1=0.9, use_nadam=True, beta2=0.999, diagonal_epsilon=1e-8,
        matrix_epsilon=1e-8, relative_matrix_epsilon=False, statistics_init_scale=0.0,
        statistics_bias_correction=True, statistics_every=1, preconditioning_every=100,
        start_preconditioning_step=-1, exponent_override=0,
        graft_type="adam", graft_per_block=True, momentum=0.0,
        nesterov=True, moving_average_for_momentum=False, graft_momentum_buffer=False,
        inverse_failure_threshold=0.1, root_method="eigh"),
}


def shampoo_hyperparameters(preset: str = "google", **overrides) -> Dict[str, Any]:
  """The keyword arguments of `scale_by_shampoo` for a preset, with overrides."""
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
  unknown = set(overrides) - _HYPERPARAMETER_NAMES
  if unknown:
    raise TypeError(f"unknown Shampoo hyperparameters: {sorted(unknown)}")
  return {**PRESETS[preset], **overrides}

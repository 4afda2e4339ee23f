"""Optimizers as optax transforms (nothing here knows about weight averaging)."""

from weight_averaging.optimizers import nadamw
from weight_averaging.optimizers import shampoo
from weight_averaging.optimizers.nadamw import (ScaleByNadamState, nadamw as nadamw_transform,
                                                scale_by_clipped_global_norm, scale_by_nadam,
                                                warmup_cosine_schedule)
from weight_averaging.optimizers.shampoo import (ScaleByShampooState, distributed_shampoo,
                                                 matrix_inverse_pth_root, scale_by_shampoo,
                                                 shampoo_hyperparameters)

__all__ = ["ScaleByNadamState", "nadamw", "nadamw_transform", "scale_by_clipped_global_norm",
           "scale_by_nadam", "warmup_cosine_schedule", "shampoo", "ScaleByShampooState",
           "distributed_shampoo", "matrix_inverse_pth_root", "scale_by_shampoo",
           "shampoo_hyperparameters"]

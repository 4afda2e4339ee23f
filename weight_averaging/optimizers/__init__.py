"""Optimizers as optax transforms (nothing here knows about weight averaging).

`common` holds what they share (global norm, clipping, the warmup + cosine schedule, the
saturating step counter); `nadamw` is AlgoPerf's NadamW; `shampoo` is Distributed Shampoo.
"""

from weight_averaging.optimizers import common
from weight_averaging.optimizers import nadamw
from weight_averaging.optimizers import shampoo
from weight_averaging.optimizers.common import (scale_by_clipped_global_norm,
                                                warmup_cosine_schedule)
from weight_averaging.optimizers.nadamw import (ScaleByNadamState, nadamw as nadamw_transform,
                                                scale_by_nadam)
from weight_averaging.optimizers.shampoo import (ScaleByShampooState, distributed_shampoo,
                                                 matrix_inverse_pth_root, scale_by_shampoo,
                                                 shampoo_hyperparameters)

__all__ = ["common", "ScaleByNadamState", "nadamw", "nadamw_transform",
           "scale_by_clipped_global_norm", "scale_by_nadam", "warmup_cosine_schedule", "shampoo",
           "ScaleByShampooState", "distributed_shampoo", "matrix_inverse_pth_root",
           "scale_by_shampoo", "shampoo_hyperparameters"]

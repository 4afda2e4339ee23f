"""Optimizers as optax transforms (nothing here knows about weight averaging)."""

from weight_averaging.optimizers import nadamw
from weight_averaging.optimizers.nadamw import (ScaleByNadamState, nadamw as nadamw_transform,
                                                scale_by_clipped_global_norm, scale_by_nadam,
                                                warmup_cosine_schedule)

__all__ = ["ScaleByNadamState", "nadamw", "nadamw_transform", "scale_by_clipped_global_norm",
           "scale_by_nadam", "warmup_cosine_schedule"]

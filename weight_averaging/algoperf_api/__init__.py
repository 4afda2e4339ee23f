"""Glue between optimizers, averagers and AlgoPerf's submission API (jit and pmap)."""

from weight_averaging.algoperf_api import builder, hyperparameters
from weight_averaging.algoperf_api.builder import (APIS, Runtime, TrainState, batch_mesh,
                                                   build_submission, resolve_placement)
from weight_averaging.algoperf_api.hyperparameters import (
    BATCH_SIZES, DEFAULT_AVERAGING_EVERY, DEFAULT_AVERAGING_PLACEMENT,
    DEFAULT_AVERAGING_START_STEP, DEFAULT_EMA_BETA, DEFAULT_LAWA_K, AveragingConfig,
    NadamwConfig, averaging_config, ema_from_hyperparameters, get_batch_size,
    lawa_from_hyperparameters, nadamw_config, nadamw_from_hyperparameters)

__all__ = [
    "APIS", "AveragingConfig", "BATCH_SIZES", "DEFAULT_AVERAGING_EVERY",
    "DEFAULT_AVERAGING_PLACEMENT", "DEFAULT_AVERAGING_START_STEP", "DEFAULT_EMA_BETA",
    "DEFAULT_LAWA_K", "NadamwConfig", "Runtime", "TrainState", "averaging_config",
    "batch_mesh", "build_submission", "builder", "ema_from_hyperparameters",
    "get_batch_size", "hyperparameters", "lawa_from_hyperparameters", "nadamw_config",
    "nadamw_from_hyperparameters", "resolve_placement",
]

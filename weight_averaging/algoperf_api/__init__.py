"""Glue between optimizers, averagers and AlgoPerf's submission API (jit and pmap)."""

from weight_averaging.algoperf_api import builder, hyperparameters
from weight_averaging.algoperf_api.builder import (APIS, Runtime, TrainState, batch_mesh,
                                                   build_submission, distribution,
                                                   resolve_placement)
from weight_averaging.algoperf_api.hyperparameters import (
    BATCH_SIZES, DEFAULT_AVERAGING_EVERY, DEFAULT_AVERAGING_PLACEMENT,
    DEFAULT_AVERAGING_START_STEP, DEFAULT_EMA_BETA, DEFAULT_LAWA_K, AveragingConfig,
    Distribution, NadamwConfig, ShampooConfig, TrainingConfig, averaging_config,
    ema_from_hyperparameters, get_batch_size, lawa_from_hyperparameters, nadamw_config,
    nadamw_from_hyperparameters, shampoo_config, shampoo_from_hyperparameters,
    training_config)

__all__ = [
    "APIS", "averaging_config", "AveragingConfig", "batch_mesh", "BATCH_SIZES",
    "build_submission", "builder", "DEFAULT_AVERAGING_EVERY",
    "DEFAULT_AVERAGING_PLACEMENT", "DEFAULT_AVERAGING_START_STEP", "DEFAULT_EMA_BETA",
    "DEFAULT_LAWA_K", "Distribution", "distribution", "ema_from_hyperparameters",
    "get_batch_size", "hyperparameters", "lawa_from_hyperparameters", "nadamw_config",
    "nadamw_from_hyperparameters", "NadamwConfig", "resolve_placement", "Runtime",
    "shampoo_config", "shampoo_from_hyperparameters", "ShampooConfig",
    "training_config", "TrainingConfig", "TrainState",
]

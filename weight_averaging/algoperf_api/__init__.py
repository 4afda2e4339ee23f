"""Glue between optimizers, averagers and AlgoPerf's submission API (jit and pmap).

`hyperparameters` reads and validates (the averaging ones in
`averaging_hyperparameters`, the lookup in `reading`), `names` refuses names no
submission reads, `recipes` builds an optimizer or an averager from what was read,
`builder` turns the two into AlgoPerf's five functions around `runtime`'s compiled
step, `restore` undoes the official runner's restore layout; `batch_sizes` answers
``get_batch_size``.
"""

from weight_averaging.algoperf_api import (batch_sizes, builder, hyperparameters, names,
                                           recipes, restore, runtime)
from weight_averaging.algoperf_api.batch_sizes import BATCH_SIZES, get_batch_size
from weight_averaging.algoperf_api.builder import (APIS, Runtime, TrainState, batch_mesh,
                                                   build_submission, distribution,
                                                   resolve_placement)
from weight_averaging.algoperf_api.hyperparameters import (
    DEFAULT_AVERAGING_EVERY, DEFAULT_AVERAGING_MODEL_STATE, DEFAULT_AVERAGING_PLACEMENT,
    DEFAULT_AVERAGING_START_STEP, DEFAULT_EMA_BETA, DEFAULT_LAWA_K, MODEL_STATE_CHOICES,
    SELF_TUNING_AVERAGING, SELF_TUNING_EMA, SELF_TUNING_LAWA, SELF_TUNING_NADAMW,
    SELF_TUNING_SHAMPOO, AveragingConfig, EmaConfig, LawaConfig, NadamwConfig, ShampooConfig,
    TrainingConfig, averaging_config, ema_config, lawa_config, nadamw_config, shampoo_config,
    training_config)
from weight_averaging.algoperf_api.recipes import (Distribution, ema_from_hyperparameters,
                                                   lawa_from_hyperparameters,
                                                   nadamw_from_hyperparameters,
                                                   shampoo_from_hyperparameters)

__all__ = [
    "APIS", "averaging_config", "AveragingConfig", "batch_mesh", "BATCH_SIZES",
    "batch_sizes", "build_submission", "builder", "DEFAULT_AVERAGING_EVERY",
    "DEFAULT_AVERAGING_MODEL_STATE", "DEFAULT_AVERAGING_PLACEMENT",
    "DEFAULT_AVERAGING_START_STEP", "DEFAULT_EMA_BETA", "MODEL_STATE_CHOICES",
    "DEFAULT_LAWA_K", "Distribution", "distribution", "ema_config", "EmaConfig",
    "ema_from_hyperparameters", "get_batch_size", "hyperparameters", "lawa_config",
    "LawaConfig", "lawa_from_hyperparameters", "names", "nadamw_config",
    "nadamw_from_hyperparameters", "NadamwConfig", "recipes", "resolve_placement",
    "restore", "runtime", "Runtime", "SELF_TUNING_AVERAGING", "SELF_TUNING_EMA", "SELF_TUNING_LAWA",
    "SELF_TUNING_NADAMW", "SELF_TUNING_SHAMPOO", "shampoo_config",
    "shampoo_from_hyperparameters", "ShampooConfig", "training_config", "TrainingConfig",
    "TrainState",
]

r"""Distributed Shampoo as optax transforms, in two recipes (Google's and Meta's 2024 one).

For a parameter tensor with gradient :math:`G` (after squeezing size-1 dims, merging
small adjacent dims and splitting every dim into blocks of at most ``block_size``),
each block :math:`B` of rank :math:`k` keeps one statistic per dim :math:`i`,

.. math::

  L_i \leftarrow \beta_2 L_i + (1 - \beta_2)\, B_{(i)} B_{(i)}^\top,

where :math:`B_{(i)}` is the block unfolded along dim :math:`i` (every
``statistics_every`` steps). Every ``preconditioning_every`` steps the roots
:math:`P_i = (L_i + \epsilon I)^{-1/p}` are recomputed (``p = 2k`` unless
``exponent_override``), and the block of the search input :math:`X` (the gradient,
or its bias-corrected first moment) is preconditioned as

.. math::

  D = X \times_1 P_1 \times_2 P_2 \cdots \times_k P_k .

Grafting gives the direction the norm of a diagonal optimizer's step :math:`A`
(SGD, Adam, RMSProp or normalized RMSProp), per tensor or per block:

.. math::

  D \leftarrow D\, \lVert A \rVert / (\lVert D \rVert + 10^{-16}).

Before ``start_preconditioning_step`` (and always for parameters that are skipped,
see `block_plan`) the step is :math:`A` itself. Weight decay :math:`\lambda\theta`
is added to the step, then optional momentum, then the learning rate:

.. math::

  u = D + \lambda\theta, \quad m \leftarrow \mu m + w u, \quad
  \text{step} = w u + \mu m \ \text{(Nesterov)} \ \text{or} \ m, \quad
  \theta \leftarrow \theta - \eta\, \text{step},

with :math:`w = 1 - \mu` for moving-average momentum and :math:`w = 1` otherwise.

The roots of all blocks are computed in a few batched calls: statistics of the
same size and exponent live in one ``[n, d, d]`` stack, and the root is ``vmap``-ed
over chunks of the stack (``root_chunk_bytes``) in a loop under a `jax.lax.cond`, so the
eigendecompositions only run on the steps that need them, compile time does not grow
with the number of blocks, and their temporaries are a few chunks. New statistics and
roots are written into their stacks in place, so a donated state needs no second copy.
With ``axis_name`` (pmap, or `shard_map` under jit) or ``mesh`` (plain jit), every
device computes the roots of its share of each stack and the shares are gathered,
so all devices hold bitwise-equal roots.

The two recipes differ only in hyperparameters (`PRESETS`): Google's (the AlgoPerf
JAX baseline's intended settings: statistics initialised to
:math:`\epsilon I`, relative :math:`\epsilon`, normalized-RMSProp grafting per tensor,
Nesterov moving-average momentum with separate buffers for the Shampoo and graft
steps) and Meta's AlgoPerf 2024 winner (zero-initialised, bias-corrected statistics,
absolute :math:`\epsilon`, Adam grafting per block, a bias-corrected NAdam first moment
preconditioned by both methods, decoupled weight decay).

The package: `roots` (inverse p-th roots, batched and split over devices), `blocks`
(squeeze, merge, block, and the plan of the statistics stacks), `config` (the
hyperparameters, `ShampooConfig`), `presets` (the two recipes) and `transform` (the
optax transforms and their state).
"""

from weight_averaging.optimizers.shampoo.blocks import (BlockGroup, BlockPlan, LeafPlan,
                                                        block_groups, block_plan,
                                                        merge_blocks, merge_small_dims,
                                                        split_into_blocks)
from weight_averaging.optimizers.shampoo.config import GRAFT_TYPES, ShampooConfig
from weight_averaging.optimizers.shampoo.presets import PRESETS, shampoo_hyperparameters
from weight_averaging.optimizers.shampoo.roots import (ROOT_METHODS, batched_inverse_pth_roots,
                                                       chunk_length, matrix_inverse_pth_root,
                                                       refresh_roots, root_is_valid)
from weight_averaging.optimizers.shampoo.transform import (NORM_EPS, ScaleByShampooState,
                                                           distributed_shampoo,
                                                           scale_by_shampoo)

__all__ = ["BlockGroup", "BlockPlan", "LeafPlan", "block_groups", "block_plan", "merge_blocks",
           "merge_small_dims", "split_into_blocks", "GRAFT_TYPES", "ShampooConfig", "PRESETS",
           "shampoo_hyperparameters", "ROOT_METHODS", "batched_inverse_pth_roots",
           "chunk_length", "matrix_inverse_pth_root", "refresh_roots", "root_is_valid", "NORM_EPS", "ScaleByShampooState",
           "distributed_shampoo", "scale_by_shampoo"]

"""Distributed Shampoo with an EMA of the weights for evaluation (AlgoPerf pmap API).

Hyperparameters: tuning_search_spaces/shampoo_ema.json.
"""

from weight_averaging import algoperf_api

_SUBMISSION = algoperf_api.build_submission(
    make_optimizer=algoperf_api.shampoo_from_hyperparameters,
    make_averager=algoperf_api.ema_from_hyperparameters,
    api="pmap")

get_batch_size = _SUBMISSION.get_batch_size
init_optimizer_state = _SUBMISSION.init_optimizer_state
update_params = _SUBMISSION.update_params
prepare_for_eval = _SUBMISSION.prepare_for_eval
data_selection = _SUBMISSION.data_selection

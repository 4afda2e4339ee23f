"""Distributed Shampoo (Meta's 2024 recipe or Google's), no averaging (AlgoPerf jit API).

Hyperparameters: tuning_search_spaces/shampoo.json.
"""

from weight_averaging import algoperf_api

_SUBMISSION = algoperf_api.build_submission(
    make_optimizer=algoperf_api.shampoo_from_hyperparameters,
    make_averager=None,
    api="jit")

get_batch_size = _SUBMISSION.get_batch_size
init_optimizer_state = _SUBMISSION.init_optimizer_state
update_params = _SUBMISSION.update_params
prepare_for_eval = _SUBMISSION.prepare_for_eval
data_selection = _SUBMISSION.data_selection

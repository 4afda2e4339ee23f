"""Every shipped configuration fits its machine, as `memory_plan` predicts it.

Each point of each ``tuning_search_spaces/*.json`` on the nine workloads and each
``workloads_config`` trial, under each API that has the workload:

* jit API on the leaderboard's 4x A100 40 GB: the state within 'auto''s budget
  (`memory.FRACTION` of the device limit) and the predicted peak of a step (state,
  gradients, the optimizer step's temporaries) within the limit;
* pmap API (replicated state only): on 4x A100 40 GB and on AlgoPerf v0.5's 8x V100
  16 GB, all but the combinations `memory_plan` lists as impossible there.

A failure names the file, the workload, the submission, the API and the predicted
against the available bytes.
"""

import functools

import pytest

from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import memory
from weight_averaging.studies import memory_plan


@functools.lru_cache(maxsize=None)
def rows(hardware):
  return tuple(memory_plan.shipped_plans(hardware))


def problem(what, r):
  """One line naming the configuration and its predicted vs available bytes, or None."""
  f = r.footprint
  if not r.fits:
    return (f"{what}: {r.workload} {r.submission} ({r.api}, placement {r.placement}) "
            f"plans a state of {memory.human(f.device)} per device, more than the "
            f"{memory.human(memory.FRACTION * r.limit)} available to it "
            f"({memory.FRACTION:g} x the {memory.human(r.limit)} limit)")
  if not r.peak_fits:
    return (f"{what}: {r.workload} {r.submission} ({r.api}, placement {r.placement}) "
            f"predicts a step peak of {memory.human(r.peak)} per device (state "
            f"{memory.human(f.device)} + gradients {memory.human(r.gradients)} + "
            f"temporaries {memory.human(r.temporaries)}), more than the "
            f"{memory.human(r.limit)} available")
  return None


def problems(hardware, api, known=()):
  seen, out = set(), []
  for what, r in rows(hardware):
    line = problem(what, r) if r.api == api else None
    if line and (r.workload, r.submission) not in known and line not in seen:
      seen.add(line)
      out.append(line)
  return out


def unfit(hardware, api):
  return {(r.workload, r.submission) for _, r in rows(hardware)
          if r.api == api and problem("", r)}


def test_every_shipped_configuration_fits_the_leaderboard_machine_under_jit():
  assert not problems(memory_plan.LEADERBOARD, "jit"), "\n".join(
      problems(memory_plan.LEADERBOARD, "jit"))


@pytest.mark.parametrize("hardware, known", [
    (memory_plan.LEADERBOARD, memory_plan.PMAP_DOES_NOT_FIT),
    (memory_plan.V100, memory_plan.V100_PMAP_DOES_NOT_FIT)])
def test_under_pmap_only_the_listed_combinations_do_not_fit(hardware, known):
  assert not problems(hardware, "pmap", known), "\n".join(problems(hardware, "pmap", known))
  # The lists are exact: each combination named there really does not fit.
  assert unfit(hardware, "pmap") == set(known)


def test_the_check_names_the_file_workload_api_and_bytes():
  """A made-up configuration that cannot fit: replicated LAWA on Criteo under jit."""
  point = dict(hp.SELF_TUNING_NADAMW, averaging_placement="replicated", lawa_k=20,
               averaging_every=5)
  r = memory_plan.plan_row("criteo1tb", "nadamw_lawa", memory_plan.LEADERBOARD, point,
                           "jit")
  line = problem("tuning_search_spaces/made_up.json (jit)", r)
  assert line is not None
  for word in ("made_up.json", "criteo1tb", "nadamw_lawa", "jit", "replicated",
               memory.human(r.footprint.device), memory.human(memory.FRACTION * r.limit)):
    assert word in line


def test_the_peak_counts_the_steps_gradients_and_temporaries():
  r = memory_plan.plan_row("wmt", "shampoo", memory_plan.LEADERBOARD)
  params = memory_plan.load_shapes("wmt")
  p = memory.tree_bytes(params)
  assert r.gradients == p  # all float32
  assert r.temporaries == memory_plan.step_bytes("shampoo", params)[1]
  assert r.temporaries > memory_plan.STEP_TEMP_PER_PARAM_BYTE * p  # Shampoo's own on top
  assert r.peak == r.footprint.device + r.gradients + r.temporaries

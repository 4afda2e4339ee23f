"""Averaging windows relative to the step hint, the self-tuning ruleset, known names.

The closed forms are computed here independently, in decimal arithmetic:
nu = max(1, round(f * step_hint)) (half to even) and start = ceil(f * step_hint).
"""

import collections
import decimal
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from weight_averaging import algoperf_api, runner
from weight_averaging.studies import workload_facts

hp = algoperf_api.hyperparameters
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NINE = sorted(workload_facts.ALGOPERF_WORKLOADS)
EVERY_FRACTIONS = (0.0005, 0.002, 1e-5, 0.1, 0.5, 1.0)
START_FRACTIONS = (0.0, 0.02, 0.07, 0.1, 0.14, 0.25, 0.4, 0.999)


def closed_form_every(fraction, step_hint):
  exact = decimal.Decimal(repr(fraction)) * step_hint
  return max(1, int(exact.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)))


def closed_form_start(fraction, step_hint):
  exact = decimal.Decimal(repr(fraction)) * step_hint
  return int(exact.to_integral_value(rounding=decimal.ROUND_CEILING))


@pytest.mark.parametrize("workload", NINE)
def test_fractions_resolve_to_the_closed_form(workload):
  step_hint = workload_facts.ALGOPERF_WORKLOADS[workload].step_hint
  for every in EVERY_FRACTIONS:
    for start in START_FRACTIONS:
      cfg = hp.averaging_config({"averaging_every_fraction": every,
                                 "averaging_start_fraction": start}, step_hint)
      assert cfg == (closed_form_every(every, step_hint),
                     closed_form_start(start, step_hint), "auto", "live"), (every, start)
      assert type(cfg.every) is int and type(cfg.start_step) is int


def test_fractions_are_exact_on_the_decimal_given():
  # In binary floating point 0.07 * 72000 is 5040.000000000001, whose ceiling is 5041.
  assert 0.07 * 72_000 > 5040
  assert hp.start_steps(0.07, 72_000) == 5040
  assert hp.start_steps(0.14, 76_000) == 10_640
  assert hp.every_steps(0.0005, 10_666) == 5      # 5.333
  assert hp.every_steps(0.0005, 195_999) == 98    # 97.9995
  assert hp.every_steps(0.5, 5) == 2              # 2.5: half to even
  assert hp.every_steps(0.5, 7) == 4              # 3.5: half to even
  assert hp.every_steps(1e-5, 2000) == 1          # never 0
  assert hp.start_steps(0.0, 72_000) == 0


def test_shipped_window_is_one_percent_of_every_step_hint():
  """nu from the shipped fraction: the LAWA window nu * k is 1% of the step hint within
  the rounding of nu. EMA (beta 0.9, the same nu) looks back as far on average: its
  samples' mean age nu * beta / (1 - beta) is LAWA's nu * (k - 1) / 2 within 6%."""
  fraction = algoperf_api.SELF_TUNING_AVERAGING["averaging_every_fraction"]
  k = algoperf_api.SELF_TUNING_LAWA["lawa_k"]
  beta = algoperf_api.SELF_TUNING_EMA["ema_beta"]
  for workload in NINE:
    step_hint = workload_facts.ALGOPERF_WORKLOADS[workload].step_hint
    nu = hp.averaging_config(None, step_hint).every
    assert nu == closed_form_every(fraction, step_hint)
    assert 0.009 <= nu * k / step_hint <= 0.011, workload
    ema_age, lawa_age = nu * beta / (1 - beta), nu * (k - 1) / 2
    assert abs(ema_age / lawa_age - 1) < 0.06, workload


def test_absolute_values_and_their_defaults_still_work():
  assert hp.averaging_config({"averaging_every": 64, "averaging_start_step": 7}, 100) == (
      64, 7, "auto", "live")
  assert hp.averaging_config({}, None) == (algoperf_api.DEFAULT_AVERAGING_EVERY,
                                           algoperf_api.DEFAULT_AVERAGING_START_STEP,
                                           algoperf_api.DEFAULT_AVERAGING_PLACEMENT,
                                           algoperf_api.DEFAULT_AVERAGING_MODEL_STATE)
  # null means "not given": a list search space can mix the two forms.
  assert hp.averaging_config({"averaging_every": None, "averaging_every_fraction": 0.5,
                              "averaging_start_step": 3, "averaging_start_fraction": None},
                             10) == (5, 3, "auto", "live")


# ----------------------------------------------------------------------------
# Batch sizes: AlgoPerf's newer reference NadamW, and the runner's fall-back.


def test_batch_sizes_include_the_lm_and_cifar():
  assert algoperf_api.get_batch_size("finewebedu_lm") == 64
  assert algoperf_api.get_batch_size("cifar") == 16384
  for name in NINE:
    assert algoperf_api.get_batch_size(name) > 0
  # A variant raises ValueError, on which the official runner retries the base name.
  with pytest.raises(ValueError, match="imagenet_resnet_large_bn_init"):
    algoperf_api.get_batch_size("imagenet_resnet_large_bn_init")


# ----------------------------------------------------------------------------
# Self-tuning points.


def test_self_tuning_readers_read_the_documented_points():
  assert hp.nadamw_config(None) == hp.nadamw_config(algoperf_api.SELF_TUNING_NADAMW)
  assert hp.shampoo_config(None) == hp.shampoo_config(algoperf_api.SELF_TUNING_SHAMPOO)
  assert hp.shampoo_config(None).schedule.step_hint_factor == 1.0  # the whole step hint
  assert hp.ema_config(None).beta == 0.9
  assert hp.lawa_config(None).k == 20
  assert hp.averaging_config(None, 72_000) == (36, 0, "auto", "live")


def test_external_ruleset_still_names_a_missing_hyperparameter():
  point = dict(algoperf_api.SELF_TUNING_NADAMW)
  del point["warmup_factor"]
  with pytest.raises(ValueError, match="'warmup_factor' is missing"):
    algoperf_api.nadamw_from_hyperparameters(
        collections.namedtuple("Hyperparameters", sorted(point))(**point), 1000)


# ----------------------------------------------------------------------------
# The set of known names: derived from the readers, covering every shipped space.


def test_known_names_cover_every_shipped_search_space():
  known = algoperf_api.names.known_names()
  paths = [os.path.join(root, f) for root, _, files in
           os.walk(os.path.join(REPO, "tuning_search_spaces")) for f in files
           if f.endswith(".json")]
  assert len(paths) == 15
  for path in paths:
    for point in runner.load_search_space(path, num_trials=5):
      assert set(point) <= known, (path, sorted(set(point) - known))
  # Names the readers take with a default, never written in a search space.
  assert {"averaging_placement", "snapshot_every", "grad_clip", "root_method",
          "averaging_every_fraction", "averaging_start_fraction",
          "averaging_model_state"} <= known


def test_a_name_only_another_submission_reads_is_logged_once(caplog):
  point = dict(algoperf_api.SELF_TUNING_NADAMW, ema_beta=0.9, lawa_k=20)
  with caplog.at_level("WARNING", logger="weight_averaging.algoperf_api.names"):
    with algoperf_api.names.checked(point):
      algoperf_api.nadamw_from_hyperparameters(point, 1000)
      algoperf_api.ema_from_hyperparameters(point, hp.averaging_config(point),
                                            algoperf_api.resolve_placement(
                                                "replicated", "jit"))
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and lines[0].endswith(": lawa_k"), lines


def test_averaging_model_state_is_read_by_the_averaging_submissions_only(caplog):
  """'live' (the default) or 'average'; a plain submission logs it, a typo is refused."""
  assert algoperf_api.DEFAULT_AVERAGING_MODEL_STATE == "live"
  assert hp.averaging_config({"averaging_model_state": "average"}).model_state == "average"
  assert hp.averaging_config({}).model_state == "live"
  assert hp.averaging_config(None, 1000).model_state == "live"  # self-tuning: the paper's
  for bad in ("averaged", "LIVE", 1, True, ["live"]):
    with pytest.raises(ValueError, match=r"hyperparameter 'averaging_model_state' must be "
                       r"one of \('live', 'average'\), got " + re.escape(repr(bad))):
      hp.averaging_config({"averaging_model_state": bad})
  point = dict(algoperf_api.SELF_TUNING_NADAMW, averaging_model_state="average")
  with caplog.at_level("WARNING", logger="weight_averaging.algoperf_api.names"):
    with algoperf_api.names.checked(point):  # NadamW alone: known, unused, logged
      algoperf_api.nadamw_from_hyperparameters(point, 1000)
    with algoperf_api.names.checked(point):  # with an averager: read, nothing logged
      algoperf_api.nadamw_from_hyperparameters(point, 1000)
      hp.averaging_config(point, 1000)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and lines[0].endswith(": averaging_model_state"), lines
  with pytest.raises(ValueError, match="did you mean 'averaging_model_state'"):
    algoperf_api.names.check_known({"averaging_model_states": "average"})


# ----------------------------------------------------------------------------
# The embedded runner's --tuning_ruleset=self.

RECORDING_SUBMISSION = """
import json, os
from weight_averaging import algoperf_api

_SUB = algoperf_api.build_submission(algoperf_api.nadamw_from_hyperparameters,
                                     algoperf_api.lawa_from_hyperparameters, api="jit")

def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
  with open(os.environ["RECORD_TO"], "w") as f:
    json.dump({"hyperparameters": hyperparameters,
               "budget": workload.max_allowed_runtime_sec}, f)
  return _SUB.init_optimizer_state(workload, model_params, model_state,
                                   hyperparameters, rng)

get_batch_size = _SUB.get_batch_size
update_params = _SUB.update_params
prepare_for_eval = _SUB.prepare_for_eval
data_selection = _SUB.data_selection
"""


def test_runner_self_tuning_passes_none_and_a_larger_budget(tmp_path, monkeypatch):
  submission = tmp_path / "recording_submission.py"
  submission.write_text(RECORDING_SUBMISSION)
  record = tmp_path / "record.json"
  monkeypatch.setenv("RECORD_TO", str(record))
  budget = runner.experiment.workloads.get_workload().max_allowed_runtime_sec
  results = runner.run_experiment(
      workload_name="teacher_student", submission_path=str(submission),
      tuning_ruleset="self", experiment_dir=str(tmp_path), experiment_name="self",
      max_global_steps=4, eval_every_steps=2, save_checkpoints=False)
  assert len(results) == 1 and results[0].global_step == 4
  seen = json.loads(record.read_text())
  assert seen == {"hyperparameters": None, "budget": 1.5 * budget}
  hparams = os.path.join(results[0].log_dir, "hparams.json")
  assert json.load(open(hparams)) is None


@pytest.mark.parametrize("ruleset, space, expect", [
    ("self", None, "trial_1: 4 steps"),
    ("external", "tuning_search_spaces/embedded/nadamw_lawa.json", "trial_1: 4 steps"),
])
def test_runner_command_line_takes_the_ruleset(tmp_path, ruleset, space, expect):
  args = [sys.executable, "-m", "weight_averaging.runner", "--workload=teacher_student",
          f"--submission_path={REPO}/submissions/jit/nadamw_lawa/submission.py",
          f"--experiment_dir={tmp_path}", "--experiment_name=cli",
          f"--tuning_ruleset={ruleset}", "--max_global_steps=4", "--eval_every_steps=2",
          "--nosave_checkpoints", "--noprogress"]
  if space:
    args.append(f"--tuning_search_space={REPO}/{space}")
  done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  assert expect in done.stdout
  hparams = tmp_path / "cli" / "teacher_student_jax" / "trial_1" / "hparams.json"
  assert (json.loads(hparams.read_text()) is None) == (ruleset == "self")

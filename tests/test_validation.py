"""The one set of hyperparameter checks: integers, numbers, booleans, choices."""

import math

import numpy as np
import pytest

from weight_averaging import validation
from weight_averaging.algoperf_api import hyperparameters as hp


# ----------------------------------------------------------------------------
# Integers: an int, or a float with an integral value; nothing else.


@pytest.mark.parametrize("value", [64, 64.0, np.int64(64), np.int32(64), np.float64(64.0),
                                   np.float32(64.0)])
def test_integers_and_integral_floats_are_ints(value):
  got = validation.check_int("averaging_every", value, 1)
  assert got == 64 and type(got) is int


@pytest.mark.parametrize("value", [64.5, True, False, np.bool_(True), "64", None,
                                   float("nan"), float("inf"), -float("inf"), [64]])
def test_anything_else_is_no_integer(value):
  with pytest.raises(ValueError) as error:
    validation.check_int("averaging_every", value, 1)
  message = str(error.value)
  assert "'averaging_every' must be an integer >= 1" in message
  assert repr(value) in message


@pytest.mark.parametrize("value", [0, 0.0, -3, np.int64(-1)])
def test_integers_below_the_minimum_are_refused(value):
  with pytest.raises(ValueError, match=r"'lawa_k' must be an integer >= 1, got"):
    validation.check_int("lawa_k", value, 1)
  assert validation.check_int("start_step", -1.0, -1) == -1


def test_large_integers_are_not_rounded():
  big = 2**60 + 1  # not representable as a float64
  assert validation.check_int("step_hint", big, 1) == big


# ----------------------------------------------------------------------------
# Numbers in an interval.


def test_floats_in_the_interval():
  assert validation.check_float("ema_beta", 0.2, 0.0, 1.0, high_open=True) == 0.2
  assert validation.check_float("ema_beta", 0, 0.0, 1.0, high_open=True) == 0.0
  assert type(validation.check_float("ema_beta", np.float32(0.5), 0.0, 1.0)) is float
  assert validation.check_float("lr", 1e9, 0.0, math.inf, low_open=True,
                                high_open=True) == 1e9


@pytest.mark.parametrize("value, interval", [
    (1.0, "[0.0, 1.0)"), (-0.1, "[0.0, 1.0)"), (float("nan"), "[0.0, 1.0)"),
    (True, "[0.0, 1.0)"), ("0.9", "[0.0, 1.0)"), (None, "[0.0, 1.0)")])
def test_numbers_outside_or_no_numbers_are_refused(value, interval):
  with pytest.raises(ValueError) as error:
    validation.check_float("ema_beta", value, 0.0, 1.0, high_open=True)
  message = str(error.value)
  assert f"'ema_beta' must be a number in {interval}" in message
  assert repr(value) in message


def test_open_and_closed_ends():
  assert validation.check_float("x", 0.0, 0.0, 1.0) == 0.0
  assert validation.check_float("x", 1.0, 0.0, 1.0) == 1.0
  with pytest.raises(ValueError, match=r"'x' must be a number in \(0.0, 1.0\]"):
    validation.check_float("x", 0.0, 0.0, 1.0, low_open=True)
  with pytest.raises(ValueError, match=r"\(0.0, inf\)"):
    validation.check_float("x", math.inf, 0.0, math.inf, low_open=True, high_open=True)


# ----------------------------------------------------------------------------
# Booleans and choices.


def test_booleans_are_true_or_false_only():
  assert validation.check_bool("use_nadam", True) is True
  assert validation.check_bool("use_nadam", False) is False
  for value in (1, 0, 1.0, "true", None):
    with pytest.raises(ValueError, match=r"'use_nadam' must be true or false, got"):
      validation.check_bool("use_nadam", value)


def test_choices():
  assert validation.check_choice("gate", "mask", ("cond", "mask")) == "mask"
  with pytest.raises(ValueError, match=r"'gate' must be one of \('cond', 'mask'\), "
                                       r"got 'branch'"):
    validation.check_choice("gate", "branch", ("cond", "mask"))
  # True == 1, but a flag is no choice among numbers.
  with pytest.raises(ValueError, match="'n' must be one of"):
    validation.check_choice("n", True, (1, 2))


# ----------------------------------------------------------------------------
# One rule everywhere.


def test_the_glue_reads_with_these_checks():
  """`hyperparameters` checks with these very functions, not copies of them."""
  for name in ("check_int", "check_float", "check_bool", "check_choice"):
    assert getattr(hp, name) is getattr(validation, name)


@pytest.mark.parametrize("read, name", [
    (lambda v: hp.averaging_config({"averaging_every": v}).every, "averaging_every"),
    (lambda v: hp.averaging_config({"averaging_start_step": v}).start_step,
     "averaging_start_step"),
    (lambda v: hp.lawa_config({"lawa_k": v}).k, "lawa_k"),
    (lambda v: hp.snapshot_config({"snapshot_every": v, "snapshot_dir": "/x"}).every,
     "snapshot_every"),
    (lambda v: hp.shampoo_config({**hp.SELF_TUNING_SHAMPOO, "block_size": v})
     .transform["block_size"], "block_size"),
])
def test_every_integer_hyperparameter_follows_the_rule(read, name):
  got = read(64.0)
  assert got == 64 and type(got) is int
  for bad in (64.5, True, "64"):
    with pytest.raises(ValueError) as error:
      read(bad)
    assert f"'{name}'" in str(error.value) and repr(bad) in str(error.value)

"""The rehearsal's logic that needs no algoperf: settings, result files, skips, memory, table.

The runs themselves (through the official runner) are in tests/test_algoperf_upstream.py.
"""

import json
import os

import pytest

from weight_averaging.rehearsal import cells, launch

GIB = 2**30


def test_eval_steps_have_an_eval_to_train_from_and_a_preemption_point():
  assert cells.eval_steps(6) == [1, 3, 6]
  assert cells.eval_steps(2) == [1, 2]
  assert cells.preempt_step(6) == 3 and cells.preempt_step(2) == 1
  with pytest.raises(ValueError, match="--steps must be at least 2"):
    cells.eval_steps(1)


def test_first_point_applies_the_rehearsal_overrides(tmp_path):
  points = [{"learning_rate": 0.1, "averaging_every_fraction": 0.0005},
            {"learning_rate": 0.2}]
  path = tmp_path / "space.json"
  path.write_text(json.dumps(points))
  assert cells.first_point(str(path), "nadamw") == points[0]
  lawa = cells.first_point(str(path), "shampoo_lawa")
  assert lawa["learning_rate"] == 0.1
  assert lawa["averaging_every_fraction"] is None and lawa["averaging_every"] == 2
  assert lawa["preconditioning_every"] == 1 and lawa["start_preconditioning_step"] == 0
  path.write_text(json.dumps({"learning_rate": {"min": 0.1, "max": 1}}))
  with pytest.raises(ValueError, match="non-empty list of points"):
    cells.first_point(str(path), "nadamw")


def test_every_shipped_search_space_has_a_first_point():
  for name in cells.OURS:
    point = cells.first_point(cells.search_space(name, launch.REPO, "/nowhere"), name)
    assert "learning_rate" in point


def test_results_are_saved_reused_and_pending_keeps_the_reference_in_the_same_process(tmp_path):
  out = str(tmp_path)
  assert cells.pending(out, "ogbg", cells.SUBMISSIONS, False) == list(cells.SUBMISSIONS)
  for name in (cells.REFERENCE, "nadamw"):
    cells.save_result(out, dict(workload="ogbg", submission=name, status="passed"))
  assert cells.load_result(out, "ogbg", "nadamw")["status"] == "passed"
  assert not os.path.exists(cells.result_path(out, "ogbg", "nadamw") + ".tmp")
  # nadamw_lawa still runs, and so does the reference: the ratio's denominator.
  assert cells.pending(out, "ogbg", [cells.REFERENCE, "nadamw", "nadamw_lawa"], False) == [
      cells.REFERENCE, "nadamw_lawa"]
  assert cells.pending(out, "ogbg", [cells.REFERENCE, "nadamw"], False) == []
  assert cells.pending(out, "ogbg", ["nadamw"], True) == ["nadamw"]
  assert cells.pending(out, "ogbg", ["nadamw_lawa"], False) == ["nadamw_lawa"]


def test_last_line_of_a_traceback():
  tb = "Traceback (most recent call last):\n  File x\nValueError: shapes (1, 3) and (3,)\n\n"
  assert cells.last_line(tb) == "ValueError: shapes (1, 3) and (3,)"
  assert cells.failed("wmt", "nadamw", tb)["reason"] == "ValueError: shapes (1, 3) and (3,)"
  assert cells.last_line("") == "(no message)"


def test_memory_guard_skips_with_the_numbers_and_the_baseline():
  plan = dict(params=1 * GIB, optimizer=2 * GIB, averaging=20 * GIB, stash=1 * GIB,
              gradients=1 * GIB, temporaries=3 * GIB)
  need = cells.memory_needed(plan)
  assert need == 28 * GIB + cells.BASELINE
  assert cells.memory_skip_reason(plan, need) is None
  reason = cells.memory_skip_reason(plan, need - 1)
  assert reason.startswith("memory: memory_plan predicts a peak of 28.00 GiB")
  assert "averaging 20.00 GiB" in reason and "temporaries 3.00 GiB" in reason
  assert reason.endswith(f"it needs {cells.gib(need)}, {cells.gib(need - 1)} available")
  # A plan of the state alone (older result files) still guards.
  del plan["gradients"], plan["temporaries"]
  assert cells.memory_needed(plan) == 24 * GIB + cells.BASELINE


def test_memory_mismatches_name_the_field():
  plan = dict(params=100 * 2**20, optimizer=200 * 2**20, averaging=0, stash=0)
  assert cells.memory_mismatches(plan, plan) == []
  measured = dict(plan, optimizer=300 * 2**20, averaging=5)
  found = cells.memory_mismatches(measured, plan)
  assert len(found) == 2
  assert found[0].startswith("optimizer: 300.0 MiB measured vs 200.0 MiB planned")
  assert found[1].startswith("averaging:")


def test_available_bytes_is_the_smaller_of_machine_and_budget(tmp_path):
  meminfo, status = tmp_path / "meminfo", tmp_path / "status"
  meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    8388608 kB\n")  # 8 GiB
  status.write_text("Name: x\nVmRSS:\t 1048576 kB\n")                   # 1 GiB
  assert cells.available_bytes(12 * GIB, str(meminfo), str(status)) == 8 * GIB
  assert cells.available_bytes(4 * GIB, str(meminfo), str(status)) == 3 * GIB
  status.write_text("Name: x\n")
  with pytest.raises(ValueError, match="VmRSS not found"):
    cells.available_bytes(GIB, str(meminfo), str(status))


def test_table_orders_rows_and_formats_each_status():
  passed = dict(workload="ogbg", submission="nadamw_lawa", status="passed",
                sec_per_step=0.25, ratio=1.25, continuation="equal", restore="equal",
                memory=dict(params=GIB, optimizer=2 * GIB, averaging=0, stash=GIB),
                peak_rss=3 * GIB,
                plan=dict(params=GIB, optimizer=2 * GIB, averaging=0, stash=GIB))
  skip = cells.skipped("finewebedu_lm", "nadamw", cells.NOT_IN_CHECKOUT["finewebedu_lm"])
  fail = cells.failed("mnist", cells.REFERENCE, "Error\nTypeError: a | b")
  lines = cells.table([skip, passed, fail]).splitlines()
  assert lines[0].startswith("| workload | submission | status |")
  assert len(lines) == 5 and all(l.count("|") == len(cells.COLUMNS) + 1 for l in lines)
  assert lines[2].startswith("| mnist | reference_nadamw | failed: TypeError: a / b |")
  assert lines[3].split(" | ")[2:7] == ["passed", "0.250", "1.25", "equal", "equal"]
  assert "1.00 GiB/2.00 GiB/0.0 MiB/1.00 GiB" in lines[3]
  assert lines[4].startswith("| finewebedu_lm | nadamw | skipped: not in the algoperf checkout")


def test_unknown_names_and_missing_algoperf(tmp_path):
  with pytest.raises(ValueError, match=r"unknown workload or submission \['cifar'\]"):
    launch.rehearse(["cifar"], ["nadamw"], str(tmp_path), 6)
  results = launch.rehearse(["ogbg"], ["nadamw"], str(tmp_path), 6,
                            algoperf_dir=str(tmp_path / "no_checkout"))
  assert results[0]["status"] == "skipped"
  assert "algoperf is not installed" in results[0]["reason"]
  # A skip is a result: reused, not redone.
  assert cells.pending(str(tmp_path), "ogbg", ["nadamw"], False) == []


def test_a_traceback_names_where_it_was_raised():
  tb = ('Traceback (most recent call last):\n'
        '  File "/x/submission_runner.py", line 331, in train_once\n'
        '  File "/x/algoperf/algoperf/checkpoint_utils.py", line 127, in maybe_restore\n'
        "AttributeError: 'NoneType' object has no attribute 'items'\n")
  assert cells.with_origin(tb) == ("AttributeError: 'NoneType' object has no attribute "
                                   "'items' (at algoperf/checkpoint_utils.py:127)")
  assert cells.with_origin("plain message") == "plain message"


def _record(prepares, rows=()):
  from types import SimpleNamespace
  return SimpleNamespace(prepares=[dict(step=s, live=l, returned=r, model_state="m")
                                   for s, l, r in prepares], rows=list(rows))


def test_continuation_needs_equal_ends_and_an_average_unlike_the_live_params():
  from weight_averaging.rehearsal import driver
  main = _record([(1, "a", "x"), (3, "b", "y"), (6, "c", "z")])
  assert driver.continuation(main, _record([(6, "c", "z")])) == "equal"
  # Trained from the average after an eval: the live params at the end differ.
  assert driver.continuation(main, _record([(6, "d", "z")])) == "differs: live params"
  # Every eval's average was the live params: a wrong swap would not show.
  same = _record([(1, "a", "a"), (6, "c", "z")])
  assert driver.continuation(same, _record([(6, "c", "z")])).startswith("equal (not shown")


def test_restore_compares_the_last_eval_row():
  from weight_averaging.rehearsal import driver
  rows = [(3, {"validation/loss": 1.0, "score": 5.0}), (6, {"validation/loss": 0.5,
                                                            "score": 9.0})]
  main = _record([(6, "c", "z")], rows)
  resumed = _record([(6, "c", "z")], [(6, {"validation/loss": 0.5, "score": 2.0})])
  assert driver.compare(main, resumed, rows=True) == "equal"  # times may differ
  resumed.rows = [(6, {"validation/loss": 0.6})]
  assert driver.compare(main, resumed, rows=True) == "differs: eval validation/loss"
  resumed.rows = []
  assert driver.compare(main, resumed, rows=True) == "differs: no eval at step 6"


def test_step_seconds_leave_out_the_compiling_steps_and_jax_notes_are_not_the_error():
  assert cells.step_seconds([9.0, 8.0, 0.3, 0.1, 0.2]) == 0.2
  assert cells.step_seconds([9.0, 8.0, 0.3, 0.1]) == pytest.approx(0.2)
  assert cells.step_seconds([9.0, 8.0]) is None
  tb = ("TypeError: dot_general requires contracting dimensions to have the same shape\n\n"
        "--------------------\nFor simplicity, JAX has removed its internal frames from the "
        "traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off.\n")
  assert cells.last_line(tb).startswith("TypeError: dot_general requires")


def _fake_checkout(root):
  for name in ("submission_runner.py", "tests/reference_algorithm_tests.py"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("")
  (root / "algoperf" / "workloads" / "ogbg").mkdir(parents=True)
  return str(root)


@pytest.mark.parametrize("per_cell", [False, True])
def test_a_process_per_cell_runs_the_reference_first(tmp_path, monkeypatch, per_cell):
  calls = []
  monkeypatch.setattr(launch, "run_workload",
                      lambda workload, group, *a, log_name, **k: calls.append((group, log_name)))
  root = _fake_checkout(tmp_path / "checkout")
  launch.rehearse(["ogbg"], [cells.REFERENCE, "nadamw", "shampoo_lawa"], str(tmp_path / "out"),
                  6, algoperf_dir=root, process_per_cell=per_cell)
  if per_cell:
    assert calls == [([cells.REFERENCE], f"driver_{cells.REFERENCE}.log"),
                     (["nadamw"], "driver_nadamw.log"),
                     (["shampoo_lawa"], "driver_shampoo_lawa.log")]
  else:
    assert calls == [([cells.REFERENCE, "nadamw", "shampoo_lawa"], "driver.log")]


def test_grid_shows_each_cell_once_with_numbered_reasons():
  ref = dict(workload="ogbg", submission=cells.REFERENCE, status="passed", ratio=1.0)
  lawa = dict(workload="ogbg", submission="nadamw_lawa", status="passed", ratio=1.316)
  alone = dict(workload="wmt", submission="shampoo", status="passed", ratio=None)
  mem = [cells.skipped("wmt", s, "memory: too big") for s in ("nadamw_lawa", "shampoo_lawa")]
  bad = cells.failed("wmt", "nadamw_ema", "boom")
  lines = cells.grid([lawa, ref, alone, bad] + mem).splitlines()
  assert lines[0] == "| workload | " + " | ".join(cells.SUBMISSIONS) + " |"
  assert lines[2] == "| ogbg | pass 1.00 | . | . | pass 1.32 | . | . | . |"
  assert lines[3] == "| wmt | . | . | FAIL [1] | skip [2] | pass | . | skip [2] |"
  assert lines[5:] == ["[1] boom", "[2] memory: too big"]


def test_a_cell_alone_is_timed_against_the_saved_reference(tmp_path):
  from weight_averaging.rehearsal import driver  # pylint: disable=import-outside-toplevel
  out = str(tmp_path)
  assert driver.saved_reference_seconds(out, "wmt", 4, 2) is None
  cells.save_result(out, dict(workload="wmt", submission=cells.REFERENCE, status="passed",
                              sec_per_step=2.5, steps=4, batch_size=2))
  assert driver.saved_reference_seconds(out, "wmt", 4, 2) == 2.5
  assert driver.saved_reference_seconds(out, "wmt", 6, 2) is None   # other steps
  assert driver.saved_reference_seconds(out, "wmt", 4, 8) is None   # other batch
  cells.save_result(out, cells.failed("wmt", cells.REFERENCE, "boom"))
  assert driver.saved_reference_seconds(out, "wmt", 4, 2) is None


def test_a_crash_marks_cells_without_a_new_result_failed(tmp_path, monkeypatch):
  """A rerun (--overwrite) that dies must not leave the earlier run's result standing."""
  out = str(tmp_path / "out")
  cells.save_result(out, cells.skipped("wmt", "shampoo_ema", "memory: old guard"))
  old = cells.result_path(out, "wmt", "shampoo_ema")
  os.utime(old, (1, 1))

  def crash(cmd, **kwargs):
    cells.save_result(out, dict(workload="wmt", submission="nadamw", status="passed"))
    raise launch.subprocess.TimeoutExpired(cmd, 5)

  monkeypatch.setattr(launch.subprocess, "run", crash)
  launch.run_workload("wmt", ["nadamw", "shampoo_ema"], out, str(tmp_path), 4, 2, 2**30,
                      timeout_s=5, log=open(os.devnull, "w"))
  assert cells.load_result(out, "wmt", "nadamw")["status"] == "passed"
  redo = cells.load_result(out, "wmt", "shampoo_ema")
  assert redo["status"] == "failed" and redo["reason"].startswith("timed out after 5 s")

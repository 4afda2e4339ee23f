"""Several processes, one mesh: 2 processes x 2 CPU devices against 1 process x 4.

The multi-process runs are real: `weight_averaging.runner.launch` starts two Python
processes on localhost (each with its own XLA_FLAGS, gloo collectives and a
`jax.distributed` coordinator on a free port) that run the repository's jit
NadamW + EMA / LAWA submissions through the embedded runner. The reference is the
same worker run in this (single, 4-device) process. Cross-process all-reduces sum
in another order than in-process ones, so floats agree to rounding, not bitwise.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from weight_averaging import placement
from weight_averaging.runner import distributed, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
WORKER = os.path.join(FIXTURES, "multiprocess_worker.py")
sys.path.insert(0, FIXTURES)
import multiprocess_worker  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import process_groups  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = [f"{a}:{p}" for a in ("ema", "lawa") for p in placement.PLACEMENTS]
KILLED = "lawa:sharded:killed"  # killed at step 8, after the checkpoint at step 5
STEPS, EVAL_EVERY, KILL_AT = 10, 5, 8
TIMEOUT_S = 240  # hard limit of one launch; a hang fails the test instead of CI

needs_multiprocess_cpu = pytest.mark.skipif(
    distributed.multiprocess_cpu_unsupported() is not None,
    reason=f"2 processes x 2 CPU devices need cross-process CPU collectives: "
           f"{distributed.multiprocess_cpu_unsupported()}")


def child_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def start_launch(command, timeout_s=TIMEOUT_S, devices_per_process=2,
                 output=subprocess.PIPE):
  """The launcher of `command` x 2 processes, in its own session (pgid = its pid)."""
  return subprocess.Popen(
      [sys.executable, "-m", "weight_averaging.runner.launch", "--num_processes", "2",
       "--devices_per_process", str(devices_per_process), "--timeout_s", str(timeout_s),
       "--"] + command, cwd=ROOT, env=child_env(), stdout=output,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_launch(args, timeout_s=TIMEOUT_S, command=None, devices_per_process=2):
  """Runs the launcher (of the worker with `args`, or of `command`); kills its whole
  group if it overstays."""
  proc = start_launch(command or [sys.executable, WORKER] + args, timeout_s,
                      devices_per_process)
  try:
    out, _ = proc.communicate(timeout=timeout_s + 30)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)  # the launcher stops its processes' groups
    try:
      out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, _ = proc.communicate()
    pytest.fail(f"launch did not end in {timeout_s + 30} s:\n{out[-3000:]}")
  return proc.returncode, out


def load(out_dir, name):
  with open(os.path.join(out_dir, f"{name}.json")) as f:
    rows = json.load(f)
  with np.load(os.path.join(out_dir, f"{name}.npz")) as arrays:
    return dict(arrays), rows


def assert_same_run(got, want):
  """Same arrays (to float32 rounding) and the same eval rows (loss to rounding)."""
  (got_arrays, got_rows), (want_arrays, want_rows) = got, want
  assert sorted(got_arrays) == sorted(want_arrays)
  for key in want_arrays:
    np.testing.assert_allclose(got_arrays[key], want_arrays[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert [r["global_step"] for r in got_rows] == [r["global_step"] for r in want_rows]
  for g, w in zip(got_rows, want_rows):
    metrics = sorted(k for k in w if "/" in k)
    assert sorted(k for k in g if "/" in k) == metrics
    np.testing.assert_allclose([g[k] for k in metrics], [w[k] for k in metrics],
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The 1-process, 4-device runs (this process), uninterrupted."""
  out = str(tmp_path_factory.mktemp("one_process"))
  multiprocess_worker.run(out, CONFIGS, STEPS, EVAL_EVERY)
  return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Every config on 2 processes x 2 devices, then `KILLED`, where process 1 dies."""
  out = str(tmp_path_factory.mktemp("two_processes"))
  code, log = run_launch(["--out", out, "--configs", ",".join(CONFIGS + [KILLED]),
                          "--steps", str(STEPS), "--eval_every", str(EVAL_EVERY),
                          "--kill_process", "1", "--kill_at_step", str(KILL_AT),
                          "--kill_config", KILLED])
  return out, code, log


@needs_multiprocess_cpu
@pytest.mark.parametrize("config", CONFIGS)
def test_two_processes_equal_one_process(config, reference, two_processes):
  out, _, log = two_processes
  name = config.replace(":", "_")
  assert os.path.exists(os.path.join(out, f"{name}.npz")), log[-3000:]
  assert_same_run(load(out, name), load(reference, name))
  sizes = {}
  for run_dir, files in ((out, ("p0", "p1")), (reference, ("p0",))):
    for p in files:
      with open(os.path.join(run_dir, f"{name}.{p}.json")) as f:
        sizes[run_dir, p] = json.load(f)["averaging_state_bytes"]
  # Each process holds the parts of its own 2 devices of the 4: half the bytes the
  # single process holds (for 'sharded', a quarter of the state per device).
  assert sizes[out, "p0"] == sizes[out, "p1"] == sizes[reference, "p0"] // 2


@needs_multiprocess_cpu
def test_killed_process_and_resume_equal_uninterrupted_run(reference, two_processes):
  out, code, log = two_processes
  assert code == 128 + signal.SIGKILL, log[-3000:]  # the launcher reports the kill
  name = KILLED.replace(":", "_")
  assert not os.path.exists(os.path.join(out, f"{name}.npz"))
  code, log = run_launch(["--out", out, "--configs", KILLED, "--steps", str(STEPS),
                          "--eval_every", str(EVAL_EVERY), "--resume"])
  assert code == 0, log[-3000:]
  arrays, rows = load(out, name)
  assert [r["preemption_count"] for r in rows] == [0, 1]
  assert_same_run((arrays, rows), load(reference, "lawa_sharded"))


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
  port = distributed.free_port()
  command = [sys.executable, "-m", "weight_averaging.runner",
             f"--submission_path={multiprocess_worker.submission_path('ema')}",
             f"--tuning_search_space={os.path.join(FIXTURES, 'sgd_search_space.json')}",
             f"--experiment_dir={tmp_path}", "--experiment_name=x", "--num_processes=2",
             "--process_id=1", f"--coordinator_address=127.0.0.1:{port}",
             "--initialization_timeout=3"]
  start = time.monotonic()
  done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True,
                        text=True, timeout=120)
  assert done.returncode != 0
  assert (f"could not reach the jax.distributed coordinator at 127.0.0.1:{port} "
          "within 3 s") in done.stderr, done.stderr[-2000:]
  assert time.monotonic() - start < 120
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_processes=2, process_id=0), "coordinator_address"),
    (dict(num_processes=2, coordinator_address="h:1"), "process_id is not set"),
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), r"\[0, 2\)"),
    (dict(num_processes=2, process_id=1, coordinator_address="h"), "'host:port'"),
    (dict(num_processes=1, process_id=1), "must be 0"),
])
def test_bad_distributed_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.config_from(environ={}, **kwargs)


def test_settings_come_from_the_environment_the_launcher_sets():
  env = launch.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
                           1, 3, 2, "127.0.0.1:1234")
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
  assert distributed.config_from(environ=env) == distributed.Config("127.0.0.1:1234", 3, 1)
  assert distributed.config_from(environ={}) is None
  assert launch.process_command(["x", "--id={process_id}/{num_processes}"], 1, 3, "a:1") \
      == ["x", "--id=1/3"]
  with pytest.raises(ValueError, match="devices_per_process"):
    launch.launch(["true"], 2, 0)


# ----------------------------------------------------------------------------
# Processes: nothing the launcher started outlives it, and a failure ends it at once.


def shell_processes(out_dir, fail):
  """Each process: a shell that leaves a grandchild (``sleep``) and writes its pid (its
  group's id); process 1 exits 3 once process 0 is up if `fail`, else both wait."""
  child = os.path.join(out_dir, "child_{process_id}")
  ready = os.path.join(out_dir, "child_0")
  script = (f"sleep 300 & echo $$ > {child}.tmp && mv {child}.tmp {child}; " +
            (f"if [ {{process_id}} = 1 ]; then while [ ! -f {ready} ]; do sleep 0.05; "
             "done; exit 3; fi; " if fail else "") + "wait")
  return ["sh", "-c", script]


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")


@needs_proc
@pytest.mark.parametrize("how", ["a process fails", "SIGTERM to the launcher"])
def test_no_process_the_launcher_started_survives_it(tmp_path, how):
  """A failing process, or SIGTERM, ends the launcher and every process group it started:
  the shells and the grandchildren they left running."""
  # Output to a file: a grandchild left running would hold a pipe open.
  output = open(tmp_path / "launch.log", "w")
  proc = start_launch(shell_processes(str(tmp_path), fail=how == "a process fails"),
                      devices_per_process=1, output=output)
  pgids = {proc.pid}
  try:
    process_groups.wait_for_files([tmp_path / "child_0", tmp_path / "child_1"], proc=proc)
    pgids |= {int((tmp_path / f"child_{i}").read_text()) for i in (0, 1)}
    if how == "SIGTERM to the launcher":
      proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)  # a guard against a hang, not a measurement
    out = (tmp_path / "launch.log").read_text()
    expected = 3 if how == "a process fails" else 128 + signal.SIGTERM
    assert proc.returncode == expected, out
    assert ("process 1 exited with status 3" if expected == 3 else "stopped by SIGTERM") in out
    assert process_groups.survivors(pgids) == []
  finally:
    process_groups.kill_groups(pgids)
    output.close()


def test_a_runner_that_fails_early_ends_the_launch_at_once(tmp_path):
  """Process 1 of the runner fails at once (its search space is not JSON); process 0 waits
  for it in a collective. The failed process exits at once instead of waiting in
  jax.distributed's shutdown (about 120 s), and the launcher stops process 0."""
  good = os.path.join(FIXTURES, "sgd_search_space.json")
  (tmp_path / "space_0.json").write_text(open(good).read())
  (tmp_path / "space_1.json").write_text("{not json")
  command = [sys.executable, "-m", "weight_averaging.runner",
             f"--submission_path={os.path.join(FIXTURES, 'sgd_submission.py')}",
             f"--tuning_search_space={tmp_path}/space_{{process_id}}.json",
             f"--experiment_dir={tmp_path}", "--experiment_name=x",
             "--max_global_steps=2", "--progress=false"]
  code, out = run_launch([], command=command, devices_per_process=1)
  assert code == 1, out[-3000:]
  assert f"search space {tmp_path}/space_1.json is not valid JSON" in out
  # The failed process took the immediate exit, not jax.distributed's waiting shutdown.
  assert "process 1 of 2 failed; exiting now" in out
  assert "process 1 exited with status 1; stopping the others" in out
  assert not os.path.exists(tmp_path / "x")

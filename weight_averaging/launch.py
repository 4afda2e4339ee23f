"""Starts N processes of one command on this machine, as a cluster would start them.

``python -m weight_averaging.launch --num_processes 2 --devices_per_process 2 -- \\
    python -m weight_averaging.runner --submission_path=... ...``

Each process gets, in its environment:

* ``XLA_FLAGS=--xla_force_host_platform_device_count=M`` and ``JAX_PLATFORMS=cpu``:
  M simulated CPU devices (other XLA flags are kept);
* ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``: collectives across processes;
* ``JAX_COORDINATOR_ADDRESS`` (process 0 serves it; a free localhost port unless
  ``--coordinator_address`` says otherwise), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, which `weight_averaging.distributed.config_from` (and so the
  runner) reads.

The tokens ``{process_id}``, ``{num_processes}`` and ``{coordinator_address}`` in
the command are replaced per process. If one process fails, the others are
stopped (they would otherwise wait for it in a collective); the launcher exits
with the first failure's status (128 + signal for a process killed by a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from weight_averaging import distributed


def _check_positive(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return value


def process_env(base: dict, process_id: int, num_processes: int, devices_per_process: int,
                coordinator_address: str) -> dict:
  """The environment of process `process_id`: simulated devices and where to meet."""
  env = dict(base)
  env["XLA_FLAGS"] = distributed.with_device_count(env.get("XLA_FLAGS", ""),
                                                    devices_per_process)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault(distributed.ENV_CPU_COLLECTIVES, "gloo")
  env[distributed.ENV_COORDINATOR] = coordinator_address
  env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
  env[distributed.ENV_PROCESS_ID] = str(process_id)
  return env


def process_command(command: Sequence[str], process_id: int, num_processes: int,
                    coordinator_address: str) -> List[str]:
  """`command` with the per-process tokens filled in."""
  tokens = {"{process_id}": str(process_id), "{num_processes}": str(num_processes),
            "{coordinator_address}": coordinator_address}
  out = []
  for arg in command:
    for token, value in tokens.items():
      arg = arg.replace(token, value)
    out.append(arg)
  return out


def _status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _stop(procs, grace_s: float) -> None:
  """SIGTERM to every live process, then SIGKILL after `grace_s`."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1,
           coordinator_address: Optional[str] = None, timeout_s: Optional[float] = None,
           grace_s: float = 5.0, env: Optional[dict] = None) -> int:
  """Runs `command` as `num_processes` processes; returns the group's exit status.

  0 when every process exits 0; otherwise the status of the first process to fail
  (the others are stopped), or 124 when `timeout_s` passes first.
  """
  _check_positive("num_processes", num_processes)
  _check_positive("devices_per_process", devices_per_process)
  if not command:
    raise ValueError("command is empty: give it after '--'")
  if timeout_s is not None and timeout_s <= 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
  address = coordinator_address or f"127.0.0.1:{distributed.free_port()}"
  distributed.split_address(address)
  base = dict(os.environ if env is None else env)
  procs = []
  previous = {}

  def forward(signum, frame):
    del frame
    _stop(procs, grace_s)
    sys.exit(128 + signum)

  for signum in (signal.SIGTERM, signal.SIGINT):
    previous[signum] = signal.signal(signum, forward)
  try:
    for pid in range(num_processes):
      procs.append(subprocess.Popen(
          process_command(command, pid, num_processes, address),
          env=process_env(base, pid, num_processes, devices_per_process, address)))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        _stop(procs, grace_s)
        return _status(failed[0])
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        print(f"weight_averaging.launch: timed out after {timeout_s:g} s; stopping "
              f"{num_processes} processes", file=sys.stderr)
        _stop(procs, grace_s)
        return 124
      time.sleep(0.05)
  finally:
    _stop(procs, grace_s)
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: python -m weight_averaging.launch --num_processes N "
          "--devices_per_process M [--coordinator_address HOST:PORT] [--timeout_s S] "
          "-- COMMAND...", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(
      prog="python -m weight_averaging.launch",
      description="Start N processes of COMMAND on localhost, M CPU devices each.")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0 (default: a free localhost port)")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="stop every process after this many seconds")
  args = parser.parse_args(argv[:split])
  try:
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process,
                  args.coordinator_address, args.timeout_s)
  except ValueError as e:
    parser.error(str(e))
    return 2


if __name__ == "__main__":
  sys.exit(main())

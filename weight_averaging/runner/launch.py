"""Starts N processes of one command on this machine, as a cluster would start them.

``python -m weight_averaging.runner.launch --num_processes 2 --devices_per_process 2 -- \\
    python -m weight_averaging.runner --submission_path=... ...``

Each process gets, in its environment:

* ``XLA_FLAGS=--xla_force_host_platform_device_count=M`` and ``JAX_PLATFORMS=cpu``:
  M simulated CPU devices (other XLA flags are kept);
* ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``: collectives across processes;
* ``JAX_COORDINATOR_ADDRESS`` (process 0 serves it; a free localhost port unless
  ``--coordinator_address`` says otherwise), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, which `weight_averaging.runner.distributed.config_from` (and so the
  runner) reads.

The tokens ``{process_id}``, ``{num_processes}`` and ``{coordinator_address}`` in
the command are replaced per process. Each process leads its own process group,
and stopping a process stops its whole group (anything it started, too). If one
process fails, the others are stopped (they would otherwise wait for it in a
collective); the launcher exits with the first failure's status (128 + signal for a
process killed by a signal). SIGTERM or SIGINT to the launcher stops every group,
and it exits with 128 + that signal. When it ends, however it ends, no process it
started is left running (unless the launcher itself is SIGKILLed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from weight_averaging import processes
from weight_averaging.runner import distributed


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


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1,
           coordinator_address: Optional[str] = None, timeout_s: Optional[float] = None,
           grace_s: float = 5.0, env: Optional[dict] = None) -> int:
  """Runs `command` as `num_processes` processes; returns the group's exit status.

  0 when every process exits 0; otherwise the status of the first process to fail
  (the others are stopped), 124 when `timeout_s` passes first, or 128 + signum when
  the launcher gets SIGTERM or SIGINT. Every process group is stopped before it returns.
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
  with processes.signals_raise():
    try:
      try:
        for pid in range(num_processes):
          procs.append(processes.start(
              process_command(command, pid, num_processes, address),
              env=process_env(base, pid, num_processes, devices_per_process, address)))
        return _wait(procs, timeout_s)
      finally:
        processes.stop(procs, grace_s)
    except processes.Terminated as e:
      print(f"weight_averaging.runner.launch: {e}; stopped {num_processes} processes",
            file=sys.stderr)
      return e.exit_status


def _wait(procs, timeout_s: Optional[float]) -> int:
  """Polls `procs` until one fails, all succeed or `timeout_s` passes (see `launch`)."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, code = failed[0]
      print(f"weight_averaging.runner.launch: process {i} exited with status "
            f"{_status(code)}; stopping the others", file=sys.stderr)
      return _status(code)
    if all(c == 0 for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      print(f"weight_averaging.runner.launch: timed out after {timeout_s:g} s; stopping "
            f"{len(procs)} processes", file=sys.stderr)
      return 124
    time.sleep(0.05)


_USAGE = ("python -m weight_averaging.runner.launch --num_processes N "
          "--devices_per_process M [--coordinator_address HOST:PORT] [--timeout_s S] "
          "-- COMMAND...")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m weight_averaging.runner.launch", usage=_USAGE,
      description="Start N processes of COMMAND on localhost, M CPU devices each.")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0 (default: a free localhost port)")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="stop every process after this many seconds")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    if {"-h", "--help"} & set(argv):
      _parser().print_help()
      return 0
    print(f"usage: {_USAGE}\nweight_averaging.runner.launch: no command to run: give it "
          "after '--' (e.g. ... -- python -m weight_averaging.runner --submission_path=...)",
          file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = _parser()
  args = parser.parse_args(argv[:split])
  try:
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process,
                  args.coordinator_address, args.timeout_s)
  except ValueError as e:
    parser.error(str(e))
    return 2


if __name__ == "__main__":
  sys.exit(main())

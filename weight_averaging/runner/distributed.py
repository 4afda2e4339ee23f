"""Several processes, one mesh: the set-up around `jax.distributed`.

JAX's multi-controller runtime runs one Python process per host (or, for local
testing, several per machine); after `jax.distributed.initialize` every process
sees all devices in `jax.devices()` and addresses only its own
(`jax.local_devices()`). Nothing here replaces that runtime; these small functions
only

* read where the coordinator is and which process this is, from arguments or from
  the environment the launcher (`weight_averaging.runner.launch`) or a cluster sets;
* turn on cross-process collectives for the CPU backend (gloo);
* fail with a clear error, within a bounded time, when the coordinator cannot be
  reached (JAX itself aborts the process with a message about missing heartbeats);
* give the runner its few cross-process primitives: a barrier, a broadcast from
  process 0 and "am I the process that writes files";
* ask XLA for simulated CPU devices (`with_device_count`, `simulate_devices`);
* end a failed process at once (`exit_at_once_on_failure`): the other processes would
  otherwise keep it alive, waiting for it in a collective, until a timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from typing import Iterator, Mapping, NamedTuple, Optional

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_CPU_COLLECTIVES = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"  # a jax config option

# Oldest jax whose CPU backend runs collectives across processes that each hold
# several devices. With jax/jaxlib 0.4.28 a cross-process all-reduce over
# 2 processes x 2 CPU devices never starts: gloo's context set-up times out
# waiting for the key ``cpu:gloo/0,1,2,3/1``; one device per process works there.
# 0.4.31 is also the first release with `jax.make_array_from_process_local_data`.
MIN_MULTIPROCESS_CPU_JAX = (0, 4, 31)


class Config(NamedTuple):
  """Where the coordinator listens, how many processes there are, which one this is."""

  coordinator_address: str
  num_processes: int
  process_id: int


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(xla_flags: str, num_devices: int) -> str:
  """`xla_flags` (an ``XLA_FLAGS`` value) asking for `num_devices` CPU devices instead."""
  kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={num_devices}"])


def simulate_devices(num_devices: Optional[int]) -> None:
  """Asks XLA for `num_devices` CPU devices (None: leave the count as it is); must run
  before JAX starts its backend.

  Raises:
    ValueError: `num_devices` < 1, named as the flag ``--num_devices``.
  """
  if num_devices is None:
    return
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"--num_devices must be an integer >= 1, got {num_devices!r} (leave "
                     "it unset to keep the machine's devices)")
  os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), num_devices)


def _int_or_none(name: str, value) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be an integer, got {value!r}") from e


def config_from(coordinator_address: Optional[str] = None,
                num_processes: Optional[int] = None,
                process_id: Optional[int] = None,
                environ: Optional[Mapping[str, str]] = None) -> Optional[Config]:
  """The multi-process set-up from arguments, else the environment; None for one process.

  An argument left ``None`` is read from ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what `weight_averaging.runner.launch`
  sets). One process (``num_processes`` unset or 1) needs no coordinator.

  Raises:
    ValueError: a missing or inconsistent piece, named.
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  n = (num_processes if num_processes is not None
       else _int_or_none(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES)))
  pid = (process_id if process_id is not None
         else _int_or_none(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID)))
  if n is None or n == 1:
    if pid not in (None, 0):
      raise ValueError(f"process_id must be 0 with one process, got {pid}")
    return None
  if n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n}")
  if pid is None:
    raise ValueError(f"num_processes is {n} but process_id is not set (flag "
                     f"--process_id or {ENV_PROCESS_ID})")
  if not 0 <= pid < n:
    raise ValueError(f"process_id must be in [0, {n}), got {pid}")
  if not address:
    raise ValueError(f"num_processes is {n} but coordinator_address is not set (flag "
                     f"--coordinator_address or {ENV_COORDINATOR}, as host:port)")
  split_address(address)
  return Config(address, n, pid)


def split_address(address: str):
  """``(host, port)`` of ``'host:port'``, or a ValueError naming the address."""
  host, sep, port = str(address).rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator_address must be 'host:port', got {address!r}")
  return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nothing listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.2) -> None:
  """Returns once a TCP connection to `address` succeeds; raises after `timeout_s`.

  Process 0 starts the coordinator inside `jax.distributed.initialize`, so the
  others may come up first: they retry until the deadline. JAX's own client would
  abort the whole process on failure; this check raises a Python error instead.

  Raises:
    ConnectionError: nothing accepted a connection at `address` in `timeout_s`.
  """
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout_s))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise ConnectionError(
          f"could not reach the jax.distributed coordinator at {address} within "
          f"{timeout_s:g} s ({last}). Is process 0 running, and is {address} its "
          f"address as seen from this host?")
    time.sleep(poll_s)


def jax_version() -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def multiprocess_cpu_unsupported() -> Optional[str]:
  """Why this jax cannot run several CPU processes with several devices each, or None."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax_version() < MIN_MULTIPROCESS_CPU_JAX:
    return (f"jax {jax.__version__} < "
            f"{'.'.join(map(str, MIN_MULTIPROCESS_CPU_JAX))}: its gloo CPU collectives "
            "cannot run a collective across processes that hold several CPU devices "
            "each (gloo context set-up times out in GetKeyValue 'cpu:gloo/...'), and "
            "it lacks jax.make_array_from_process_local_data")
  return None


def enable_cpu_collectives() -> None:
  """Selects gloo for cross-process collectives on the CPU backend (before it starts).

  A no-op for other backends (GPUs and TPUs bring their own). The environment
  variable, when set, wins.
  """
  import jax  # pylint: disable=g-import-not-at-top
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return
  impl = os.environ.get(ENV_CPU_COLLECTIVES, "gloo")
  try:
    jax.config.update("jax_cpu_collectives_implementation", impl)
  except AttributeError:  # pragma: no cover - jax without the option
    jax.config.update("jax_cpu_enable_gloo_collectives", True)


def initialize(config: Optional[Config], timeout_s: float = 300.0) -> bool:
  """`jax.distributed.initialize` for `config`; False (nothing done) for one process.

  Call it before any other JAX call. Processes other than 0 first wait for the
  coordinator to accept connections (`wait_for_coordinator`), so an unreachable
  coordinator is a `ConnectionError` after `timeout_s`, never a hang.
  """
  if config is None:
    return False
  if timeout_s <= 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
  import jax  # pylint: disable=g-import-not-at-top
  enable_cpu_collectives()
  if config.process_id != 0:
    wait_for_coordinator(config.coordinator_address, timeout_s)
  jax.distributed.initialize(config.coordinator_address, config.num_processes,
                             config.process_id,
                             initialization_timeout=max(1, int(timeout_s)))
  return True


@contextlib.contextmanager
def exit_at_once_on_failure() -> Iterator[None]:
  """With several processes, an exception in the block ends this process at once.

  A process that raises would otherwise exit through `jax.distributed`'s shutdown,
  which waits for the other processes, while they wait for it in a collective: the
  run hangs until a key-value timeout (about two minutes). Here the traceback is
  printed and the process ends with `os._exit` (status 1, or the `SystemExit` code), so
  the launcher or the cluster sees the failure now and stops the others. With one
  process the exception propagates as usual.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    code = e.code if isinstance(e, SystemExit) else 1
    if code in (0, None) or process_count() <= 1:
      raise
    traceback.print_exc()
    print(f"process {process_index()} of {process_count()} failed; exiting now",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code if isinstance(code, int) else 1)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# What the runner needs once processes are up.


def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes the files every process would write alike."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op for one process)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value):
  """Process 0's `value` (a NumPy-convertible array or scalar) on every process."""
  if process_count() == 1:
    return value
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def gather_to_host(tree):
  """Every leaf as a full NumPy array on every process (tests and small diagnostics).

  A leaf sharded across processes is all-gathered; a local or replicated one is
  just copied. Not for training-time use: it moves whole arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree_util.tree_map(leaf, tree)

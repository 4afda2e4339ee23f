"""Child processes stopped whole, signals turned into clean exits, one owner per directory.

What the command lines (the launcher, the embedded runner, ``scripts/run_study.py``) share:

* `start` runs a command as the leader of a new process group (its own session), so that
  `stop` reaches whatever the command started in turn (a shell's children, a runner's
  helpers): SIGTERM to the whole group, up to a grace period for its leader to exit, then
  SIGKILL to whatever is left. A group is stopped even when its leader has already exited:
  a grandchild may live on. `call` is both, for one command run to its end.
* `signals_raise` turns SIGTERM and SIGINT into a `Terminated` exception in the main thread,
  so that the ``finally`` blocks that stop the children run, and the command exits with
  ``128 + signal`` as a shell reports a killed process.
* `exclusive`: an exclusive `fcntl.flock` on a lock file that holds the owner's pid; a second
  owner is refused with an error naming that pid. The kernel releases the lock when its
  owner dies, so a killed run leaves no stale lock (the file stays, unlocked). The lock is
  advisory: it keeps out only the programs that take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from typing import Iterator, List, Optional, Sequence


def start(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
  """`subprocess.Popen` of `argv` as the leader of a new process group (pgid = its pid)."""
  return subprocess.Popen(list(argv), start_new_session=True, **popen_kwargs)


def call(argv: Sequence[str], grace_s: float = 5.0, **popen_kwargs) -> int:
  """Runs `argv` (as `start` does) to its end and returns its exit status; its group is
  stopped (`stop`) when it ends, or when the wait is cut short (`Terminated`)."""
  proc = start(argv, **popen_kwargs)
  try:
    return proc.wait()
  finally:
    stop([proc], grace_s)


def _signal_group(pgid: int, signum: int) -> None:
  try:
    os.killpg(pgid, signum)
  except (ProcessLookupError, PermissionError):  # the group is gone
    pass


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 5.0) -> None:
  """Stops the process groups of `procs` (from `start`), leaders exited or not.

  SIGTERM to every group; up to `grace_s` seconds (in all) for the leaders to exit; then
  SIGKILL to every group, which ends any member left, and the leaders are reaped. A
  SIGTERM or SIGINT that arrives meanwhile (under `signals_raise`) is raised after it.
  """
  with _deferred():
    for p in procs:
      _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    for p in procs:
      _signal_group(p.pid, signal.SIGKILL)
      p.wait()


class Terminated(Exception):
  """SIGTERM or SIGINT arrived (see `signals_raise`); `exit_status` is ``128 + signum``."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by {signal.Signals(signum).name}")
    self.signum = signum

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


class _Signals:
  """The first signal under `signals_raise`: raised at once, or after a `_deferred` block."""

  def __init__(self):
    self.fired: Optional[int] = None
    self.deferring = 0

  def handle(self, signum, frame):
    del frame
    if self.fired is None:
      self.fired = signum
      if not self.deferring:
        raise Terminated(signum)


_ACTIVE: List[_Signals] = []


@contextlib.contextmanager
def signals_raise(signums: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
  """Within the block, the first of `signums` raises `Terminated`; later ones are ignored,
  so that the clean-up it starts is not itself cut short. A no-op outside the main thread
  (where Python runs no signal handler)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  state = _Signals()
  previous = {s: signal.signal(s, state.handle) for s in signums}
  _ACTIVE.append(state)
  try:
    yield
  finally:
    _ACTIVE.remove(state)
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _deferred() -> Iterator[None]:
  """A signal that arrives within the block is raised after it (when nothing else is)."""
  state = _ACTIVE[-1] if _ACTIVE else None
  if state is None:
    yield
    return
  already = state.fired is not None
  state.deferring += 1
  try:
    yield
  finally:
    state.deferring -= 1
  if not already and state.fired is not None and not state.deferring:
    raise Terminated(state.fired)


class Busy(RuntimeError):
  """Another process holds the lock; `pid` is its pid (None if it could not be read)."""

  def __init__(self, message: str, pid: Optional[int]):
    super().__init__(message)
    self.pid = pid


def _holder(fd: int) -> Optional[int]:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 64).decode(errors="replace").strip()
  return int(text) if text.isdigit() else None


@contextlib.contextmanager
def exclusive(lock_path: str, what: str) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (created, with its directory) for the block.

  Raises:
    Busy: another process holds it; the message names `what`, the holder's pid and the
      lock file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      pid = _holder(fd)
      raise Busy(f"{what} is in use by another process (pid {pid if pid else 'unknown'}, "
                 f"holding {lock_path}): wait for it to end, or stop it, then run again",
                 pid) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield
  finally:
    os.close(fd)  # releases the lock

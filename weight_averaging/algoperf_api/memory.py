"""The device memory a submission's state takes, and the placement ``'auto'`` picks.

Per device, an averaged submission holds (`Footprint`, bytes)::

  params     P   the model's params, replicated by the runner
  optimizer  O   the optax state, replicated: ``jax.eval_shape(optimizer.init, params)``
  averaging  A   the averager's state in device memory, by placement (below)
  stash      S   the live params parked in the state during an eval: one more P
  host       H   what placement ``'host'`` keeps in pinned host memory (not device)

and A, H by placement, for N devices (read off the averager's own ``init``, so the
counts follow the code: EMA keeps one float32 copy, LAWA ``k`` copies in the params'
dtypes plus a float32 sum):

* ``replicated``: A = the whole state, H = 0;
* ``sharded``: A = the state laid out as `placement.Sharded` stores it, ``ceil(n / N)``
  of each leaf's ``n`` elements per device;
* ``host``: H = the fields the state's type names in ``HOST_FIELDS``
  (`placement.offloaded_leaves`: EMA's average, LAWA's ring), A = the rest (the
  counters and LAWA's sum). A replicated copy of H per device.

**What** ``'auto'`` **picks** (`choose`): the first of ``replicated``, ``sharded``,
``host`` whose total P + O + A + S is at most `FRACTION` (0.6) of the device's limit,
"fits comfortably": the other 40% is left to what the state does not count
(activations, gradients, XLA's temporaries). For scale: the largest state AlgoPerf's
reference NadamW itself keeps, Criteo's 6.0 GiB, is 47% of a 16 GB V100's limit. When
none fits, the one with the fewest device bytes, and a warning. ``sharded`` and
``host`` are candidates under the jit API only (the pmap API refuses both,
`builder.resolve_placement`), and ``host`` only where the backend has ``pinned_host``
memory; under pmap ``'auto'`` is therefore always ``replicated``, with a warning when
that does not fit. Host RAM is not checked: ``host`` takes H per device of it.

**The device's limit** (`device_limit`): the environment variable `DEVICE_BYTES_ENV`
if set (bytes, or a number with a unit: ``40GiB``, ``16GB``), else the device's
``memory_stats()['bytes_limit']`` (on a GPU, XLA's allocator limit: the client's
memory fraction of the GPU, 0.75 by default and 0.80 for the workloads AlgoPerf's
runner raises it on). A backend that reports none (the CPU) and no variable: the
state is assumed to fit replicated, so ``'auto'`` is ``replicated`` there.

The decision is made once, at ``init_optimizer_state``, and logged in one line with
the numbers (`describe`). With several processes, process 0's decision holds for all.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from weight_averaging import averagers
from weight_averaging import placement as placement_lib

_LOG = logging.getLogger(__name__)

FRACTION = 0.6
DEVICE_BYTES_ENV = "WEIGHT_AVERAGING_DEVICE_BYTES"
_AXIS = "memory_plan"  # a vmapped axis standing for the devices, in `averaging_bytes`
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

AveragerFor = Callable[[placement_lib.Placement], averagers.Averager]


class Footprint(NamedTuple):
  """Bytes per device of one submission's state under one placement."""

  params: int
  optimizer: int
  averaging: int  # in device memory
  stash: int
  host: int = 0   # in pinned host memory (placement 'host')

  @property
  def device(self) -> int:
    """Device bytes of the whole state: params + optimizer + averaging + stash."""
    return self.params + self.optimizer + self.averaging + self.stash


# ----------------------------------------------------------------------------
# Counting.


def leaf_bytes(x) -> int:
  """Bytes of one array, tracer or `jax.ShapeDtypeStruct`."""
  return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree: Any) -> int:
  """Bytes of every leaf of `tree` (``None`` leaves are empty subtrees)."""
  return sum(leaf_bytes(x) for x in jax.tree_util.tree_leaves(tree))


def abstract(tree: Any, device_axis: bool = False) -> Any:
  """`tree` as `jax.ShapeDtypeStruct` leaves; `device_axis`: drop pmap's leading axis."""
  def leaf(x):
    shape = tuple(np.shape(x))
    return jax.ShapeDtypeStruct(shape[1:] if device_axis else shape, x.dtype)
  return jax.tree_util.tree_map(leaf, tree)


def averaging_bytes(averager_for: AveragerFor, params: Any, placement: str,
                    num_devices: int) -> Tuple[int, int]:
  """``(device, host)`` bytes per device of the averager's state under `placement`.

  `averager_for(p)` builds the averager with placement `p`. Its ``init`` runs under
  `jax.eval_shape` only (nothing is allocated), in the pmap layout: ``sharded`` on a
  vmapped axis of `num_devices` entries, each holding one device's slice.
  """
  if placement not in placement_lib.PLACEMENTS:
    raise ValueError(f"placement must be one of {placement_lib.PLACEMENTS}, got "
                     f"{placement!r}")
  if placement == "sharded":
    init = averager_for(placement_lib.sharded(axis_name=_AXIS)).init
    state = jax.eval_shape(jax.vmap(init, in_axes=None, axis_name=_AXIS,
                                    axis_size=num_devices), params)
    return tree_bytes(state) // num_devices, 0
  state = jax.eval_shape(averager_for(placement_lib.replicated(axis_name=_AXIS)).init,
                         params)
  if placement == "replicated":
    return tree_bytes(state), 0
  offloaded = jax.tree_util.tree_leaves(placement_lib.offloaded_leaves(state))
  host = sum(leaf_bytes(x) for x, off in zip(jax.tree_util.tree_leaves(state), offloaded)
             if off)
  return tree_bytes(state) - host, host


def footprints(params: Any, optimizer, averager_for: Optional[AveragerFor],
               placements: Sequence[str], num_devices: int,
               tracked: Any = None) -> Dict[str, Footprint]:
  """`Footprint` per placement for abstract `params` (one device's shapes).

  `optimizer`: the optax transform (its state counted by ``eval_shape`` of its
  ``init`` on the floating params, as the builder calls it). `averager_for`:
  ``None`` for a submission without averaging (no averaging state, no stash).
  `tracked`: the abstract tree the averager averages and the stash holds (default
  `params`; ``(params, model_state)`` under ``averaging_model_state='average'``).
  """
  tracked = params if tracked is None else tracked
  p_bytes = tree_bytes(params)
  o_bytes = tree_bytes(jax.eval_shape(optimizer.init, averagers.floating_part(params)))
  out = {}
  for name in placements:
    if averager_for is None:
      out[name] = Footprint(p_bytes, o_bytes, 0, 0)
      continue
    device, host = averaging_bytes(averager_for, tracked, name, num_devices)
    out[name] = Footprint(p_bytes, o_bytes, device, tree_bytes(tracked), host)
  return out


# ----------------------------------------------------------------------------
# Deciding.


def candidates(api: str, host_available: bool) -> Tuple[str, ...]:
  """The placements ``'auto'`` may pick under `api`, in order of preference."""
  if api == "pmap":
    return ("replicated",)
  return ("replicated", "sharded") + (("host",) if host_available else ())


def choose(options: Mapping[str, Footprint], limit: Optional[int],
           fraction: float = FRACTION) -> Tuple[str, bool]:
  """``(placement, fits)``: the first of `options` (ordered) that fits `fraction` x `limit`.

  ``limit`` None (unknown): the first, assumed to fit. None fits: the one with the
  fewest device bytes (the first of equals), ``fits`` False.
  """
  names = list(options)
  if limit is None:
    return names[0], True
  budget = fraction * limit
  for name in names:
    if options[name].device <= budget:
      return name, True
  return min(names, key=lambda n: options[n].device), False


def parse_bytes(text: str, name: str = DEVICE_BYTES_ENV) -> int:
  """``'42949672960'``, ``'40GiB'``, ``'16 GB'``, ``'1.5e9'`` as bytes (> 0)."""
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
  unit = match and match.group(2).upper()
  try:
    value = float(match.group(1)) * _UNITS[unit] if match else math.nan
  except (ValueError, KeyError):
    value = math.nan
  if not value > 0 or math.isinf(value):
    raise ValueError(f"{name} = {text!r}: give the device memory in bytes, or a number "
                     "with a unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 40GiB")
  return int(value)


def device_limit(device=None, environ: Optional[Mapping[str, str]] = None
                 ) -> Tuple[Optional[int], str]:
  """``(bytes or None, where it came from)``: `DEVICE_BYTES_ENV`, else ``memory_stats()``."""
  environ = os.environ if environ is None else environ
  raw = environ.get(DEVICE_BYTES_ENV)
  if raw:
    return parse_bytes(raw), f"${DEVICE_BYTES_ENV}"
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    stats = None
  limit = (stats or {}).get("bytes_limit")
  if limit:
    return int(limit), f"{device.platform} memory_stats()['bytes_limit']"
  return None, (f"the {device.platform} backend reports no memory_stats() and "
                f"${DEVICE_BYTES_ENV} is unset")


def human(n: float) -> str:
  """Bytes in binary units, three significant digits: ``'2.01 GiB'``."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.3g} {unit}"
  return f"{int(n)} B"


def describe(choice: str, fits: bool, options: Mapping[str, Footprint],
             limit: Optional[int], source: str, num_devices: int,
             fraction: float = FRACTION) -> str:
  """The one log line: the choice, each candidate's bytes, the budget and its source."""
  first = next(iter(options.values()))
  parts = []
  for name, f in options.items():
    host = f" + {human(f.host)} pinned host" if f.host else ""
    parts.append(f"{name} {human(f.averaging)}{host} (total {human(f.device)})")
  if limit is None:
    budget = f"device memory unknown ({source}): assuming {choice} fits"
  else:
    budget = (f"budget {human(fraction * limit)} = {fraction:g} x {human(limit)} "
              f"({source})" + ("" if fits else f"; none fits, {choice} needs the fewest"))
  return (f"averaging_placement 'auto' -> '{choice}' on {num_devices} device(s): per "
          f"device params {human(first.params)}, optimizer {human(first.optimizer)}, "
          f"stash {human(first.stash)}, averaging {'; '.join(parts)}; {budget}")


def placement_for(name: str, api: str, params: Any, optimizer,
                  averager_for: AveragerFor, devices: Optional[Sequence[Any]] = None,
                  *, tracked: Any = None, limit: Any = "device",
                  environ: Optional[Mapping[str, str]] = None,
                  host_available: Optional[bool] = None) -> str:
  """`name` itself, or for ``'auto'`` the placement `choose` picks, logged in one line.

  Args:
    name: the ``averaging_placement`` hyperparameter.
    api: ``'jit'`` or ``'pmap'``; `params` as the runner hands them (pmap: with the
      leading device axis).
    optimizer, averager_for: as in `footprints`.
    tracked: what the averager averages, laid out as `params` (default `params`).
    devices: the devices the step runs on (default: all, local ones under pmap).
    limit: ``'device'`` reads `device_limit`; an int or None injects it.
    environ, host_available: injected for tests (default: ``os.environ``, the
      backend's ``pinned_host`` support).
  """
  if name != placement_lib.AUTO:
    return name
  if devices is None:
    devices = jax.local_devices() if api == "pmap" else jax.devices()
  local = [d for d in devices if d.process_index == jax.process_index()] or devices
  source = "given"
  if limit == "device":
    limit, source = device_limit(local[0], environ)
  if host_available is None:
    host_available = placement_lib.host().available
  pmap = api == "pmap"
  options = footprints(abstract(params, device_axis=pmap), optimizer, averager_for,
                       candidates(api, host_available), len(devices),
                       None if tracked is None else abstract(tracked, device_axis=pmap))
  choice, fits = choose(options, limit)
  if jax.process_count() > 1:
    # Every process must compile the same step: process 0's choice (its first device's
    # limit) holds for all, whatever the others' limits or environment say.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    index = multihost_utils.broadcast_one_to_all(np.int32(list(options).index(choice)))
    choice = list(options)[int(index)]
    fits = options[choice].device <= FRACTION * limit if limit is not None else True
  line = describe(choice, fits, options, limit, source, len(devices)) + (
      f"; process 0 decides for all {jax.process_count()} processes"
      if jax.process_count() > 1 else "")
  if fits:
    _LOG.info("%s", line)
  else:
    remedy = ("the pmap API has only 'replicated': use the jit API (where 'auto' can "
              "pick 'sharded' or 'host'), " if api == "pmap" else "")
    _LOG.warning("%s. It may not fit: %skeep fewer copies (a smaller lawa_k; EMA keeps "
                 "one), or run on more or larger devices.", line, remedy)
  return choice

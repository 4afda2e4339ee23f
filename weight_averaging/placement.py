"""Where averaging state lives: replicated, sharded across devices, or in host memory.

A `Placement` decides three things about every array of an averaging state:

* its *layout*: the shape it is stored in. `replicated` and `host` store a leaf in
  the parameter's own shape; `sharded` stores it flattened and zero-padded to a
  multiple of the number of devices, so that every device holds exactly
  ``ceil(n / N)`` of its ``n`` elements whatever the parameter's shape (ZeRO-1 style).
* its *sharding*, for `jax.jit` (`shardings`), and the annotation applied inside a
  traced function (`constrain`), so that the compiled program keeps it there.
* for `host`, the memory kind: the state is stored in ``pinned_host`` memory and
  moved to device memory only for the arithmetic (`to_compute`). Under `jax.pmap`
  it is held in host RAM between steps (`put`).

Under `jax.pmap` give the mapped axis name (``sharded(axis_name="batch")``): each
device then stores only its own slice and the full average is re-assembled with an
``all_gather`` when it is read.

The averagers call `layout`, `constrain`, `to_compute` and `unlayout`; users only
pick a placement with `get` or one of the constructors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PLACEMENTS = ("replicated", "sharded", "host")

_logged_host_fallback = False


def default_mesh() -> Mesh:
  """A one-axis mesh over every device, the layout AlgoPerf's jit runner uses."""
  return Mesh(np.asarray(jax.devices()), ("averaging",))


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _place(x, sharding):
  """`with_sharding_constraint` inside a trace, `device_put` outside one."""
  kind = getattr(sharding, "memory_kind", None)
  if _is_traced(x) and kind in (None, "device", _default_memory_kind()):
    return jax.lax.with_sharding_constraint(x, sharding)
  # A change of memory kind is a transfer, which only `device_put` expresses.
  return jax.device_put(x, sharding)


def _default_memory_kind():
  try:  # a local device: with several processes jax.devices()[0] may be another's
    return jax.local_devices()[0].default_memory().kind
  except (AttributeError, NotImplementedError, RuntimeError):
    return None


def backend_memory_kinds(device=None) -> frozenset:
  """The memory kinds a device can address (empty on backends without the API)."""
  device = device or jax.local_devices()[0]
  try:
    return frozenset(m.kind for m in device.addressable_memories())
  except (AttributeError, NotImplementedError, RuntimeError):
    return frozenset()


@dataclasses.dataclass(frozen=True)
class Placement:
  """Base class: the state is stored like the parameters (replicated)."""

  name: str = "replicated"
  mesh: Optional[Mesh] = None
  axis_name: Optional[str] = None  # set: running under `jax.pmap` over this axis

  def _mesh(self) -> Mesh:
    return self.mesh if self.mesh is not None else default_mesh()

  # Layout: the shape in which a parameter-shaped value is stored.
  def layout(self, x):
    return x

  def unlayout(self, stored, like):
    del like
    return stored

  # Sharding.
  def sharding(self, ndim: int):
    """The sharding of a stored leaf of rank `ndim` under `jax.jit`."""
    del ndim
    return NamedSharding(self._mesh(), PartitionSpec())

  def shardings(self, state):
    """A pytree of shardings for `state` (for `jax.jit` in/out shardings, `device_put`)."""
    return jax.tree_util.tree_map(lambda x: self.sharding(np.ndim(x)), state)

  def constrain(self, stored):
    """Pins a stored leaf to this placement (inside a trace or eagerly)."""
    if self.axis_name is not None:
      return stored
    return _place(stored, self.sharding(np.ndim(stored)))

  def to_compute(self, stored):
    """Brings a stored leaf to where arithmetic happens (device memory)."""
    return stored

  def put(self, state):
    """Eagerly moves a whole state to this placement (e.g. after a restore)."""
    if self.axis_name is not None:
      return state
    return jax.device_put(state, self.shardings(state))


@dataclasses.dataclass(frozen=True)
class Sharded(Placement):
  """Each device stores 1/N of every leaf, flattened and padded (ZeRO-1 style)."""

  name: str = "sharded"

  def num_shards(self) -> int:
    if self.axis_name is not None:
      # Under pmap the psum of a Python constant is the (static) axis size.
      return int(jax.lax.psum(1, self.axis_name))
    return self._mesh().size

  def _padded_size(self, n: int) -> int:
    return self.num_shards() * max(1, math.ceil(n / self.num_shards()))

  def layout(self, x):
    flat = jnp.ravel(x)
    flat = jnp.pad(flat, (0, self._padded_size(flat.size) - flat.size))
    if self.axis_name is None:
      return flat
    shard = flat.size // self.num_shards()
    return jax.lax.dynamic_slice_in_dim(
        flat, jax.lax.axis_index(self.axis_name) * shard, shard)

  def unlayout(self, stored, like):
    if self.axis_name is not None:
      stored = jax.lax.all_gather(stored, self.axis_name, axis=stored.ndim - 1,
                                  tiled=True)
    size = int(np.prod(np.shape(like), dtype=np.int64))
    return stored[..., :size].reshape(stored.shape[:-1] + tuple(np.shape(like)))

  def sharding(self, ndim: int):
    if ndim == 0:
      return NamedSharding(self._mesh(), PartitionSpec())
    mesh = self._mesh()
    spec = (None,) * (ndim - 1) + (tuple(mesh.axis_names),)
    return NamedSharding(mesh, PartitionSpec(*spec))


@dataclasses.dataclass(frozen=True)
class Host(Placement):
  """The state is stored in host memory and moved to the device for arithmetic.

  Uses the ``pinned_host`` memory kind. On a backend without it (the CPU backend
  before jax 0.7.1 has a single memory kind) it logs once and behaves like
  `replicated`. Under `jax.pmap` the mapped function cannot write to host memory:
  the caller moves the state to host RAM with `put` between steps.
  """

  name: str = "host"

  @property
  def available(self) -> bool:
    return "pinned_host" in backend_memory_kinds()

  def _log_fallback(self):
    global _logged_host_fallback
    if not _logged_host_fallback:
      _logged_host_fallback = True
      logging.warning(
          "weight_averaging: placement 'host' asked for, but the %s backend has no "
          "'pinned_host' memory (memory kinds: %s); the averaging state stays in "
          "device memory.", jax.default_backend(),
          sorted(backend_memory_kinds()) or "none reported")

  def sharding(self, ndim: int):
    base = super().sharding(ndim)
    if not self.available:
      self._log_fallback()
      return base
    return base.with_memory_kind("pinned_host")

  def _device_sharding(self, ndim: int):
    return super().sharding(ndim).with_memory_kind("device")

  def to_compute(self, stored):
    if not self.available or self.axis_name is not None:
      return stored
    # A transfer between memory kinds, never a mere sharding annotation.
    return jax.device_put(stored, self._device_sharding(np.ndim(stored)))

  def put(self, state):
    if self.axis_name is None:
      return super().put(state)
    # A pmapped function cannot write to host memory, so between steps the state
    # is held as NumPy arrays in host RAM; pmap moves it back in at the next call.
    return jax.device_get(state)


def replicated(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """The averaging state is stored like the parameters, on every device."""
  return Placement("replicated", mesh, axis_name)


def sharded(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """Each device stores 1/N of the averaging state (flattened, padded)."""
  return Sharded("sharded", mesh, axis_name)


def host(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """The averaging state is stored in pinned host memory."""
  return Host("host", mesh, axis_name)


_CONSTRUCTORS = {"replicated": replicated, "sharded": sharded, "host": host}


def get(placement: Any = "replicated", *, mesh: Optional[Mesh] = None,
        axis_name: Optional[str] = None) -> Placement:
  """A `Placement` from a name (``'replicated' | 'sharded' | 'host'``) or itself."""
  if isinstance(placement, Placement):
    if mesh is None and axis_name is None:
      return placement
    return dataclasses.replace(
        placement, mesh=mesh if mesh is not None else placement.mesh,
        axis_name=axis_name if axis_name is not None else placement.axis_name)
  if not isinstance(placement, str) or placement not in _CONSTRUCTORS:
    raise ValueError(
        f"placement must be one of {PLACEMENTS} or a Placement, got {placement!r}")
  return _CONSTRUCTORS[placement](mesh=mesh, axis_name=axis_name)


def device_bytes(tree: Any) -> Sequence[int]:
  """Bytes of `tree` held by each addressable device (its shards, summed)."""
  per_device = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return [per_device[d] for d in sorted(per_device, key=lambda d: d.id)]


# ----------------------------------------------------------------------------
# pmap's layout of replicated values: a leading axis of one copy per local device.


def pmap_replicate(tree: Any) -> Any:
  """`tree` with a leading local-device axis, one copy on each device, as pmap expects."""
  n = jax.local_device_count()
  stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), tree)
  return jax.pmap(lambda x: x)(stacked)


def pmap_unreplicate(tree: Any) -> Any:
  """Device 0's copy of every leaf of a pmap-replicated `tree` (``x[0]``)."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)

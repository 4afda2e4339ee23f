"""Where averaging state lives: replicated, sharded across devices, or in host memory.

A `Placement` decides three things about every array of an averaging state:

* its *layout*: the shape it is stored in. `replicated` and `host` store a leaf in
  the parameter's own shape; `sharded` stores it flattened and zero-padded to a
  multiple of the number of devices, so that every device holds exactly
  ``ceil(n / N)`` of its ``n`` elements whatever the parameter's shape (ZeRO-1 style).
* its *sharding*, for `jax.jit` (`shardings`), and the annotation applied inside a
  traced function (`constrain`), so that the compiled program keeps it there.
* for `host`, the memory kind. Only the bulk of a state, the fields its type names in
  ``HOST_FIELDS`` (LAWA's ring of snapshots, EMA's average), is stored in
  ``pinned_host`` memory; counters and LAWA's running sum stay in device memory, where
  the arithmetic happens. A LAWA push then moves one snapshot to the host and one slot
  back (`write_slot`, `read_slot`), whatever the ring's length. Under `jax.pmap` the
  host fields are held in host RAM between steps (`put`).

`init` places every leaf exactly where `shardings` says, so a jitted step that donates
the state and names `shardings` as its out-shardings (and in-shardings) takes the
state that `init` returns, and its own outputs, without a transfer or a recompilation.

Under `jax.pmap` give the mapped axis name (``sharded(axis_name="batch")``): each
device then stores only its own slice and the full average is re-assembled with an
``all_gather`` when it is read.

The averagers call `layout`, `zeros`, `constrain`, `to_compute`, `read_slot`,
`write_slot` and `unlayout`; users pick a placement with `get` or one of the
constructors, and may check a compiled step with `memory_transfers`.

``'auto'`` (`AUTO`, the AlgoPerf submissions' default) is not a placement but a
request: the AlgoPerf glue turns it into one of `PLACEMENTS` at
``init_optimizer_state``, from the state's bytes and the device's memory
(`weight_averaging.algoperf_api.memory`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PLACEMENTS = ("replicated", "sharded", "host")
AUTO = "auto"
CHOICES = PLACEMENTS + (AUTO,)  # what a user may ask for

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


def offloaded_leaves(state) -> Any:
  """A pytree of bools like `state`: which leaves a `host` placement stores on the host.

  A `NamedTuple` state names those fields in its class attribute ``HOST_FIELDS``; in
  any other pytree every leaf but the scalars (counters) is offloaded.
  """
  fields = getattr(type(state), "HOST_FIELDS", None)
  if fields is None or not hasattr(state, "_fields"):
    return jax.tree_util.tree_map(lambda x: np.ndim(x) > 0, state)
  return type(state)(*(jax.tree_util.tree_map(lambda _: name in fields, value)
                       for name, value in zip(state._fields, state)))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Base class: the state is stored like the parameters (replicated)."""

  name: str = "replicated"
  mesh: Optional[Mesh] = None
  axis_name: Optional[str] = None  # set: running under `jax.pmap` over this axis

  # Slots of a ring summed in one sweep over an accumulator (not a dataclass field):
  # fewer sweeps, less memory traffic.
  SLOTS_PER_SWEEP = 8

  def _mesh(self) -> Mesh:
    return self.mesh if self.mesh is not None else default_mesh()

  # Layout: the shape in which a parameter-shaped value is stored.
  def layout(self, x):
    return x

  def unlayout(self, stored, like):
    del like
    return stored

  # Sharding.
  def sharding(self, ndim: int, offloaded: bool = False):
    """The sharding of a stored leaf of rank `ndim` under `jax.jit`.

    `offloaded`: the leaf is bulk that a `host` placement keeps in host memory.
    """
    del ndim, offloaded
    return NamedSharding(self._mesh(), PartitionSpec())

  def shardings(self, state):
    """A pytree of shardings for `state` (for `jax.jit` in/out shardings, `device_put`)."""
    return jax.tree_util.tree_map(lambda x, off: self.sharding(np.ndim(x), off),
                                  state, offloaded_leaves(state))

  def constrain(self, stored, offloaded: bool = False):
    """Pins a stored leaf to this placement (inside a trace or eagerly)."""
    if self.axis_name is not None:
      return stored
    return _place(stored, self.sharding(np.ndim(stored), offloaded))

  def zeros(self, shape, dtype, offloaded: bool = False):
    """A stored leaf of zeros, created where it is kept (no detour through the device)."""
    if self.axis_name is not None:
      return jnp.zeros(shape, dtype)
    sharding = self.sharding(len(shape), offloaded)
    if _is_traced(jnp.zeros((), dtype)):  # inside a trace every op is traced
      return _place(jnp.zeros(shape, dtype), sharding)
    if getattr(sharding, "memory_kind", None) not in (None, _default_memory_kind()):
      # `jnp.zeros(device=...)` refuses another memory kind on a one-device mesh (jax
      # 0.10); a compiled fill writes the leaf there, as a jitted `init` does.
      return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    return jnp.zeros(shape, dtype, device=sharding)

  def to_compute(self, stored):
    """Brings a stored leaf to where arithmetic happens (device memory)."""
    return stored

  # A ring of snapshots: a stored leaf with a leading slot axis.
  def read_slot(self, ring, i):
    """``ring[i]`` in device memory: moves one slot, never the ring."""
    return self.to_compute(jax.lax.dynamic_index_in_dim(ring, i, 0, keepdims=False))

  def write_slot(self, ring, x, i):
    """`ring` with slot `i` set to `x` (a device value), written in place when donated."""
    return jax.lax.dynamic_update_index_in_dim(ring, x, i, 0)

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

  def sharding(self, ndim: int, offloaded: bool = False):
    del offloaded
    if ndim == 0:
      return NamedSharding(self._mesh(), PartitionSpec())
    mesh = self._mesh()
    spec = (None,) * (ndim - 1) + (tuple(mesh.axis_names),)
    return NamedSharding(mesh, PartitionSpec(*spec))

  def write_slot(self, ring, x, i):
    return self.constrain(super().write_slot(ring, x, i))


@dataclasses.dataclass(frozen=True)
class Host(Placement):
  """The bulk of the state is stored in host memory; the arithmetic runs on the device.

  Uses the ``pinned_host`` memory kind for the fields a state names in
  ``HOST_FIELDS``; the other leaves (counters, LAWA's running sum) are replicated in
  device memory. On a backend without ``pinned_host`` (the CPU backend before jax
  0.7.1 has a single memory kind) it logs once and behaves like `replicated`. Under
  `jax.pmap`, which has no memory kinds, the mapped function takes and returns the
  host fields as ordinary device arrays and the caller moves them to host RAM with
  `put` between steps: that saves device memory between steps, but each step moves
  the whole ring in and out.
  """

  name: str = "host"

  # Each slot crosses to the device once whatever the width; one at a time keeps a
  # single slot, not eight, in device memory during a re-sum.
  SLOTS_PER_SWEEP = 1

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

  def _moves(self) -> bool:
    """Whether host fields really live in another memory (else this is `replicated`)."""
    if not self.available:
      self._log_fallback()
      return False
    return self.axis_name is None

  def sharding(self, ndim: int, offloaded: bool = False):
    base = super().sharding(ndim)
    moves = self._moves()  # logs a fallback once, whatever the leaf
    return base.with_memory_kind("pinned_host") if offloaded and moves else base

  def to_compute(self, stored):
    if not self._moves():
      return stored
    # A transfer between memory kinds, never a mere sharding annotation.
    return jax.device_put(stored, super().sharding(np.ndim(stored)).with_memory_kind("device"))

  def write_slot(self, ring, x, i):
    if self._moves():  # one slot goes to the host; the ring is updated there in place
      x = jax.device_put(x, self.sharding(np.ndim(x), offloaded=True))
    return super().write_slot(ring, x, i)

  def put(self, state):
    if self.axis_name is None:
      return super().put(state)
    # A pmapped function cannot write to host memory, so between steps the host
    # fields are held as NumPy arrays in host RAM; pmap moves them back in at the
    # next call.
    return jax.tree_util.tree_map(lambda x, off: jax.device_get(x) if off else x,
                                  state, offloaded_leaves(state))


def replicated(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """The averaging state is stored like the parameters, on every device."""
  return Placement("replicated", mesh, axis_name)


def sharded(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """Each device stores 1/N of the averaging state (flattened, padded)."""
  return Sharded("sharded", mesh, axis_name)


def host(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None):
  """The bulk of the averaging state is stored in pinned host memory."""
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
  if placement == AUTO:
    raise ValueError(
        "placement 'auto' is decided from the state's bytes and the device's memory "
        "by the AlgoPerf glue (weight_averaging.algoperf_api.memory.placement_for); "
        f"here give one of {PLACEMENTS}")
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
# What a compiled step moves between memory kinds.

_ANNOTATION = re.compile(
    r"(%[\w#.]+) = stablehlo\.custom_call @annotate_device_placement\(.*?"
    r'_xla_buffer_placement = "(\w+)".*?-> tensor<([^>]*)>')
_ITEMSIZE = {"i1": 1, "i8": 1, "ui8": 1, "bf16": 2, "f16": 2, "i16": 2, "f32": 4,
             "i32": 4, "ui32": 4, "f64": 8, "i64": 8, "ui64": 8}


def _tensor_bytes(tensor_type: str) -> int:
  *dims, dtype = tensor_type.split("x")
  return int(np.prod([int(d) for d in dims], dtype=np.int64)) * _ITEMSIZE[dtype]


def memory_transfers(fn, *args, platform: str = "cuda", **jit_kwargs) -> Dict[str, int]:
  """Bytes that ``jax.jit(fn, **jit_kwargs)(*args)`` moves into each memory kind.

  Read from the program lowered for `platform` (the GPU lowering also on a CPU-only
  machine, where XLA drops memory kinds): every ``annotate_device_placement`` inside
  the program, i.e. each transfer ``device_put`` asks for, counted once, so a branch
  or loop body counts as if it ran once. The annotations jax adds to the program's
  own results (which only confirm where they already are) are left out; the state
  arrives and leaves where its shardings say, so these are all the transfers.
  Needs a jax whose ``Traced.lower`` takes ``lowering_platforms``.

  Returns ``{memory kind: bytes}``, e.g. ``{"pinned_host": ..., "device": ...}``.
  """
  traced = jax.jit(fn, **jit_kwargs).trace(*args)
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  start = text.index("func.func public @main")
  end = text.index("\n  }\n", start)
  # The function's own return (a region's is spelled `stablehlo.return`).
  results = set(re.search(r"\n\s*return (.*?) :", text[start:end]).group(1).split(", "))
  moved: Dict[str, int] = {}
  for match in _ANNOTATION.finditer(text):
    name, kind, tensor_type = match.groups()
    if name in results and start <= match.start() < end:
      continue
    moved[kind] = moved.get(kind, 0) + _tensor_bytes(tensor_type)
  return moved


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

"""The memory plan: each submission's state per device on AlgoPerf's workloads and machines.

For every workload of `workload_facts.ALGOPERF_WORKLOADS`, every submission of
`catalog` and every machine of `HARDWARE`, `plan_row` counts per device (with
`algoperf_api.memory`, the code ``'auto'`` decides with) the params, the optimizer
state, the averaging state and the stash, and the placement ``'auto'`` picks against
the device limit the real run would report:

  limit = the runner's XLA memory fraction x the GPU's memory

AlgoPerf's ``submission_runner.py`` (2c90454f, line 803) sets
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.80`` for `RAISED_FRACTION`; the other workloads run at
jax's default 0.75. The GPUs' memory is nominal (40 and 16 GiB); CUDA's own context
takes a few hundred MiB of it.

**Param shapes** come from ``workloads_config/param_shapes/<workload>.json``
(`load_shapes`), written by ``scripts/memory_plan.py --write_shapes`` with algoperf
installed: ``jax.eval_shape`` of each workload's own ``init_model_fn`` (the jit API at
2c90454f), nothing allocated. ``finewebedu_lm`` is not at that commit: its shapes are
built from its published configuration (`lm_shapes`). The files' ``source`` says which.

**The shipped configurations** (`shipped_plans`) are for the leaderboard's machine,
`LEADERBOARD`: each point of each ``tuning_search_spaces/*.json`` on the nine workloads
and each ``workloads_config`` trial, under both APIs (an exported entry runs the jit
one). `PMAP_DOES_NOT_FIT` lists what the pmap API cannot fit there (it has only
``'replicated'``; `V100_PMAP_DOES_NOT_FIT` on V100s); ``workloads_config/criteo1tb.json``
and the README say so. A row's `PlanRow.peak` adds the step's gradients and the optimizer
step's temporaries (`step_bytes`, a formula checked against XLA's compile-time analysis,
`step_memory`) to the state: what a run's measured peak, less activations, should stay under.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from weight_averaging import averagers
from weight_averaging import placement as placement_lib
from weight_averaging.algoperf_api import catalog
from weight_averaging.algoperf_api import hyperparameters as hp
from weight_averaging.algoperf_api import memory, recipes
from weight_averaging.optimizers import shampoo as shampoo_lib
from weight_averaging.studies import configs, workload_facts


class Hardware(NamedTuple):
  name: str
  num_devices: int
  device_bytes: int  # one GPU's memory


HARDWARE: Dict[str, Hardware] = {h.name: h for h in (
    Hardware("4x A100 40 GB", 4, 40 * 2**30),   # the leaderboard's since 2025
    Hardware("8x V100 16 GB", 8, 16 * 2**30),   # AlgoPerf v0.5's
)}
LEADERBOARD = "4x A100 40 GB"
V100 = "8x V100 16 GB"
RAISED_FRACTION = ("criteo1tb", "imagenet_vit", "librispeech_conformer",
                   "librispeech_deepspeech")
DEFAULT_FRACTION = 0.75
# (workload, submission) the pmap API cannot fit on LEADERBOARD: 20 replicated copies of
# Criteo's 2.16 GB embedding. workloads_config/criteo1tb.json says so in its notes.
PMAP_DOES_NOT_FIT = (("criteo1tb", "nadamw_lawa"), ("criteo1tb", "shampoo_lawa"))
# What the pmap API (replicated only) cannot fit on V100, AlgoPerf v0.5's machine (12 or
# 12.8 GiB limit), at any shipped point: LAWA's 20 copies of WMT's params; on Criteo the
# averaged states and Shampoo's, and by the step peak NadamW too, though AlgoPerf ran
# NadamW there: the CPU backend's temporaries (`STEP_TEMP_PER_PARAM_BYTE`) overstate a GPU's.
V100_PMAP_DOES_NOT_FIT = tuple((w, s) for w in ("criteo1tb",) for s in catalog.NAMES) + (
    ("wmt", "nadamw_lawa"), ("wmt", "shampoo_lawa"))

SHAPES_DIR = os.path.join(configs.CONFIG_DIR, "param_shapes")

# finewebedu_lm (algoperf 4c37f2aa, finewebedu_lm/workload.py and finewebedu_lm_jax/models.py).
LM_CONFIG = {"vocab_size": 50257, "model_dim": 1024, "num_heads": 8, "num_layers": 12,
             "mlp_dim": 4096, "seq_len": 1024}
LM_SOURCE = ("published config (algoperf 4c37f2aa algoperf/workloads/finewebedu_lm/: 12 "
             "layers, width 1024, 8 heads, GLU MLP 4096, RoPE, QK-norm, tied embeddings, "
             "vocab 50,257, seq 1,024); float32 params, each layer's attn_scale bfloat16; "
             "not in algoperf 2c90454f, so built from the config by "
             "weight_averaging.studies.memory_plan.lm_shapes")


def memory_fraction(workload: str) -> float:
  """XLA's client memory fraction AlgoPerf's runner runs `workload` with."""
  return 0.80 if workload in RAISED_FRACTION else DEFAULT_FRACTION


def device_limit(hardware: Hardware, workload: str) -> int:
  """The ``bytes_limit`` a device of `hardware` reports on `workload`."""
  return int(memory_fraction(workload) * hardware.device_bytes)


# ----------------------------------------------------------------------------
# Param shapes.


def lm_shapes() -> List[Tuple[Tuple[int, ...], str]]:
  """finewebedu_lm's params as ``(shape, dtype)``, from `LM_CONFIG`.

  Per layer: two RMSNorm scales (d), query/key/value (d, heads, d / heads), the output
  projection (d, d), the GLU MLP's (d, 2 f) and (f, d) kernels, no biases, and the
  bfloat16 scalar ``attn_scale``; then the tied embedding (vocab, d) and the final
  RMSNorm scale.
  """
  c = LM_CONFIG
  d, f, h = c["model_dim"], c["mlp_dim"], c["num_heads"]
  layer = ([((d,), "float32")] * 2 + [((d, h, d // h), "float32")] * 3
           + [((d, d), "float32"), ((d, 2 * f), "float32"), ((f, d), "float32"),
              ((), "bfloat16")])
  return layer * c["num_layers"] + [((c["vocab_size"], d), "float32"), ((d,), "float32")]


def algoperf_shapes(workload: str) -> List[Tuple[Tuple[int, ...], str]]:
  """``(shape, dtype)`` of every param of algoperf's jax `workload` (needs algoperf).

  ``jax.eval_shape`` of the workload's own ``init_model_fn``. Modules only its input
  pipeline and metrics use (tensorflow_text, sentencepiece) are stood in for when
  absent: ``init_model_fn`` does not call them.
  """
  import sys       # pylint: disable=import-outside-toplevel
  import types     # pylint: disable=import-outside-toplevel

  class _Absent(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return type(name, (), {})

  for name in ("tensorflow_text", "sentencepiece"):
    try:
      __import__(name)
    except ImportError:
      sys.modules[name] = _Absent(name)
  from algoperf.workloads import workloads as registry  # pylint: disable=import-outside-toplevel
  meta = registry.WORKLOADS[workload]
  path = os.path.join(registry.BASE_WORKLOADS_DIR, meta["workload_path"] + "_jax",
                      "workload.py")
  instance = registry.import_workload(workload_path=path, workload_init_kwargs={},
                                      workload_class_name=meta["workload_class_name"])
  params, _ = jax.eval_shape(instance.init_model_fn, jax.random.PRNGKey(0))
  return [(tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(params)]


def shapes_json(workload: str, leaves: Sequence[Tuple[Tuple[int, ...], str]],
                source: str) -> str:
  """The file `load_shapes` reads: leaves grouped by (shape, dtype), one group a line."""
  groups: Dict[Tuple[Tuple[int, ...], str], int] = {}
  for shape, dtype in leaves:
    groups[(tuple(shape), dtype)] = groups.get((tuple(shape), dtype), 0) + 1
  count = sum(n * _size(s) for (s, _), n in groups.items())
  nbytes = sum(n * _size(s) * jnp.dtype(t).itemsize for (s, t), n in groups.items())
  lines = [json.dumps({"shape": list(s), "dtype": t, "count": n})
           for (s, t), n in sorted(groups.items(), key=lambda g: (-_size(g[0][0]), g[0]))]
  head = {"workload": workload, "source": source, "num_params": count, "bytes": nbytes}
  body = ",\n    ".join(lines)
  return json.dumps(head, indent=2)[:-2] + f',\n  "leaves": [\n    {body}\n  ]\n}}\n'


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def load_shapes(workload: str, directory: str = SHAPES_DIR) -> List[jax.ShapeDtypeStruct]:
  """The params of `workload` as a list of `jax.ShapeDtypeStruct` (its shipped file)."""
  path = os.path.join(directory, f"{workload}.json")
  if not os.path.isfile(path):
    raise ValueError(f"no param shapes for workload {workload!r}: {path} is missing; "
                     "write it with scripts/memory_plan.py --write_shapes (needs algoperf)")
  with open(path) as f:
    raw = json.load(f)
  out = []
  for group in raw["leaves"]:
    out += [jax.ShapeDtypeStruct(tuple(group["shape"]), jnp.dtype(group["dtype"]))
            ] * group["count"]
  return out


# ----------------------------------------------------------------------------
# Plans.


class PlanRow(NamedTuple):
  workload: str
  submission: str
  hardware: str
  api: str
  limit: int                                # the device's bytes_limit
  asked: str                                # averaging_placement as given
  placement: Optional[str]                  # what runs; None without averaging
  footprint: memory.Footprint
  fits: bool                                # footprint.device <= FRACTION x limit
  gradients: int = 0                        # the step's float32 gradients (`step_bytes`)
  temporaries: int = 0                      # the optimizer step's (`step_bytes`)

  @property
  def peak(self) -> int:
    """Predicted device bytes while a step runs: the state (``footprint.device``), the
    gradients and the optimizer step's temporaries. Activations are not counted."""
    return self.footprint.device + self.gradients + self.temporaries

  @property
  def peak_fits(self) -> bool:
    """Whether `peak` is within the device's limit (the whole of it)."""
    return self.peak <= self.limit


def plan_row(workload: str, submission: str, hardware: str, point: Any = None,
             api: str = "jit", params: Optional[Any] = None) -> PlanRow:
  """`submission` at hyperparameters `point` (None: its self-tuning point) on `workload`.

  `params`: the workload's shapes (`load_shapes`, the default); the counts are cached
  by workload name.
  """
  sub, machine = catalog.get(submission), HARDWARE[hardware]
  step_hint = workload_facts.ALGOPERF_WORKLOADS[workload].step_hint
  params = load_shapes(workload) if params is None else params
  limit = device_limit(machine, workload)
  base = _base_footprint(workload, sub.optimizer, point, step_hint, params)
  step = step_bytes(sub.optimizer, params, point)
  if sub.averager is None:
    return PlanRow(workload, submission, hardware, api, limit, "-", None, base,
                   base.device <= memory.FRACTION * limit, *step)
  asked = hp.averaging_config(point, step_hint).placement
  names = (memory.candidates(api, host_available=True) if asked == placement_lib.AUTO
           else (asked,))
  options = {}
  for name in names:
    device, host = _averaging_bytes(workload, sub.averager, point, name,
                                    machine.num_devices, params)
    options[name] = base._replace(averaging=device, stash=base.params, host=host)
    if options[name].device <= memory.FRACTION * limit:
      break  # `choose` takes the first that fits: the others need not be counted
  choice, _ = memory.choose(options, limit)
  f = options[choice]
  return PlanRow(workload, submission, hardware, api, limit, asked, choice, f,
                 f.device <= memory.FRACTION * limit, *step)


# The plan evaluates the same states many times (a search space's points share their
# shapes): each is counted once per key, which holds everything its shapes depend on.
_OPTIMIZER_CACHE: Dict[Tuple, memory.Footprint] = {}
_AVERAGING_CACHE: Dict[Tuple, Tuple[int, int]] = {}


def _hashable(value: Any) -> Any:
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  if isinstance(value, tuple):
    return tuple(_hashable(v) for v in value)
  return value


def _base_footprint(workload: str, optimizer: str, point: Any, step_hint: int,
                    params: Any) -> memory.Footprint:
  """Params and optimizer state, once per (workload, the optimizer's config as read):
  the schedule's horizon (`step_hint`) changes no shape."""
  key = (workload, optimizer, _hashable(getattr(hp, f"{optimizer}_config")(point)))
  if key not in _OPTIMIZER_CACHE:
    transform = getattr(recipes, f"{optimizer}_from_hyperparameters")(point, step_hint)
    _OPTIMIZER_CACHE[key] = memory.footprints(params, transform, None, ("replicated",),
                                              1)["replicated"]
  return _OPTIMIZER_CACHE[key]


def _averaging_bytes(workload: str, averager: str, point: Any, placement: str,
                     num_devices: int, params: Any) -> Tuple[int, int]:
  """`memory.averaging_bytes` of `averager` at `point`, once per (workload, the averager's
  own config (``lawa_k``), placement, N): the state depends on nothing else (not on the
  interval, the start or the optimizer)."""
  config = getattr(hp, f"{averager}_config")(point)
  key = (workload, averager, config, placement, num_devices)
  if key not in _AVERAGING_CACHE:
    make = getattr(recipes, f"{averager}_from_hyperparameters")
    every = hp.AveragingConfig(every=1, start_step=0, placement=placement)
    _AVERAGING_CACHE[key] = memory.averaging_bytes(
        lambda p: make(point, every, p), params, placement, num_devices)
  return _AVERAGING_CACHE[key]


# ----------------------------------------------------------------------------
# The optimizer step's transient bytes.

# Temporaries of one donated optimizer step, an upper bound of `step_memory` (jit 0.7.0,
# CPU backend, real shapes; measured temp / params: NadamW 2.1 to 3.0, Shampoo 3.0 to 5.2).
# Shampoo adds its blocks' copies, one leaf's outer products and a few root chunks
# (an eigendecomposition keeps about six copies of its input).
STEP_TEMP_PER_PARAM_BYTE = 3.25
SHAMPOO_TEMP_PER_PRECONDITIONED_BYTE = 2.5
SHAMPOO_TEMP_PER_STATISTICS_BYTE = 0.5
SHAMPOO_ROOT_TEMP = 8 * shampoo_lib.ShampooConfig().root_chunk_bytes


def step_bytes(optimizer: str, params: Any, point: Any = None) -> Tuple[int, int]:
  """``(gradients, temporaries)`` predicted for one optimizer step on one device: the
  float32 gradients of the floating params, and `STEP_TEMP_PER_PARAM_BYTE` x their bytes
  (Shampoo at `point`: + the other constants x its preconditioned params' and statistics'
  bytes + `SHAMPOO_ROOT_TEMP`), the formula tests/test_memory.py checks on `step_memory`.
  """
  floating = [x for x in params if jnp.issubdtype(x.dtype, jnp.floating)]
  grads = sum(4 * memory.leaf_bytes(x) // x.dtype.itemsize for x in floating)
  temp = STEP_TEMP_PER_PARAM_BYTE * memory.tree_bytes(floating)
  if optimizer == "shampoo":
    config = shampoo_lib.ShampooConfig(**hp.shampoo_config(point).transform)
    plan = shampoo_lib.block_plan(
        [x.shape for x in floating], block_size=config.block_size,
        merge_dims_threshold=config.merge_dims_threshold, skip_dim_gt=config.skip_dim_gt,
        exponent_override=config.exponent_override)
    temp += SHAMPOO_TEMP_PER_PRECONDITIONED_BYTE * sum(
        memory.leaf_bytes(x) for x, lp in zip(floating, plan.leaves) if lp.preconditioned)
    temp += SHAMPOO_TEMP_PER_STATISTICS_BYTE * sum(4 * n * d * d for d, _, n in plan.stacks)
    temp += SHAMPOO_ROOT_TEMP
  return grads, int(temp)


class StepMemory(NamedTuple):
  """XLA's compile-time memory analysis (bytes) of ``(params, grads, state) -> (params -
  update, new state)`` on one device, params and state donated as in the submissions."""

  argument: int   # params, gradients, optimizer state
  output: int     # new params and optimizer state
  alias: int      # output bytes written into donated arguments
  temp: int       # the step's temporaries
  code: int       # generated code

  @property
  def peak(self) -> int:
    """Bytes live at once at most: arguments + outputs not aliased + temporaries."""
    return self.argument + self.output - self.alias + self.temp


def step_memory(transform, params: Any) -> StepMemory:
  """`StepMemory` of the optax `transform`'s update on abstract `params` (nothing is
  allocated: ``jit(...).lower(...).compile().memory_analysis()``)."""
  params = averagers.floating_part(params)
  grads = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                 params)
  state = jax.eval_shape(transform.init, params)

  def step(params, grads, state):
    updates, state = transform.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  m = jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state).compile(
      ).memory_analysis()
  return StepMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                    int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                    int(m.generated_code_size_in_bytes))


def workload_step_memory(workload: str, optimizer: str, point: Any = None,
                         params: Optional[Any] = None) -> StepMemory:
  """`step_memory` of `optimizer` at `point` (None: self-tuning) on `workload`'s shapes."""
  step_hint = workload_facts.ALGOPERF_WORKLOADS[workload].step_hint
  params = load_shapes(workload) if params is None else params
  transform = getattr(recipes, f"{optimizer}_from_hyperparameters")(point, step_hint)
  return step_memory(transform, params)


def plan(workloads: Sequence[str] = tuple(workload_facts.ALGOPERF_WORKLOADS),
         submissions: Sequence[str] = catalog.NAMES,
         hardware: Sequence[str] = tuple(HARDWARE)) -> List[PlanRow]:
  """Every (hardware, workload, submission) at the self-tuning points, jit API."""
  shapes = {w: load_shapes(w) for w in workloads}
  return [plan_row(w, s, h, params=shapes[w])
          for h in hardware for w in workloads for s in submissions]


def table(rows: Sequence[PlanRow]) -> List[str]:
  """Markdown lines: one table per hardware, bytes per device in GiB."""
  out = []
  for hardware in dict.fromkeys(r.hardware for r in rows):
    out += [f"**{hardware}** (bytes per device, GiB; budget = {memory.FRACTION:g} x the "
            "device limit)", "",
            "| workload | submission | params | optimizer | averaging | stash | total | "
            "budget | auto picks |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in rows if r.hardware == hardware):
      f, gib = r.footprint, lambda n: f"{n / 2**30:.2f}"
      host = f" (+{gib(f.host)} host)" if f.host else ""
      pick = "-" if r.placement is None else r.placement + ("" if r.fits else ": DOES NOT FIT")
      out.append(f"| {r.workload} | {r.submission} | {gib(f.params)} | {gib(f.optimizer)} | "
                 f"{gib(f.averaging)}{host} | {gib(f.stash)} | {gib(f.device)} | "
                 f"{gib(memory.FRACTION * r.limit)} | {pick} |")
    out.append("")
  return out


# ----------------------------------------------------------------------------
# The shipped configurations.


def search_space_points(space: Any) -> List[Dict[str, Any]]:
  """A list space's points; for Halton ranges every combination of the ``feasible_points``
  with each range at its ``max`` (no shipped range changes the state's shapes)."""
  if isinstance(space, list):
    return [dict(p) for p in space]
  keys = sorted(space)
  choices = [space[k]["feasible_points"] if "feasible_points" in space[k]
             else [space[k]["max"]] for k in keys]
  return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _search_spaces(directory: str) -> Iterator[Tuple[str, str, Dict[str, Any]]]:
  """``(file name, submission, point)`` for every point of every shipped search space."""
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".json"):
      continue
    stem = name[:-len(".json")]
    optimizer = "shampoo" if stem.startswith("shampoo") else "nadamw"
    averager = next((a for a in catalog.AVERAGERS if stem.endswith("_" + a)), None)
    submission = optimizer + ("" if averager is None else "_" + averager)
    with open(os.path.join(directory, name)) as f:
      for point in search_space_points(json.load(f)):
        yield name, submission, point


def _apis(workload: str) -> Tuple[str, ...]:
  """The APIs that have `workload`: the pmap commit (fb2f492a) predates finewebedu_lm."""
  return configs.APIS if workload in workload_facts.BASE_WORKLOADS else ("jit",)


def shipped_plans(hardware: str = LEADERBOARD,
                  search_space_dir: str = configs.SEARCH_SPACE_DIR,
                  config_dir: str = configs.CONFIG_DIR) -> List[Tuple[str, PlanRow]]:
  """``(what, row)`` for every shipped configuration on `hardware` (module docstring)."""
  out = []
  shapes = {w: load_shapes(w) for w in workload_facts.ALGOPERF_WORKLOADS}
  for name, submission, point in _search_spaces(search_space_dir):
    for workload, params in shapes.items():
      out += [(f"tuning_search_spaces/{name} ({api})", plan_row(
          workload, submission, hardware, point, api, params))
              for api in _apis(workload)]
  for workload, config in configs.load_all(config_dir).items():
    if workload not in shapes:
      continue  # an embedded workload: its runner's devices are the CPU's
    for submission in catalog.NAMES:
      for api in _apis(workload):
        point = configs.trial_hyperparameters(config, submission, api)
        out.append((f"workloads_config/{workload}.json ({api})", plan_row(
            workload, submission, hardware, point, api, shapes[workload])))
  return out

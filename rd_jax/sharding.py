"""Named sharding: logical axis names on parameters/activations -> mesh axes.

Every parameter is created with `param(value, names)`, where `names` are logical
axis names (one per dimension, None for "never shard"). One rules table (from
the config, default `DEFAULT_RULES`) maps logical names to mesh axes
(`data`, `fsdp`, `tensor`). The same model code then runs on 1 CPU device, on
fake CPU devices and on a TPU pod; only the mesh and the rules change.

Logical names used across rd_jax:
  params:      embed, mlp, heads, kv_heads, head_dim, vocab, layers, patch,
               channels, conv_in, conv_out, norm, kernel_h, kernel_w
  activations: act_batch, act_len, act_embed, act_heads, act_mlp, act_vocab

Scale-out in one place (DESIGN.md §4, §6):
  make_mesh / mesh_from_config   the one mesh builder (ICI sizes, -1 = fill;
                                 DCN sizes for multi-slice)
  rules_from_config              the rules table of a config
  tree_shardings                 NamedShardings for any state pytree (params,
                                 optimiser moments, EMA) from logical names
  init_sharded                   jit-initialise a state directly sharded
  global_batch                   process-local batches -> global jax.Arrays
  initialize_distributed         jax.distributed from env / config
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("patch", None),
    ("channels", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
    ("kernel_h", None),
    ("kernel_w", None),
)


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
  """A parameter annotated with logical axis names (one per dimension)."""
  names = tuple(names)
  if len(names) != np.ndim(value):
    raise ValueError(
        f"param of shape {np.shape(value)} got {len(names)} logical names "
        f"{names}; give exactly one name (or None) per dimension.")
  return nnx.Param(value, out_sharding=names)


def logical_to_mesh(spec: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """Maps a logical PartitionSpec to a mesh PartitionSpec under `rules`.

  A mesh axis is used at most once per spec (first dimension wins), and mesh
  axes of size 1 or absent from `mesh` are dropped, so the same rules serve any
  mesh shape. With `shape` (and a mesh), a dimension keeps only the leading
  mesh axes whose sizes divide it (e.g. 14 heads stay whole on tensor=4), so
  every real config shards without padding.
  """
  if spec is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(spec):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; add it to the "
                     f"sharding rules table (known: {sorted(table)})")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = tuple(a for a in axes if a not in used and
                 (mesh is None or mesh.shape.get(a, 1) > 1))
    if shape is not None and mesh is not None:
      fit, size = [], 1
      for a in keep:
        if shape[i] % (size * mesh.shape[a]):
          break
        fit.append(a)
        size *= mesh.shape[a]
      keep = tuple(fit)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*out)


def logical_specs(state: Any) -> Any:
  """Pytree of logical PartitionSpecs for an nnx.State / abstract state."""
  return nnx.get_partition_spec(state)


def mesh_shardings(state: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for every leaf of `state` from its logical names."""
  specs = logical_specs(state)
  return jax.tree.map(
      lambda s: NamedSharding(mesh, logical_to_mesh(tuple(s), rules, mesh)),
      specs, is_leaf=lambda x: isinstance(x, P))


def _fill(shape: Sequence[int], n: int, what: str) -> list[int]:
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{what} shape {tuple(shape)} must have {len(MESH_AXES)} "
                     f"entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"{what} shape {tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n % known:
      raise ValueError(
          f"{what} shape {tuple(shape)} does not divide the {n} devices; "
          f"choose sizes whose product divides {n}")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(
        f"{what} shape {tuple(shape)} needs {int(np.prod(shape))} devices but "
        f"{n} are available; make the product equal {n} or use -1 for one "
        f"axis")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
  """The one mesh builder: (data, fsdp, tensor) sizes, -1 = fill the rest.

  `shape` is per slice (ICI); `dcn_shape` (default all 1) multiplies it across
  slices (multi-slice over the data-centre network; -1 = fill with the
  remaining slices), so the mesh's axis sizes are shape * dcn_shape. Put only
  `data` (or `fsdp` at most) on DCN: it is ~10x slower than ICI. TPU devices
  are laid out along the physical torus (mesh_utils); other devices in order.
  """
  devices = list(devices if devices is not None else jax.devices())
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn = _fill(dcn_shape or (1,) * len(MESH_AXES), n_slices, "dcn mesh")
  ici = _fill(shape, len(devices) // n_slices if n_slices > 1 else
              len(devices), "mesh")
  if n_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    arr = mesh_utils.create_device_mesh(ici, devices,
                                        allow_split_physical_axes=True)
  else:
    arr = np.asarray(devices).reshape(ici)
  return Mesh(arr, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config: Any,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh from `config.mesh` (keys `shape`, optional `dcn_shape`); a config
  without `mesh` gets pure data parallelism (-1, 1, 1)."""
  m = config.get("mesh") if hasattr(config, "get") else None
  if m is None:
    return make_mesh((-1, 1, 1), devices)
  return make_mesh(tuple(m.shape), devices,
                   tuple(m.dcn_shape) if m.get("dcn_shape") else None)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
  """`config.sharding_rules` ((logical, mesh axes) pairs; entries override
  the defaults by name), else DEFAULT_RULES."""
  extra = config.get("sharding_rules") if hasattr(config, "get") else None
  if not extra:
    return DEFAULT_RULES
  table = dict(DEFAULT_RULES)
  table.update({k: (tuple(v) if isinstance(v, list) else v)
                for k, v in extra})
  return tuple(table.items())


# ---------------------------------------------------------------- state


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _norm_path(path) -> tuple[str, ...]:
  """Key path -> names, without the `.value` of nnx Variables."""
  names = tuple(_key_name(k) for k in path)
  return names[:-1] if names and names[-1] == "value" else names


def flat_paths(tree: Any,
               is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """{'a/b/c': leaf} of a pytree (nnx State, dicts, Orbax metadata);
  `is_leaf` as in jax.tree_util."""
  return {"/".join(_norm_path(p)): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(
              tree, is_leaf=is_leaf)[0]}


def _logical_table(tree: Any) -> dict[tuple[str, ...], tuple]:
  """{path: logical names} from nnx Variables (their out_sharding names) or
  PartitionSpec leaves of `tree`."""
  is_leaf = lambda x: isinstance(x, (nnx.Variable, P))  # noqa: E731
  table = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_leaf)[0]:
    if isinstance(leaf, P):
      names = tuple(leaf)
    elif isinstance(leaf, nnx.Variable):
      meta = leaf.get_metadata()
      names = meta.get("out_sharding") or meta.get("sharding_names")
    else:
      names = None
    if names is not None:
      table[_norm_path(path)] = tuple(names)
  return table


_AMBIGUOUS = object()


def tree_logical_specs(state: Any, logical: Any = None) -> Any:
  """Logical names (tuple, or None = replicated) for every array of `state`.

  Names come from the state's own nnx Variables or from `logical` (a pytree
  of PartitionSpecs / Variables, e.g. a model's `logical_specs(cfg)`), matched
  by the longest key-path suffix with the same rank: optimiser moments
  (`opt/.../mu/<param path>`) and EMA copies inherit their parameter's names.
  """
  table = _logical_table(logical) if logical is not None else {}
  table.update(_logical_table(state))
  # Every suffix of a named path points at its names, unless two paths with
  # different names share it (then that suffix is too short to decide).
  index: dict[tuple[str, ...], Any] = {}
  for path, names in table.items():
    for i in range(len(path)):
      prev = index.setdefault(path[i:], names)
      if prev != names:
        index[path[i:]] = _AMBIGUOUS
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  out = []
  for path, x in leaves:
    p, names = _norm_path(path), None
    for i in range(len(p)):
      hit = index.get(p[i:])
      if hit is _AMBIGUOUS:
        break
      if hit is not None and len(hit) == len(np.shape(x)):
        names = hit
        break
    out.append(names)
  return jax.tree_util.tree_unflatten(treedef, out)


def tree_shardings(state: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   logical: Any = None) -> Any:
  """NamedShardings for every array of `state` (see tree_logical_specs);
  unnamed arrays (step counters, scalars) are replicated."""
  names = tree_logical_specs(state, logical)
  return jax.tree.map(
      lambda x, n: NamedSharding(
          mesh, logical_to_mesh(n, rules, mesh, np.shape(x))),
      state, names, is_leaf=lambda x: x is None)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (for `.lower(...)`, or a state
  a checkpoint will fill)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      state, shardings)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                 logical: Any = None, abstract: bool = False
                 ) -> tuple[Any, Any]:
  """(state, shardings): `init_fn()` run under jit with sharded outputs, so
  no host ever holds the full state (every process calls this alike).
  abstract=True runs nothing: the state is jax.ShapeDtypeStructs with those
  shardings (for a state a checkpoint or another run's params will fill)."""
  shapes = jax.eval_shape(init_fn)
  shardings = tree_shardings(shapes, mesh, rules, logical)
  if abstract:
    return abstract_with_shardings(shapes, shardings), shardings
  with jax.set_mesh(mesh):
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


def put(tree: Any, mesh: Mesh,
        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
        logical: Any = None) -> tuple[Any, Any]:
  """(arrays, shardings): host arrays (e.g. restored params, the same on
  every process) placed on the mesh as their logical names say."""
  shardings = tree_shardings(tree, mesh, rules, logical)
  return jax.device_put(tree, shardings), shardings


def batch_sharding(mesh: Mesh, ndim: int,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                   ) -> NamedSharding:
  """Leading (batch) dim over the `act_batch` mesh axes; the rest whole."""
  return NamedSharding(mesh, logical_to_mesh(
      ("act_batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_shards(mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
  """How many ways a batch is split on `mesh` (its act_batch axes)."""
  spec = logical_to_mesh(("act_batch",), rules, mesh)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def process_batch_size(global_size: int) -> int:
  """This process's share of a global batch (its loader's batch size)."""
  n = jax.process_count()
  if global_size % n:
    raise ValueError(f"batch size {global_size} does not split over {n} "
                     f"processes; make it a multiple of {n}")
  return global_size // n


def global_batch(local: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Process-local batch (numpy, leading dim = this process's rows) -> global
  jax.Arrays sharded over the batch axes. Each process passes its own rows
  (grain's per-process shard); one process passes the whole batch."""
  def put(x):
    x = np.asarray(x)
    s = batch_sharding(mesh, x.ndim, rules)
    return jax.make_array_from_process_local_data(s, x)
  return jax.tree.map(put, local)


def initialize_distributed(config: Any = None) -> None:
  """`jax.distributed.initialize` for multi-process runs.

  On Cloud TPU VMs / GKE (xpk) the arguments are auto-detected: set
  RD_JAX_DISTRIBUTED=1 (the launch/ scripts do). Elsewhere (e.g. CPU
  processes on one machine) give RD_JAX_COORDINATOR=host:port,
  RD_JAX_NUM_PROCESSES and RD_JAX_PROCESS_ID, or the same keys under
  `config.distributed` (coordinator, num_processes, process_id). A single
  process with none of these does nothing.
  """
  d = config.get("distributed") if hasattr(config, "get") else None
  coord = os.environ.get("RD_JAX_COORDINATOR") or (d and d.get("coordinator"))
  if coord:
    num = int(os.environ.get("RD_JAX_NUM_PROCESSES") or d.num_processes)
    pid = int(os.environ.get("RD_JAX_PROCESS_ID") or d.process_id)
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # CPU processes exchange collectives over gloo (TCP).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coord, num_processes=num, process_id=pid)
  elif os.environ.get("RD_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def shard_activation(x: jax.Array, names: Sequence[str | None],
                     rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                     ) -> jax.Array:
  """Constrains an activation by logical names when a mesh is set.

  Outside a mesh (plain single-device calls) it is the identity, so models stay
  usable without any sharding setup. Use under `jax.set_mesh(mesh)`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_mesh(tuple(names), rules, mesh))

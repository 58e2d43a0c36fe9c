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
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
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
  return nnx.Param(value, sharding_names=names)


def logical_to_mesh(spec: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
  """Maps a logical PartitionSpec to a mesh PartitionSpec under `rules`.

  A mesh axis is used at most once per spec (first dimension wins), and mesh
  axes of size 1 or absent from `mesh` are dropped, so the same rules serve any
  mesh shape.
  """
  if spec is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in spec:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; add it to the "
                     f"sharding rules table (known: {sorted(table)})")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = tuple(a for a in axes if a not in used and
                 (mesh is None or mesh.shape.get(a, 1) > 1))
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


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The one mesh builder: (data, fsdp, tensor) sizes, -1 = fill the rest."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} "
                     f"entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {tuple(shape)} does not divide the {len(devices)} "
          f"devices; choose sizes whose product divides {len(devices)}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices but "
        f"{len(devices)} are available; make the product equal "
        f"{len(devices)} or use -1 for one axis")
  arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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

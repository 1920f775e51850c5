"""The device mesh, logical axis rules, and the shardings of parameters and train state.

Every parameter carries logical axis names (`logical_axes`); config rules
map them to mesh axes (`data`, `fsdp`, `tensor`). A dimension the mapped mesh
axes do not divide stays replicated. OmniQuant transforms and stored parents
follow their weight: clipping factors, scales and codes share the weight's
names, the per-input-channel shift and scale take the names of its
contraction axes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import optax

from matquant_jax.nn.config import TransformerConfig
from matquant_jax.nn.weights import logical_axes, quantizable_weights

Params = Any


MESH_AXES = ('data', 'fsdp', 'tensor')


DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('stack', None),
    ('norm', None),
)


Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """ici: axis sizes within a slice (-1: the rest); dcn: across slices (multi-slice pods, no -1)."""
  return ml_collections.ConfigDict(dict(ici=dict(data=data, fsdp=fsdp, tensor=tensor),
                                        dcn=dict(data=1, fsdp=1, tensor=1), rules=DEFAULT_RULES))


def _resolve(sizes: Mapping[str, int], n: int, what: str) -> tuple[int, ...]:
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'{what} mesh {dict(sizes)}: at most one axis may be -1')
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or n % known:
    raise ValueError(f'{what} mesh {dict(sizes)} does not divide the {n} devices')
  shape = [n // known if s == -1 else s for s in shape]
  if math.prod(shape) != n:
    raise ValueError(f'{what} mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} '
                     f'devices, but there are {n}')
  return tuple(shape)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), hybrid across slices when dcn > 1."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = tuple(int(cfg.dcn[a]) for a in MESH_AXES)
  if min(dcn) < 1 or len(devices) % math.prod(dcn):
    raise ValueError(f'dcn mesh {dict(cfg.dcn)} does not divide the {len(devices)} devices')
  ici = _resolve(cfg.ici, len(devices) // math.prod(dcn), 'ici')
  types = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD-style: shardings propagate through jit
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=types, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return Mesh(grid, MESH_AXES, axis_types=types)


def _mesh_axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def check_rules(rules: Rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
  """The rules as a dict; raises ValueError for a rule naming an axis the mesh lacks."""
  table = {}
  for name, value in rules:
    for axis in _mesh_axes(value):
      if axis not in mesh.axis_names:
        raise ValueError(f'sharding rule {name!r} -> {value!r} names mesh axis {axis!r}; '
                         f'the mesh has {tuple(mesh.axis_names)}')
    table[name] = _mesh_axes(value)
  return table


def partition_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                   mesh: Mesh) -> P:
  """Logical names -> PartitionSpec; a dimension the mesh axes do not divide is replicated."""
  table, used, spec = check_rules(rules, mesh), set(), []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _key(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


def leaf_logical_axes(path: str, ndim: int, names: Mapping[str, tuple],
                      reduce_axes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, ...]:
  """Logical names of one leaf of a params, 'quant' or parent tree, by its '/'-joined path."""
  path = re.sub(r'(^|/)layer_\d+/', r'\1', path)
  if path in names and len(names[path]) == ndim:
    return names[path]
  base, _, leaf = path.rpartition('/')
  if base in names:
    w = names[base]
    if leaf in ('shift', 'smooth'):  # over the weight's contraction axes
      sub = tuple(w[a] for a in reduce_axes.get(base, ()))
      if len(sub) == ndim:
        return sub
    elif len(w) == ndim:  # codes, scale, zero point, clipping logits (size-1 axes stay replicated)
      return w
    elif leaf == 'packed' and len(w) + 1 == ndim:  # resident codes: [..., n / 8, bytes per 8]
      return w + (None,)
  return (None,) * ndim


def tree_shardings(tree, mesh: Mesh, rules: Rules, names: Mapping[str, tuple],
                   reduce_axes: Mapping[str, tuple[int, ...]] | None = None):
  """NamedSharding for every leaf of a params / 'quant' / parent tree (arrays or shape structs)."""
  def one(path, leaf):
    p = '/'.join(_key(k) for k in path)
    axes = leaf_logical_axes(p, len(leaf.shape), names, reduce_axes or {})
    return NamedSharding(mesh, partition_spec(axes, leaf.shape, rules, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batch rows over the 'batch' rule's mesh axes (data x fsdp by default)."""
  return NamedSharding(mesh, P(check_rules(rules, mesh).get('batch') or None))


def state_shardings(state_shape, tx: optax.GradientTransformation, param_shardings, mesh: Mesh):
  """Shardings of a train state {'step', 'params', 'opt_state'}: optimizer moments follow their
  parameters, scalars (step, counts) are replicated."""
  rep = replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, state_shape['opt_state'], param_shardings,
                              transform_non_params=lambda _: rep)
  return {'step': rep, 'params': param_shardings, 'opt_state': opt}


def global_batch(local_rows, sharding: NamedSharding) -> jax.Array:
  """A global array from this process's rows (all rows when there is one process)."""
  return jax.make_array_from_process_local_data(sharding, local_rows)


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or shape structs) under `shardings`."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sh.shard_shape(leaf.shape)) * jax.numpy.dtype(leaf.dtype).itemsize
  return total


def model_shardings(config: TransformerConfig, tree: Params, mesh, rules) -> Params:
  """NamedShardings of a params, 'quant' or parent tree of this model under the mesh rules."""
  reduce = {p: i.reduce_axes for p, i in quantizable_weights(config).items()}
  return tree_shardings(tree, mesh, rules, logical_axes(config), reduce)

"""Device mesh from `cfg.mesh`, and logical axis names -> mesh shardings through the config's rules.

Changing the parallelism is a config edit: models name their array axes ('batch', 'embed', 'heads', ...) and
never mention mesh axes.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from framework.config_checks import fail
from framework.models.axes import LOGICAL_AXES

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')  # outermost (DCN-friendly) to innermost (fastest links)

# Logical axis name -> mesh axes. Parameters use 'embed' (FSDP-sharded); activations use 'act_embed' so the
# batch can take the fsdp axis without colliding with the parameter rule.
DEFAULT_AXIS_RULES = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('expert', 'expert'),
    ('layers', None),
    ('seq', None),
    ('head_dim', None),
    ('act_embed', None),
)


# --- the `mesh` config section ---------------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,              # ICI sizes; -1 fills with the remaining devices
      dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1,  # across slices / hosts (multi-slice)
      axis_rules=DEFAULT_AXIS_RULES,
  ))


def rule_axes(axes) -> tuple[str, ...]:
  """A rule's mesh axes (None, one name or a sequence of names) as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def shard_count(rules, sizes: dict[str, int], name: str) -> tuple[int, tuple[str, ...]]:
  """How many shards the first rule for logical axis `name` splits it into, and over which mesh axes."""
  for rule_name, axes in rules:
    if rule_name == name:
      axes = rule_axes(axes)
      return math.prod(sizes[a] for a in axes), axes
  return 1, ()


def mesh_sizes(mesh_cfg, num_devices: int) -> dict[str, int]:
  """ICI size per mesh axis (after filling -1) times its DCN size; raises on sizes that do not fit."""
  dcn = {a: mesh_cfg[f'dcn_{a}'] for a in MESH_AXES}
  for axis, size in dcn.items():
    if size < 1:
      fail(f'mesh.dcn_{axis}', f'must be >= 1, got {size}')
  n_dcn = math.prod(dcn.values())
  if num_devices % n_dcn:
    fail('mesh.dcn_*', f'the DCN sizes multiply to {n_dcn}, which does not divide the {num_devices} devices')
  per_slice = num_devices // n_dcn
  ici = {a: mesh_cfg[a] for a in MESH_AXES}
  fill = [a for a, s in ici.items() if s == -1]
  for axis, size in ici.items():
    if size == 0 or size < -1:
      fail(f'mesh.{axis}', f'must be >= 1 or -1 (fill), got {size}')
  if len(fill) > 1:
    fail(f'mesh.{fill[1]}', f'only one axis may be -1, got -1 for {fill}')
  known = math.prod(s for s in ici.values() if s != -1)
  if fill:
    if per_slice % known:
      fail(f'mesh.{fill[0]}', f'cannot fill: the other ICI axes multiply to {known}, which does not divide '
           f'{per_slice} devices per slice')
    ici[fill[0]] = per_slice // known
  elif known != per_slice:
    sizes = ' x '.join(f'{a}={s}' for a, s in ici.items())
    fail('mesh', f'ICI sizes {sizes} multiply to {known} but there are {per_slice} devices per slice '
         f'({num_devices} devices / {n_dcn} DCN); set one axis to -1 to fill, or fix the sizes')
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def check_rules(rules) -> None:
  """Each rule maps a logical name some model uses to real mesh axes."""
  try:
    pairs = [(name, axes) for name, axes in rules]
  except (TypeError, ValueError):
    fail('mesh.axis_rules', 'must be a sequence of (logical_name, mesh_axes) pairs')
  for name, axes in pairs:
    if name not in LOGICAL_AXES:
      close = difflib.get_close_matches(str(name), LOGICAL_AXES, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ''
      fail('mesh.axis_rules', f'rule for {name!r}: no model uses that logical axis name, so the rule would shard '
           f'nothing; {hint}the names are {tuple(LOGICAL_AXES)}')
    for axis in rule_axes(axes):
      if axis not in MESH_AXES:
        fail('mesh.axis_rules', f'rule for {name!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}')


def validate(cfg, num_devices: int) -> dict[str, int]:
  """Checks the rules and the sizes; returns the resolved size of each mesh axis."""
  check_rules(cfg.mesh.axis_rules)
  return mesh_sizes(cfg.mesh, num_devices)


# --- meshes and shardings ------------------------------------------------------------------------------------


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'expert', 'tensor') and Auto axis types (GSPMD propagates).

  With DCN sizes > 1 the devices are split into granules (TPU slices, else hosts; on a single host, equal
  contiguous blocks, so multi-slice layouts can be tried on fake CPU devices): each axis is dcn x ici with the
  DCN part outermost, so only the DCN-split axes cross the slow links.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  dcn = [mesh_cfg[f'dcn_{a}'] for a in MESH_AXES]
  ici = [sizes[a] // d for a, d in zip(MESH_AXES, dcn)]
  granules = _granules(devices, int(np.prod(dcn)))
  blocks = np.stack([_ici_grid(g, ici) for g in granules]).reshape(dcn + ici)
  # [d0..d3, i0..i3] -> [d0, i0, d1, i1, ...] -> [d0*i0, d1*i1, ...]
  order = [k for pair in zip(range(4), range(4, 8)) for k in pair]
  grid = blocks.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])
  return Mesh(grid, MESH_AXES)


def _granules(devices, count: int) -> list[list[jax.Device]]:
  if count == 1:
    return [devices]
  key = (lambda d: d.slice_index) if hasattr(devices[0], 'slice_index') else (lambda d: d.process_index)
  groups: dict = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  if len(groups) == 1:
    per = len(devices) // count
    return [devices[i * per:(i + 1) * per] for i in range(count)]
  if len(groups) != count:
    raise ValueError(f'config mesh.dcn_*: the DCN sizes multiply to {count} but the devices form {len(groups)} '
                     'slices/hosts; make the dcn_* sizes multiply to the number of slices')
  return [groups[k] for k in sorted(groups)]


def _ici_grid(devices, ici: list[int]) -> np.ndarray:
  if devices[0].platform == 'cpu':
    return np.asarray(devices).reshape(ici)
  return mesh_utils.create_device_mesh(ici, devices)


def logical_to_spec(names: Sequence[str | None] | None, rules) -> PartitionSpec:
  """PartitionSpec for an array whose dims carry `names`.

  Rules are tried in order; a mesh axis is used at most once per array (first come), so 'batch' and 'embed'
  can both point at 'fsdp' and the earlier dim wins. Names without a rule stay replicated.
  """
  if names is None:
    return PartitionSpec()
  table = {}
  for name, axes in rules:
    table.setdefault(name, rule_axes(axes))
  used: set[str] = set()
  spec = []
  for name in names:
    axes = tuple(a for a in table.get(name, ()) if a not in used) if name is not None else ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Sharder:
  """Maps logical names to shardings on one mesh. Hashable, so flax modules can hold it as an attribute."""
  mesh: Mesh | None
  rules: tuple

  def spec(self, names) -> PartitionSpec:
    return logical_to_spec(names, self.rules)

  def sharding(self, names) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names))

  def constrain(self, x: jax.Array, names) -> jax.Array:
    """Pins an activation's layout; a no-op without a mesh (single-device use, init)."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.sharding(names))

  def tree_shardings(self, logical_specs: Any) -> Any:
    """NamedSharding per leaf of a tree of logical PartitionSpecs (as flax's get_partition_spec gives)."""
    return jax.tree.map(lambda names: self.sharding(tuple(names)), logical_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  @property
  def platform(self) -> str:
    """The platform the mesh's devices are ('cpu', 'gpu', 'tpu'): what a program built for this mesh runs on,
    also when it is compiled ahead of time on a host of another kind. Without a mesh, the default backend."""
    return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

  def axis_size(self, names) -> int:
    """How many shards a dim named `names[0]` is split into."""
    entry = self.spec(names)[0]
    return int(np.prod([self.mesh.shape[a] for a in rule_axes(entry)])) if self.mesh is not None else 1


def spread_over(sharding: NamedSharding, shape: Sequence[int], axes: Sequence[str]) -> NamedSharding:
  """`sharding` further split over those of mesh `axes` it does not use yet (size > 1), on the first dim they
  divide after its current split; unchanged where no dim does."""
  mesh = sharding.mesh
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {a for entry in spec for a in rule_axes(entry)}
  extra = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
  if not extra:
    return sharding
  for i, entry in enumerate(spec):
    current = rule_axes(entry)
    if shape[i] % (math.prod(mesh.shape[a] for a in current + extra)) == 0:
      spec[i] = current + extra if len(current + extra) > 1 else extra[0]
      return NamedSharding(mesh, PartitionSpec(*spec))
  return sharding


def make_sharder(cfg, devices: Sequence[jax.Device] | None = None) -> Sharder:
  rules = tuple((name, axes if axes is None or isinstance(axes, str) else rule_axes(axes))
                for name, axes in cfg.mesh.axis_rules)
  return Sharder(make_mesh(cfg.mesh, devices), rules)

"""Device mesh from `cfg.mesh`, and logical axis names -> mesh shardings through the config's rules.

Changing the parallelism is a config edit: models name their array axes ('batch', 'embed', 'heads', ...) and
never mention mesh axes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from framework import config as config_lib

MESH_AXES = config_lib.ICI_AXES  # outermost (DCN-friendly) to innermost (fastest links)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'expert', 'tensor') and Auto axis types (GSPMD propagates).

  With DCN sizes > 1 the devices are split into granules (TPU slices, else hosts; on a single host, equal
  contiguous blocks, so multi-slice layouts can be tried on fake CPU devices): each axis is dcn x ici with the
  DCN part outermost, so only the DCN-split axes cross the slow links.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config_lib.mesh_sizes(mesh_cfg, len(devices))
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
    table.setdefault(name, config_lib.rule_axes(axes))
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

  def axis_size(self, names) -> int:
    """How many shards a dim named `names[0]` is split into."""
    entry = self.spec(names)[0]
    return int(np.prod([self.mesh.shape[a] for a in config_lib.rule_axes(entry)])) if self.mesh is not None else 1


def make_sharder(cfg, devices: Sequence[jax.Device] | None = None) -> Sharder:
  rules = tuple((name, axes if axes is None or isinstance(axes, str) else config_lib.rule_axes(axes))
                for name, axes in cfg.mesh.axis_rules)
  return Sharder(make_mesh(cfg.mesh, devices), rules)

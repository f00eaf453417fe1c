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
  """A Mesh with axes ('data', 'fsdp', 'expert', 'tensor') and Auto axis types (GSPMD propagates)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = config_lib.mesh_sizes(mesh_cfg, len(devices))
  dcn = [mesh_cfg[f'dcn_{a}'] for a in MESH_AXES]
  ici = [sizes[a] // d for a, d in zip(MESH_AXES, dcn)]
  if np.prod(dcn) > 1:
    # On CPU and GPU hosts are the slices; on TPU the devices carry a slice_index.
    granule_is_process = not hasattr(devices[0], 'slice_index')
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule_is_process)
  elif devices[0].platform == 'cpu':
    grid = np.asarray(devices).reshape(ici)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices)
  return Mesh(grid, MESH_AXES)


def _rule_axes(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None] | None, rules) -> PartitionSpec:
  """PartitionSpec for an array whose dims carry `names`.

  Rules are tried in order; a mesh axis is used at most once per array (first come), so 'batch' and 'embed'
  can both point at 'fsdp' and the earlier dim wins. Names without a rule stay replicated.
  """
  if names is None:
    return PartitionSpec()
  table = {}
  for name, axes in rules:
    table.setdefault(name, _rule_axes(axes))
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
    return int(np.prod([self.mesh.shape[a] for a in _rule_axes(entry)])) if self.mesh is not None else 1


def make_sharder(cfg, devices: Sequence[jax.Device] | None = None) -> Sharder:
  rules = tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
                for name, axes in cfg.mesh.axis_rules)
  return Sharder(make_mesh(cfg.mesh, devices), rules)

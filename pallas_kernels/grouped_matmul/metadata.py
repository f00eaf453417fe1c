"""Group bookkeeping computed outside the kernels (tiny int32 arrays).

Rows of x are grouped contiguously: group g owns rows offsets[g] ..
offsets[g + 1] - 1. Sizes are clipped so that offsets never pass M (a sum
larger than M truncates the last groups; negative sizes count as 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """int32 [G + 1]: 0, then the clipped running ends of the groups."""
  ends = jnp.clip(jnp.cumsum(jnp.maximum(group_sizes, 0)), 0, m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])


def tile_group_ranges(offsets: jax.Array, m: int, tm: int
                      ) -> tuple[jax.Array, jax.Array]:
  """First and last group overlapping each row tile (GPU forward kernel).

  Returns int32 [tiles_m] arrays; last < first when the tile holds no grouped
  row (it lies past sum(group_sizes)). Empty groups inside the range are
  skipped by the kernel.
  """
  num_groups = offsets.shape[0] - 1
  tiles = -(-m // tm)
  first_row = jnp.arange(tiles, dtype=jnp.int32) * tm
  last_row = jnp.minimum(first_row + tm, m) - 1
  ends = offsets[1:]
  first = jnp.searchsorted(ends, first_row, side="right").astype(jnp.int32)
  last = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32)
  return first, jnp.minimum(last, num_groups - 1)


def tile_visits(offsets: jax.Array, m: int, tm: int, *,
                visit_empty: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Megablox-style visit list for the TPU kernels: one grid step per
  (group, row tile) pair that overlaps, in row order.

  A tile that straddles a group boundary is visited once per group, and each
  visit only keeps its own group's rows. Visits to one tile are adjacent, so
  a TPU output block stays resident in VMEM across them. The list has the
  static length tiles_m + num_groups (an upper bound); trailing unused steps
  repeat the last real visit with active = 0 so they touch no new block.

  Args:
    offsets: int32 [num_groups + 1] from group_offsets (may include a tail
      pseudo-group).
    m: rows of x.
    tm: row tile.
    visit_empty: give every empty group one visit (the dw kernel must write
      zeros for it); otherwise empty groups get none.

  Returns:
    (group id, row tile id, active flag), each int32 [tiles_m + num_groups].
  """
  num_groups = offsets.shape[0] - 1
  tiles = -(-m // tm)
  sizes = offsets[1:] - offsets[:-1]
  first = jnp.minimum(offsets[:-1] // tm, tiles - 1)
  last = (offsets[1:] - 1) // tm
  count = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0)
  cum = jnp.cumsum(count)
  total = cum[-1]
  steps = jnp.arange(tiles + num_groups, dtype=jnp.int32)
  real = jnp.minimum(steps, total - 1)
  group = jnp.searchsorted(cum, real, side="right").astype(jnp.int32)
  tile = first[group] + real - (cum[group] - count[group])
  active = (steps < total).astype(jnp.int32)
  return group, tile.astype(jnp.int32), active

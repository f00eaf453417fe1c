"""TPU (Mosaic) grouped matmul kernels: megablox-style tile visiting.

Mosaic blocks are addressed through index maps, so the data-dependent choice
of (row tile, weight) per step comes from scalar-prefetched visit lists
(metadata.tile_visits): grid step v works on row tile tile[v] with weight
group[v]. A row tile that straddles a group boundary is visited once per
group; each visit only writes its group's rows (a select on the resident
output block), and visits to one tile are adjacent so the block stays in
VMEM between them. The forward pass adds a tail pseudo-group for the rows
past sum(group_sizes): its visits write zeros, so every output row is
written and no uninitialised memory escapes.

Tiles follow Mosaic's rules: tm a multiple of the sublane tiling, tk and tn
multiples of 128 or the full dim. Partial edge blocks read undefined memory,
so the contraction remainder is zeroed in both operands before the dot
(0 * NaN would poison the sum); row and column overhang only reaches output
elements that are never stored.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.block_sizes import GroupedMatmulBlockSizes


def _tiles(block_sizes, m, k, n, dtype):
  sub = tiling.sublanes(dtype)
  tm = min(tiling.round_up(block_sizes.tm, sub), tiling.round_up(m, sub))

  def lane_tile(t, dim):
    t = tiling.round_up(t, tiling.LANES)
    return dim if dim <= t else t

  return tm, lane_tile(block_sizes.tk, k), lane_tile(block_sizes.tn, n)


def _zero_k_tail(a, k0, k_dim, axis):
  iota = lax.broadcasted_iota(jnp.int32, a.shape, axis)
  return jnp.where(k0 + iota < k_dim, a, jnp.zeros_like(a))


def _gmm_kernel(off_ref, group_ref, tile_ref, active_ref, x_ref, w_ref, o_ref,
                acc_ref, *, num_groups: int, k_dim: int, transpose_rhs: bool):
  v, kb = pl.program_id(1), pl.program_id(2)
  g = group_ref[v]
  tm, tn = o_ref.shape
  tk = x_ref.shape[1]

  @pl.when(kb == 0)
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((active_ref[v] == 1) & (g < num_groups))
  def _accumulate():
    x, w = x_ref[...], w_ref[...]
    if k_dim % tk:
      x = _zero_k_tail(x, kb * tk, k_dim, 1)
      w = _zero_k_tail(w, kb * tk, k_dim, 1 if transpose_rhs else 0)
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
    acc_ref[...] += lax.dot_general(x, w, dims,
                                    preferred_element_type=jnp.float32)

  @pl.when((kb == pl.num_programs(2) - 1) & (active_ref[v] == 1))
  def _store():
    rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    mine = (rows >= off_ref[g]) & (rows < off_ref[g + 1])
    # The tail pseudo-group never accumulated, so it stores zeros.
    o_ref[...] = jnp.where(mine, acc_ref[...],
                           o_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def gmm(x: jax.Array, w: jax.Array, offsets: jax.Array, *,
        transpose_rhs: bool, out_dtype, block_sizes: GroupedMatmulBlockSizes,
        interpret: bool) -> jax.Array:
  """Same contract as kernel_gpu.gmm."""
  m, k = x.shape
  num_groups = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  tm, tk, tn = _tiles(block_sizes, m, k, n, x.dtype)
  # Tail pseudo-group: rows past sum(group_sizes) up to M.
  offsets = jnp.concatenate([offsets, jnp.full((1,), m, jnp.int32)])
  group, tile, active = metadata.tile_visits(offsets, m, tm,
                                             visit_empty=False)

  last_k = pl.cdiv(k, tk) - 1

  def k_index(v, kb, grp, act):
    # Tail and padding visits compute nothing: pin them to the block the
    # previous visit ended on, so the pipeline issues no DMA for them.
    return jnp.where((act[v] == 1) & (grp[v] < num_groups), kb, last_k)

  def x_map(j, v, kb, off, grp, til, act):
    return til[v], k_index(v, kb, grp, act)

  def w_map(j, v, kb, off, grp, til, act):
    g = jnp.minimum(grp[v], num_groups - 1)
    kk = k_index(v, kb, grp, act)
    return (g, j, kk) if transpose_rhs else (g, kk, j)

  def o_map(j, v, kb, off, grp, til, act):
    return til[v], j

  w_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(_gmm_kernel, num_groups=num_groups, k_dim=k,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(pl.cdiv(n, tn), group.shape[0], pl.cdiv(k, tk)),
          in_specs=[pl.BlockSpec((tm, tk), x_map),
                    pl.BlockSpec(w_block, w_map)],
          out_specs=pl.BlockSpec((tm, tn), o_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="grouped_matmul_tpu",
  )(offsets, group, tile, active, x, w)


def _tgmm_kernel(off_ref, group_ref, tile_ref, active_ref, x_ref, dy_ref,
                 o_ref, acc_ref):
  v = pl.program_id(2)
  last_v = pl.num_programs(2) - 1
  g = group_ref[v]
  tm = x_ref.shape[0]
  start, end = off_ref[g], off_ref[g + 1]

  @pl.when((v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g))
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((active_ref[v] == 1) & (end > start))
  def _accumulate():
    def own_rows(a):
      rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, a.shape, 0)
      mine = (rows >= start) & (rows < end)
      return jnp.where(mine, a.astype(jnp.float32), 0.0)

    # Transposing in f32 is the layout every TPU generation supports.
    x_t = own_rows(x_ref[...]).T.astype(x_ref.dtype)
    dy = own_rows(dy_ref[...]).astype(dy_ref.dtype)
    acc_ref[...] += jnp.dot(x_t, dy, preferred_element_type=jnp.float32)

  @pl.when((v == last_v) | (group_ref[jnp.minimum(v + 1, last_v)] != g))
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x: jax.Array, dy: jax.Array, offsets: jax.Array, *, out_dtype,
         block_sizes: GroupedMatmulBlockSizes, interpret: bool) -> jax.Array:
  """Same contract as kernel_gpu.tgmm."""
  m, k = x.shape
  n = dy.shape[1]
  num_groups = offsets.shape[0] - 1
  tm, tk, tn = _tiles(block_sizes, m, k, n, x.dtype)
  group, tile, active = metadata.tile_visits(offsets, m, tm, visit_empty=True)

  def x_map(i, j, v, off, grp, til, act):
    return til[v], i

  def dy_map(i, j, v, off, grp, til, act):
    return til[v], j

  def o_map(i, j, v, off, grp, til, act):
    return grp[v], i, j

  return pl.pallas_call(
      _tgmm_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), group.shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), x_map),
                    pl.BlockSpec((tm, tn), dy_map)],
          out_specs=pl.BlockSpec((None, tk, tn), o_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="transposed_grouped_matmul_tpu",
  )(offsets, group, tile, active, x, dy)

"""GPU (Triton) grouped matmul kernels.

Forward: one program per (row tile, column tile) of the output. It loops
over the groups that overlap its row tile (at most a few: a tile straddles a
boundary) and, for each, runs the K loop against that group's weight, keeping
only the group's rows. Each output tile is written once, by one program, so
no atomics, no scatter and no uninitialised rows: rows past sum(group_sizes)
stay zero. Empty groups run zero K steps.

dw: one program per (K tile, N tile, group) walks the group's row tiles and
accumulates x_g^T dy_g; an empty group writes zeros.

Triton has no bounds checks, so every load and store is masked against the
true M, K, N and the group's rows (masked elements read as 0): no input is
padded, and tiles need not divide the shapes.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.block_sizes import GroupedMatmulBlockSizes
from pallas_kernels.platform import plgpu
from pallas_kernels.platform import require_triton


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _gmm_kernel(first_ref, last_ref, off_ref, x_ref, w_ref, o_ref, *,
                m_dim: int, k_dim: int, n_dim: int, tk: int,
                transpose_rhs: bool):
  m_tile, n_tile = pl.program_id(0), pl.program_id(1)
  tm, tn = o_ref.shape
  rows = m_tile * tm + _iota((tm, 1), 0)
  cols = n_tile * tn + _iota((1, tn), 1)
  k_steps = pl.cdiv(k_dim, tk)

  def group_body(g, out):
    start, end = off_ref[g], off_ref[g + 1]

    def k_body(step, acc):
      k0 = step * tk
      x_mask = (rows < m_dim) & (k0 + _iota((1, tk), 1) < k_dim)
      x = plgpu.load(x_ref.at[:, pl.ds(k0, tk)], mask=x_mask, other=0.0)
      if transpose_rhs:  # w is [G, n_dim, k_dim]; contract both minor dims.
        w_mask = (n_tile * tn + _iota((tn, 1), 0) < n_dim) & (
            k0 + _iota((1, tk), 1) < k_dim)
        w = plgpu.load(w_ref.at[g, pl.ds(n_tile * tn, tn), pl.ds(k0, tk)],
                       mask=w_mask, other=0.0)
        dims = (((1,), (1,)), ((), ()))
      else:
        w_mask = (k0 + _iota((tk, 1), 0) < k_dim) & (cols < n_dim)
        w = plgpu.load(w_ref.at[g, pl.ds(k0, tk), pl.ds(n_tile * tn, tn)],
                       mask=w_mask, other=0.0)
        dims = (((1,), (0,)), ((), ()))
      return acc + lax.dot_general(x, w, dims,
                                   preferred_element_type=jnp.float32)

    steps = jnp.where(end > start, k_steps, 0)
    acc = lax.fori_loop(0, steps, k_body, jnp.zeros((tm, tn), jnp.float32))
    return jnp.where((rows >= start) & (rows < end), acc, out)

  out = lax.fori_loop(first_ref[0], last_ref[0] + 1, group_body,
                      jnp.zeros((tm, tn), jnp.float32))
  plgpu.store(o_ref, out.astype(o_ref.dtype),
              mask=(rows < m_dim) & (cols < n_dim))


def _tiles(block_sizes: GroupedMatmulBlockSizes):
  return tuple(max(tiling.TRITON_MIN_TILE, t)
               for t in (block_sizes.tm, block_sizes.tk, block_sizes.tn))


def gmm(x: jax.Array, w: jax.Array, offsets: jax.Array, *,
        transpose_rhs: bool, out_dtype, block_sizes: GroupedMatmulBlockSizes,
        interpret: bool) -> jax.Array:
  """out[rows of g] = x[rows of g] @ w[g] (w[g]^T if transpose_rhs).

  Args:
    x: [M, K].
    w: [G, K, N], or [G, N, K] with transpose_rhs.
    offsets: int32 [G + 1] group row offsets (metadata.group_offsets).
    transpose_rhs: contract w's last dim instead of its middle one.
    out_dtype: result dtype.
    block_sizes: tiling.
    interpret: run the Pallas interpreter.

  Returns:
    [M, N]; rows outside every group are 0.
  """
  require_triton()
  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  tm, tk, tn = _tiles(block_sizes)
  first, last = metadata.tile_group_ranges(offsets, m, tm)
  kernel = functools.partial(_gmm_kernel, m_dim=m, k_dim=k, n_dim=n, tk=tk,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(m, tm), pl.cdiv(n, tn)),
      in_specs=[
          pl.BlockSpec((1,), lambda i, j: (i,)),
          pl.BlockSpec((1,), lambda i, j: (i,)),
          pl.BlockSpec(offsets.shape, lambda i, j: (0,)),
          pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
          pl.BlockSpec(w.shape, lambda i, j: (0, 0, 0)),
      ],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="grouped_matmul_gpu",
  )(first, last, offsets, x, w)


def _tgmm_kernel(off_ref, x_ref, dy_ref, o_ref, *, tm: int, k_dim: int,
                 n_dim: int):
  k_tile, n_tile, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tk, tn = o_ref.shape
  start, end = off_ref[g], off_ref[g + 1]
  first_tile = lax.div(start, tm)
  num_tiles = jnp.where(end > start,
                        lax.div(end + tm - 1, tm) - first_tile, 0)
  k_cols = k_tile * tk + _iota((1, tk), 1)
  n_cols = n_tile * tn + _iota((1, tn), 1)

  def body(i, acc):
    r0 = (first_tile + i) * tm
    rows = r0 + _iota((tm, 1), 0)
    mine = (rows >= start) & (rows < end)
    x = plgpu.load(x_ref.at[pl.ds(r0, tm), pl.ds(k_tile * tk, tk)],
                   mask=mine & (k_cols < k_dim), other=0.0)
    dy = plgpu.load(dy_ref.at[pl.ds(r0, tm), pl.ds(n_tile * tn, tn)],
                    mask=mine & (n_cols < n_dim), other=0.0)
    return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, num_tiles, body, jnp.zeros((tk, tn), jnp.float32))
  k_rows = k_tile * tk + _iota((tk, 1), 0)
  plgpu.store(o_ref, acc.astype(o_ref.dtype),
              mask=(k_rows < k_dim) & (n_cols < n_dim))


def tgmm(x: jax.Array, dy: jax.Array, offsets: jax.Array, *, out_dtype,
         block_sizes: GroupedMatmulBlockSizes, interpret: bool) -> jax.Array:
  """dw[g] = x[rows of g]^T @ dy[rows of g]: [G, K, N]; empty groups give 0."""
  require_triton()
  k, n = x.shape[1], dy.shape[1]
  num_groups = offsets.shape[0] - 1
  tm, tk, tn = _tiles(block_sizes)
  kernel = functools.partial(_tgmm_kernel, tm=tm, k_dim=k, n_dim=n)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), num_groups),
      in_specs=[
          pl.BlockSpec(offsets.shape, lambda i, j, g: (0,)),
          pl.BlockSpec(x.shape, lambda i, j, g: (0, 0)),
          pl.BlockSpec(dy.shape, lambda i, j, g: (0, 0)),
      ],
      out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, g: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="transposed_grouped_matmul_gpu",
  )(offsets, x, dy)

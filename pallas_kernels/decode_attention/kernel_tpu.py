"""TPU (Mosaic) variant: keys walked sequentially on the innermost grid axis.

Same layout (layout.py) and maths (online_softmax.py) as kernel_gpu.
Differences that follow Mosaic's rules:
- kv_lens is scalar-prefetched into SMEM so the key index map can clamp the
  block index to the last block holding valid keys. Steps past a sequence's
  length then ask for the block already in VMEM, so the pipeline issues no
  DMA for them, and pl.when skips their compute. The key axis is "arbitrary"
  and carries the online-softmax state in VMEM scratch; the TPU gets its
  parallelism from the batch, kv-head and row-block axes, so there is no
  split-K and no merge pass.
- Blocks are full 2-D tiles: the last two block dims are multiples of (8, 128)
  or the full array dims. A key block is [block_kv, D] out of the free view
  [NB, L, KVH * D]; that needs D % 128 == 0 (or one kv head), otherwise D is
  zero-padded to 128.
- A partial last key block reads undefined memory on TPU, and the cache past
  a length holds anything, so values are zeroed past kv_len before p @ v.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.decode_attention import layout
from pallas_kernels.decode_attention import online_softmax
from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref,
            acc_ref, *, sm_scale: float, block_kv: int, num_new: int,
            group: int):
  b, row_block, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_len = len_ref[b]
  rows = q_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(j * block_kv < kv_len)
  def _step():
    pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    row = row_block * rows + lax.broadcasted_iota(
        jnp.int32, (rows, block_kv), 0)
    key_pos = j * block_kv + lax.broadcasted_iota(
        jnp.int32, v_ref.shape, 0)
    v = jnp.where(key_pos < kv_len, v_ref[...], jnp.zeros_like(v_ref[...]))
    mask = online_softmax.visible(pos, row, kv_len, num_new, group)
    state = (m_ref[...], l_ref[...], acc_ref[...])
    m, l, acc = online_softmax.update(state, q_ref[...], k_ref[...], v, mask,
                                      sm_scale)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    out, lse = online_softmax.finalize((m_ref[...], l_ref[...], acc_ref[...]))
    o_ref[...] = out
    lse_ref[...] = lse


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_lens: jax.Array, *,
           num_new: int, group: int, sm_scale: float,
           block_sizes: DecodeBlockSizes, interpret: bool
           ) -> tuple[jax.Array, jax.Array]:
  """Same contract as kernel_gpu.attend (see there)."""
  nb, kvh, r, d = q.shape
  length = k.shape[1]
  sub = max(tiling.sublanes(q.dtype), tiling.sublanes(k.dtype))
  lanes = tiling.LANES
  dp = d if (kvh == 1 or d % lanes == 0) else tiling.round_up(d, lanes)
  block_kv = tiling.round_up(block_sizes.block_kv, sub)
  if length <= block_kv:
    block_kv = length  # a full-dim block is always a legal Mosaic tile
  block_rows = min(tiling.round_up(block_sizes.block_rows, sub),
                   tiling.round_up(r, sub))
  rp = tiling.round_up(r, block_rows)
  q, k, v = layout.pad_and_flatten(q, k, v, head_dim=dp, rows=rp)
  num_blocks = pl.cdiv(length, block_kv)

  def kv_map(b, h, i, j, len_ref):
    # Past the length, stay on the last useful block: no new DMA is issued.
    last = jnp.maximum(lax.div(len_ref[b] + block_kv - 1, block_kv) - 1, 0)
    return b, jnp.minimum(j, last), h

  def row_map(b, h, i, j, len_ref):
    del j, len_ref
    return b, h, i, 0

  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_kv=block_kv,
                             num_new=num_new, group=group)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(nb, kvh, rp // block_rows, num_blocks),
          in_specs=[
              pl.BlockSpec((None, None, block_rows, dp), row_map),
              pl.BlockSpec((None, block_kv, dp), kv_map),
              pl.BlockSpec((None, block_kv, dp), kv_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, block_rows, dp), row_map),
              pl.BlockSpec((None, None, block_rows, 1), row_map),
          ],
          scratch_shapes=[
              pltpu.VMEM((block_rows, 1), jnp.float32),
              pltpu.VMEM((block_rows, 1), jnp.float32),
              pltpu.VMEM((block_rows, dp), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((nb, kvh, rp, dp), jnp.float32),
          jax.ShapeDtypeStruct((nb, kvh, rp, 1), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      interpret=interpret,
      name="decode_attention_tpu",
  )(kv_lens, q, k, v)
  return out[:, :, :r, :d], lse[:, :, :r, 0]

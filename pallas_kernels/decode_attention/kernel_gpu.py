"""GPU (Triton) variant: split-K flash-decoding with masked loads.

Operands come in the layout shared with kernel_tpu (layout.py). Grid (NB,
KVH, row blocks, key splits): each program walks its slice of the keys in
`block_kv` steps and stops at kv_len, so work and HBM reads past a sequence's
length are skipped. The per-split partial (out, lse) pairs are merged
outside the kernel with the same exact merge as `combine_attention`.

Triton has no bounds checks and wants power-of-two tiles >= 16, so tiles are
rounded up and every key/value load is masked against kv_len (other=0): the
masked rows read as zeros, which also keeps garbage past a length from
turning into NaN.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.decode_attention import layout
from pallas_kernels.decode_attention import online_softmax
from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes
from pallas_kernels.decode_attention.combine import merge_stacked
from pallas_kernels.platform import plgpu
from pallas_kernels.platform import require_triton

_TARGET_PROGRAMS = 256  # about two waves on a 132-SM H100


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale: float,
            block_kv: int, split_len: int, num_new: int, group: int):
  row_block, split = pl.program_id(2), pl.program_id(3)
  kv_len = len_ref[0]
  rows, head_dim = q_ref.shape
  q = q_ref[...]
  start = split * split_len
  # Trip count stops at the sequence length: blocks past it cost nothing.
  # (Clamp before dividing: lax.div truncates, which is floor only for >= 0.)
  remaining = jnp.clip(kv_len - start, 0, split_len)
  n_steps = lax.div(remaining + block_kv - 1, block_kv)
  row = row_block * rows + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
  col = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
  key_col = lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)

  def body(step, state):
    offset = step * block_kv
    in_range = (start + offset + key_col) < kv_len
    k = plgpu.load(k_ref.at[pl.ds(offset, block_kv), :], mask=in_range,
                   other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(offset, block_kv), :], mask=in_range,
                   other=0.0)
    mask = online_softmax.visible(start + offset + col, row, kv_len, num_new,
                                  group)
    return online_softmax.update(state, q, k, v, mask, sm_scale)

  state = lax.fori_loop(0, n_steps, body,
                        online_softmax.init_state(rows, head_dim))
  out, lse = online_softmax.finalize(state)
  o_ref[...] = out
  lse_ref[...] = lse


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_lens: jax.Array, *,
           num_new: int, group: int, sm_scale: float,
           block_sizes: DecodeBlockSizes, interpret: bool
           ) -> tuple[jax.Array, jax.Array]:
  """Masked attention of stacked query rows over per-NB caches.

  Args:
    q: [NB, KVH, R, D] query rows, ordered t * group + g within a kv head.
    k: [NB, L, KVH, D] keys.
    v: [NB, L, KVH, D] values.
    kv_lens: int32 [NB], valid keys per NB entry (0 <= kv_len <= L).
    num_new: T, the number of new tokens per sequence (1 = no causal part).
    group: query heads per kv head.
    sm_scale: softmax scale.
    block_sizes: tiling.
    interpret: run the Pallas interpreter.

  Returns:
    out f32 [NB, KVH, R, D] and lse f32 [NB, KVH, R].
  """
  require_triton()
  nb, kvh, r, d = q.shape
  length = k.shape[1]
  min_tile = tiling.TRITON_MIN_TILE
  dp = max(min_tile, tiling.next_pow2(d))
  block_kv = max(min_tile, block_sizes.block_kv)
  block_rows = max(min_tile, min(block_sizes.block_rows, tiling.next_pow2(r)))
  rp = tiling.round_up(r, block_rows)
  q, k, v = layout.pad_and_flatten(q, k, v, head_dim=dp, rows=rp)

  num_blocks = pl.cdiv(length, block_kv)
  splits = block_sizes.num_splits
  if splits is None:
    splits = pl.cdiv(_TARGET_PROGRAMS, nb * kvh * (rp // block_rows))
  splits = max(1, min(splits, num_blocks))
  split_len = pl.cdiv(num_blocks, splits) * block_kv
  splits = pl.cdiv(length, split_len)
  grid = (nb, kvh, rp // block_rows, splits)

  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_kv=block_kv,
                             split_len=split_len, num_new=num_new, group=group)
  out, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, i, s: (b,)),
          pl.BlockSpec((None, None, block_rows, dp),
                       lambda b, h, i, s: (b, h, i, 0)),
          pl.BlockSpec((None, split_len, dp), lambda b, h, i, s: (b, s, h)),
          pl.BlockSpec((None, split_len, dp), lambda b, h, i, s: (b, s, h)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_rows, dp),
                       lambda b, h, i, s: (b, h, s, i, 0)),
          pl.BlockSpec((None, None, None, block_rows, 1),
                       lambda b, h, i, s: (b, h, s, i, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((nb, kvh, splits, rp, dp), jnp.float32),
          jax.ShapeDtypeStruct((nb, kvh, splits, rp, 1), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="decode_attention_gpu",
  )(kv_lens, q, k, v)
  out, lse = merge_stacked(jnp.moveaxis(out, 2, 0),
                           jnp.moveaxis(lse[..., 0], 2, 0))
  return out[:, :, :r, :d], lse[:, :, :r]

"""Backward flash-attention kernels, TPU variant (Mosaic).

Same split and maths as backward.py. The streamed axis is a sequential grid
axis with f32 VMEM accumulators:
  * dK/dV grid (batch, kv_head, kv_block, group_head, q_block): the last two
    axes are sequential, so the gradients of a kv head are summed over its
    GQA group inside VMEM;
  * dQ grid (batch, head, q_block, kv_block).
Residuals come in GPU layout ([batch, heads, q_len] f32) and are
lane-replicated here for Mosaic.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.flash_attention import kernel_math as km
from pallas_kernels.flash_attention.tpu_forward import clamp_index
from pallas_kernels.flash_attention.tpu_forward import split_ranges
from pallas_kernels.flash_attention.tpu_forward import SUBLANES
from pallas_kernels.flash_attention.tpu_forward import tile_mask
from pallas_kernels.flash_attention.tpu_forward import tpu_segment_layout
from pallas_kernels.flash_attention.tpu_forward import when_visible
from pallas_kernels.tiling import LANES


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                kv_seg_ref, dk_ref, dv_ref, dk_scr, dv_scr, *,
                prob: km.Problem, block_q: int, block_kv: int):
  info = prob.info
  ki, head, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, lo_full, hi = km.q_block_range(info, ki, block_q, block_kv)

  @pl.when(jnp.logical_and(head == 0, qi == 0))
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  def body(masked: bool):
    mask = None
    if masked:
      mask = tile_mask(info, q_seg_ref, kv_seg_ref, qi * block_q,
                       ki * block_kv, block_q, block_kv)
    q = q_ref[...]
    do = do_ref[...]
    p = km.probabilities(km.logits(q, k_ref[...], prob.scale_log2, mask),
                         lse_ref[...])
    dv_scr[...] += km.dot_tn(p.astype(do.dtype), do)
    ds = km.score_grad(p, do, v_ref[...], delta_ref[...])
    dk_scr[...] += km.dot_tn(ds.astype(q.dtype), q)

  free, masked = split_ranges(info, lo, lo_full, hi, masked_first=True)
  when_visible(qi, free, masked, body)

  @pl.when(jnp.logical_and(head == pl.num_programs(3) - 1,
                           qi == pl.num_programs(4) - 1))
  def _store():
    dk_ref[...] = (dk_scr[...] * prob.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               kv_seg_ref, dq_ref, dq_scr, *, prob: km.Problem, block_q: int,
               block_kv: int):
  info = prob.info
  qi, ki = pl.program_id(2), pl.program_id(3)
  n_full, n_any = km.kv_block_range(info, qi, block_q, block_kv)

  @pl.when(ki == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  def body(masked: bool):
    mask = None
    if masked:
      mask = tile_mask(info, q_seg_ref, kv_seg_ref, qi * block_q,
                       ki * block_kv, block_q, block_kv)
    k = k_ref[...]
    p = km.probabilities(km.logits(q_ref[...], k, prob.scale_log2, mask),
                         lse_ref[...])
    ds = km.score_grad(p, do_ref[...], v_ref[...], delta_ref[...])
    dq_scr[...] += km.dot_nn(ds.astype(k.dtype), k)

  free, masked = split_ranges(info, 0, n_full, n_any, masked_first=False)
  when_visible(ki, free, masked, body)

  @pl.when(ki == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = (dq_scr[...] * prob.sm_scale).astype(dq_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, q_seg: jax.Array | None,
             kv_seg: jax.Array | None, *, prob: km.Problem,
             block_q_dkv: int, block_kv_dkv: int, block_q_dq: int,
             block_kv_dq: int,
             interpret) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TPU backward; same contract as backward.backward (minus Triton knobs)."""
  dp, group, info = prob.head_dim, prob.group, prob.info
  lanes = (prob.batch, prob.heads, prob.q_len_padded, LANES)
  lse_t = lax.broadcast_in_dim(lse, lanes, (0, 1, 2))
  delta_t = lax.broadcast_in_dim(delta, lanes, (0, 1, 2))
  q_seg_t, kv_seg_t = tpu_segment_layout(q_seg, kv_seg)
  sequential_2 = ("parallel", "parallel", "parallel", "arbitrary")

  # dK/dV. Grid (b, kv_head, kv_block, group_head, q_block).
  bq, bk = block_q_dkv, block_kv_dkv

  def q_index(ki, qi):
    lo, _, hi = km.q_block_range(info, ki, bq, bk)
    return clamp_index(qi, lo, hi)

  q_spec = pl.BlockSpec(
      (None, bq, dp), lambda b, h, i, g, j: (b, q_index(i, j), h * group + g))
  row_spec = pl.BlockSpec(
      (None, None, bq, LANES),
      lambda b, h, i, g, j: (b, h * group + g, q_index(i, j), 0))
  kv_spec = pl.BlockSpec((None, bk, dp), lambda b, h, i, g, j: (b, i, h))
  seg_specs = [None, None]
  if info.segments:
    seg_specs = [
        pl.BlockSpec((None, bq, LANES),
                     lambda b, h, i, g, j: (b, q_index(i, j), 0)),
        pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, g, j: (b, 0, i))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, prob=prob, block_q=bq, block_kv=bk),
      grid=(prob.batch, prob.kv_heads, prob.kv_len_padded // bk, group,
            prob.q_len_padded // bq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *seg_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32),
                      pltpu.VMEM((bk, dp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=sequential_2[:3] + ("arbitrary", "arbitrary")),
      interpret=interpret,
      name="flash_attention_bwd_dkv_tpu",
  )(q, k, v, do, lse_t, delta_t, q_seg_t, kv_seg_t)

  # dQ. Grid (b, head, q_block, kv_block).
  bq, bk = block_q_dq, block_kv_dq

  def kv_index(qi, ki):
    _, n_any = km.kv_block_range(info, qi, bq, bk)
    return clamp_index(ki, 0, n_any)

  q_spec = pl.BlockSpec((None, bq, dp), lambda b, h, i, j: (b, i, h))
  row_spec = pl.BlockSpec((None, None, bq, LANES),
                          lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec(
      (None, bk, dp), lambda b, h, i, j: (b, kv_index(i, j), lax.div(h, group)))
  seg_specs = [None, None]
  if info.segments:
    seg_specs = [
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk),
                     lambda b, h, i, j: (b, 0, kv_index(i, j)))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, prob=prob, block_q=bq, block_kv=bk),
      grid=(prob.batch, prob.heads, prob.q_len_padded // bq,
            prob.kv_len_padded // bk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *seg_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=sequential_2),
      interpret=interpret,
      name="flash_attention_bwd_dq_tpu",
  )(q, k, v, do, lse_t, delta_t, q_seg_t, kv_seg_t)
  return dq, dk, dv

"""Forward flash-attention kernel, TPU variant (Mosaic).

Same maths as forward.py (kernel_math), tiled the TPU way: the kv blocks are
the last, sequential ("arbitrary") grid axis, Pallas double-buffers their DMA
into VMEM, and the online-softmax state lives in VMEM scratch between grid
steps. Every block's last two dims are multiples of (8, 128) and every dot is
2-D, as Mosaic requires. Row statistics and segment ids are lane-replicated
to 128 so no [rows, 1] vector is ever stored.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.flash_attention import kernel_math as km
from pallas_kernels.tiling import LANES
from pallas_kernels.tiling import sublanes

# Rows of the kv segment-id tile: one native tile of int32.
SUBLANES = sublanes(jnp.int32)


def tpu_segment_layout(q_seg: jax.Array | None, kv_seg: jax.Array | None):
  """Segment ids as lane-dense tiles: q [b, S, 128], kv [b, 8, S]."""
  if q_seg is None:
    return None, None
  batch, q_len = q_seg.shape
  kv_len = kv_seg.shape[1]
  q_tiles = lax.broadcast_in_dim(q_seg, (batch, q_len, LANES), (0, 1))
  kv_tiles = lax.broadcast_in_dim(kv_seg, (batch, SUBLANES, kv_len), (0, 2))
  return q_tiles, kv_tiles


def tile_mask(info: km.MaskInfo, q_seg_ref, kv_seg_ref, q0, k0,
              block_q: int, block_kv: int):
  """block_mask with segment ids read from the lane-dense tiles."""
  q_seg = kv_seg = None
  if info.segments:
    q_seg = km.expand_cols(q_seg_ref[...], block_kv)
    kv_seg = kv_seg_ref[:1, :]
  return km.block_mask(info, q0, k0, (block_q, block_kv), q_seg, kv_seg)


def when_visible(index, free, masked, body):
  """Runs body(False) on steps in `free`, body(True) on steps in `masked`.

  Args:
    index: the grid index along the streamed axis.
    free: (lo, hi) range of steps whose tile needs no mask, or None.
    masked: (lo, hi) range of steps whose tile needs the mask, or None.
    body: the tile computation, called with the static `masked` flag.
  """
  for rng, masked_flag in ((free, False), (masked, True)):
    if rng is not None:
      pl.when(jnp.logical_and(index >= rng[0], index < rng[1]))(
          functools.partial(body, masked_flag))


def split_ranges(info: km.MaskInfo, lo, split, hi, masked_first: bool):
  """(free, masked) step ranges around `split` for `when_visible`."""
  if not info.needs_mask:
    return (lo, hi), None
  if info.segments:
    return None, (lo, hi)
  if masked_first:
    return (split, hi), (lo, split)
  return (lo, split), (split, hi)


def clamp_index(index, lo, hi):
  """Keeps a skipped step on a block already fetched, so no DMA is wasted."""
  return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, 0))


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, prob: km.Problem, block_q: int,
                block_kv: int):
  info = prob.info
  qi, ki = pl.program_id(2), pl.program_id(3)
  n_full, n_any = km.kv_block_range(info, qi, block_q, block_kv)

  @pl.when(ki == 0)
  def _init():
    m, l, acc = km.init_stats(block_q, LANES, prob.head_dim)
    m_scr[...] = m
    l_scr[...] = l
    acc_scr[...] = acc

  def body(masked: bool):
    mask = None
    if masked:
      mask = tile_mask(info, q_seg_ref, kv_seg_ref, qi * block_q,
                       ki * block_kv, block_q, block_kv)
    s = km.logits(q_ref[...], k_ref[...], prob.scale_log2, mask)
    m, l, acc = km.softmax_step((m_scr[...], l_scr[...], acc_scr[...]), s,
                                v_ref[...])
    m_scr[...] = m
    l_scr[...] = l
    acc_scr[...] = acc

  free, masked = split_ranges(info, 0, n_full, n_any, masked_first=False)
  when_visible(ki, free, masked, body)

  @pl.when(ki == pl.num_programs(3) - 1)
  def _store():
    out, lse = km.finalize((m_scr[...], l_scr[...], acc_scr[...]))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(q: jax.Array, k: jax.Array, v: jax.Array,
            q_seg: jax.Array | None, kv_seg: jax.Array | None, *,
            prob: km.Problem, block_q: int, block_kv: int,
            interpret) -> tuple[jax.Array, jax.Array]:
  """TPU forward; same contract as forward.forward (minus Triton knobs)."""
  dp, group = prob.head_dim, prob.group
  n_q = prob.q_len_padded // block_q
  n_kv = prob.kv_len_padded // block_kv
  info = prob.info

  def kv_index(qi, ki):
    _, n_any = km.kv_block_range(info, qi, block_q, block_kv)
    return clamp_index(ki, 0, n_any)

  q_spec = pl.BlockSpec((None, block_q, dp), lambda b, h, i, j: (b, i, h))
  kv_spec = pl.BlockSpec(
      (None, block_kv, dp),
      lambda b, h, i, j: (b, kv_index(i, j), lax.div(h, group)))
  q_seg_t, kv_seg_t = tpu_segment_layout(q_seg, kv_seg)
  seg_specs = [None, None]
  if info.segments:
    seg_specs = [
        pl.BlockSpec((None, block_q, LANES), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, block_kv),
                     lambda b, h, i, j: (b, 0, kv_index(i, j)))]
  lse_spec = pl.BlockSpec((None, None, block_q, LANES),
                          lambda b, h, i, j: (b, h, i, 0))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, prob=prob, block_q=block_q,
                        block_kv=block_kv),
      grid=(prob.batch, prob.heads, n_q, n_kv),
      in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
      out_specs=[q_spec, lse_spec],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct(
              (prob.batch, prob.heads, prob.q_len_padded, LANES),
              jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, dp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      interpret=interpret,
      name="flash_attention_fwd_tpu",
  )(q, k, v, q_seg_t, kv_seg_t)
  return out, lse[..., 0]

"""Backward flash-attention kernels, GPU variant (Triton; also the interpreter).

FlashAttention-2 backward as two kernels that recompute the probabilities
from the saved log-sum-exp instead of storing them:
  * dK/dV: one program per (kv block, batch, kv head) walks every query block
    of every query head in its GQA group, so a kv head's gradient is summed in
    registers with no atomics and no per-query-head copy of dK/dV;
  * dQ: one program per (query block, batch, head) walks the key blocks.
delta = rowsum(dO * O) is computed by XLA before the kernels (one fused pass).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels.flash_attention import kernel_math as km
from pallas_kernels.flash_attention.forward import block_order
from pallas_kernels.flash_attention.forward import fold_kv_blocks
from pallas_kernels.flash_attention.forward import gpu_compiler_params


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                kv_seg_ref, dk_ref, dv_ref, *, prob: km.Problem, block_q: int,
                block_kv: int):
  info, dp = prob.info, prob.head_dim
  ki = pl.program_id(0)
  k0 = ki * block_kv
  k = k_ref[...]
  v = v_ref[...]
  kv_seg = kv_seg_ref[...][None, :] if info.segments else None
  lo, lo_full, hi = km.q_block_range(info, ki, block_q, block_kv)

  def make_step(head, masked: bool):
    # A static head (group == 1) must stay a Python int: Triton cannot
    # attach the multiple_of hint to a constant.
    col0 = head * dp if isinstance(head, int) else pl.multiple_of(head * dp, dp)
    cols = pl.ds(col0, dp)

    def step(qi, grads):
      dk, dv = grads
      q0 = pl.multiple_of(qi * block_q, block_q)
      rows = pl.ds(q0, block_q)
      q = q_ref[rows, cols]
      do = do_ref[rows, cols]
      lse = lse_ref[head, rows][:, None]
      delta = delta_ref[head, rows][:, None]
      mask = None
      if masked:
        q_seg = q_seg_ref[rows][:, None] if info.segments else None
        mask = km.block_mask(info, q0, k0, (block_q, block_kv), q_seg, kv_seg)
      p = km.probabilities(km.logits(q, k, prob.scale_log2, mask), lse)
      dv = dv + km.dot_tn(p.astype(do.dtype), do)
      ds = km.score_grad(p, do, v, delta)
      dk = dk + km.dot_tn(ds.astype(q.dtype), q)
      return dk, dv
    return step

  def head_body(head, grads):
    if info.needs_mask:
      grads = lax.fori_loop(lo, lo_full, make_step(head, True), grads)
    if not info.segments:
      grads = lax.fori_loop(lo_full, hi, make_step(head, False), grads)
    return grads

  zeros = jnp.zeros((block_kv, dp), jnp.float32)
  if prob.group == 1:
    dk, dv = head_body(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, prob.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * prob.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               kv_seg_ref, dq_ref, *, prob: km.Problem, block_q: int,
               block_kv: int, order):
  info = prob.info
  qi = order(pl.program_id(0))
  q0 = qi * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_seg = q_seg_ref[...][:, None] if info.segments else None
  kv_range = km.kv_block_range(info, qi, block_q, block_kv)

  def accumulate(dq, k, v, mask):
    p = km.probabilities(km.logits(q, k, prob.scale_log2, mask), lse)
    ds = km.score_grad(p, do, v, delta)
    return dq + km.dot_nn(ds.astype(k.dtype), k)

  zeros = jnp.zeros((block_q, prob.head_dim), jnp.float32)
  dq = fold_kv_blocks(accumulate, zeros, k_ref, v_ref, kv_seg_ref, info=info,
                      q0=q0, q_seg=q_seg, kv_range=kv_range, block_q=block_q,
                      block_kv=block_kv)
  dq_ref[...] = (dq * prob.sm_scale).astype(dq_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, q_seg: jax.Array | None,
             kv_seg: jax.Array | None, *, prob: km.Problem,
             block_q_dkv: int, block_kv_dkv: int, block_q_dq: int,
             block_kv_dq: int, num_warps: int | None,
             num_stages: int | None,
             interpret) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dq, dk, dv of padded, head-flattened arrays (layouts as in forward).

  Args:
    q: [batch, q_len_padded, heads * head_dim].
    k: [batch, kv_len_padded, kv_heads * head_dim].
    v: like k.
    do: cotangent of the output, like q (zero on padded rows).
    lse: base-2 lse f32 [batch, heads, q_len_padded] from the forward.
    delta: rowsum(dO * O) f32 [batch, heads, q_len_padded].
    q_seg: int32 [batch, q_len_padded] or None.
    kv_seg: int32 [batch, kv_len_padded] or None.
    prob: static shapes and masking.
    block_q_dkv: query rows per inner step of the dK/dV kernel.
    block_kv_dkv: key rows per dK/dV program.
    block_q_dq: query rows per dQ program.
    block_kv_dq: key rows per inner step of the dQ kernel.
    num_warps: Triton warps (None: by head dim).
    num_stages: Triton pipelining depth (None: 2).
    interpret: passed to pallas_call.

  Returns:
    (dq, dk, dv) shaped and typed like (q, k, v).
  """
  dp, group, segments = prob.head_dim, prob.group, prob.info.segments
  params = gpu_compiler_params(num_warps, num_stages, dp)

  # dK/dV: grid over kv blocks; the q-side blocks span a whole GQA group.
  q_group = pl.BlockSpec((None, prob.q_len_padded, group * dp),
                         lambda i, b, h: (b, 0, h))
  kv_blk = pl.BlockSpec((None, block_kv_dkv, dp), lambda i, b, h: (b, i, h))
  row_group = pl.BlockSpec((None, group, prob.q_len_padded),
                           lambda i, b, h: (b, h, 0))
  seg_specs = [None, None]
  if segments:
    seg_specs = [
        pl.BlockSpec((None, prob.q_len_padded), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, block_kv_dkv), lambda i, b, h: (b, i))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, prob=prob, block_q=block_q_dkv,
                        block_kv=block_kv_dkv),
      grid=(prob.kv_len_padded // block_kv_dkv, prob.batch, prob.kv_heads),
      in_specs=[q_group, kv_blk, kv_blk, q_group, row_group, row_group,
                *seg_specs],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, do, lse, delta, q_seg, kv_seg)

  # dQ: grid over query blocks; keys of the matching kv head stream through.
  n_q = prob.q_len_padded // block_q_dq
  order = block_order(n_q, prob.info.causal)
  q_blk = pl.BlockSpec((None, block_q_dq, dp), lambda i, b, h: (b, order(i), h))
  kv_all = pl.BlockSpec((None, prob.kv_len_padded, dp),
                        lambda i, b, h: (b, 0, lax.div(h, group)))
  row_blk = pl.BlockSpec((None, None, block_q_dq),
                         lambda i, b, h: (b, h, order(i)))
  seg_specs = [None, None]
  if segments:
    seg_specs = [
        pl.BlockSpec((None, block_q_dq), lambda i, b, h: (b, order(i))),
        pl.BlockSpec((None, prob.kv_len_padded), lambda i, b, h: (b, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, prob=prob, block_q=block_q_dq,
                        block_kv=block_kv_dq, order=order),
      grid=(n_q, prob.batch, prob.heads),
      in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk, *seg_specs],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, do, lse, delta, q_seg, kv_seg)
  return dq, dk, dv

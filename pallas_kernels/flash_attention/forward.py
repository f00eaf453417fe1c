"""Forward flash-attention kernel, GPU variant (Triton, also the interpreter).

One program owns one (query block, batch, head) and streams the whole key
sequence of its kv head through an online softmax (FlashAttention-2, Alg. 1):
the [q_len, kv_len] score matrix never exists. Arrays arrive as
[batch, seq, heads * head_dim] so a head is a column block and no transpose
is needed around the kernel.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels.flash_attention import kernel_math as km
from pallas_kernels.platform import plgpu


def gpu_compiler_params(num_warps: int | None, num_stages: int | None,
                        head_dim: int):
  """Triton launch parameters, or None where the Triton module is missing."""
  if plgpu is None:
    return None
  if num_warps is None:
    # Wider tiles need more warps to keep the [block, head_dim] accumulator
    # in registers without spilling.
    num_warps = 4 if head_dim <= 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps,
                              num_stages=num_stages or 2)


def block_order(num_blocks: int, reverse: bool):
  """Grid index -> query block; causal grids start with the longest rows."""
  if not reverse:
    return lambda i: i
  return lambda i: num_blocks - 1 - i


def fold_kv_blocks(step, carry, k_ref, v_ref, kv_seg_ref, *,
                   info: km.MaskInfo, q0, q_seg, kv_range, block_q: int,
                   block_kv: int):
  """Folds step(carry, k, v, mask) over the key blocks one query block sees.

  Shared by the forward and the dQ kernel, which stream the keys the same way.

  Args:
    step: (carry, k [block_kv, D], v [block_kv, D], mask) -> carry; mask is
      None for a wholly visible block.
    carry: the initial accumulator.
    k_ref: keys of the query block's kv head, [kv_len_padded, D].
    v_ref: values, like k_ref.
    kv_seg_ref: key segment ids [kv_len_padded] (read only with segments).
    info: the masking problem.
    q0: first query row of the block.
    q_seg: query segment ids [block_q, 1], or None.
    kv_range: (n_full, n_any) from km.kv_block_range.
    block_q: query rows per block.
    block_kv: key rows per step.

  Returns:
    The final carry.
  """
  n_full, n_any = kv_range

  def make_step(masked: bool):
    def body(j, carry):
      start = pl.multiple_of(j * block_kv, block_kv)
      k = k_ref[pl.ds(start, block_kv), :]
      v = v_ref[pl.ds(start, block_kv), :]
      mask = None
      if masked:
        kv_seg = (kv_seg_ref[pl.ds(start, block_kv)][None, :]
                  if info.segments else None)
        mask = km.block_mask(info, q0, start, (block_q, block_kv), q_seg,
                             kv_seg)
      return step(carry, k, v, mask)
    return body

  # Blocks wholly visible skip the iota/compare/select of the mask; with
  # segment ids every block needs it.
  if not info.segments:
    end = n_full if info.needs_mask else n_any
    carry = lax.fori_loop(0, end, make_step(False), carry)
  if info.needs_mask:
    carry = lax.fori_loop(n_full, n_any, make_step(True), carry)
  return carry


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                prob: km.Problem, block_q: int, block_kv: int, order):
  info = prob.info
  qi = order(pl.program_id(0))
  q0 = qi * block_q
  q = q_ref[...]
  q_seg = q_seg_ref[...][:, None] if info.segments else None
  kv_range = km.kv_block_range(info, qi, block_q, block_kv)

  def attend(stats, k, v, mask):
    return km.softmax_step(stats, km.logits(q, k, prob.scale_log2, mask), v)

  stats = km.init_stats(block_q, 1, prob.head_dim)
  stats = fold_kv_blocks(attend, stats, k_ref, v_ref, kv_seg_ref, info=info,
                         q0=q0, q_seg=q_seg, kv_range=kv_range,
                         block_q=block_q, block_kv=block_kv)
  out, lse = km.finalize(stats)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(block_q)


def forward(q: jax.Array, k: jax.Array, v: jax.Array,
            q_seg: jax.Array | None, kv_seg: jax.Array | None, *,
            prob: km.Problem, block_q: int, block_kv: int,
            num_warps: int | None, num_stages: int | None,
            interpret) -> tuple[jax.Array, jax.Array]:
  """Runs the forward kernel on padded, head-flattened arrays.

  Args:
    q: [batch, q_len_padded, heads * head_dim].
    k: [batch, kv_len_padded, kv_heads * head_dim].
    v: like k.
    q_seg: int32 [batch, q_len_padded] or None.
    kv_seg: int32 [batch, kv_len_padded] or None.
    prob: static shapes and masking.
    block_q: query rows per program.
    block_kv: key rows per inner step.
    num_warps: Triton warps (None: by head dim).
    num_stages: Triton pipelining depth (None: 2).
    interpret: passed to pallas_call.

  Returns:
    out like q, and the base-2 lse f32 [batch, heads, q_len_padded].
  """
  dp, group = prob.head_dim, prob.group
  n_q = prob.q_len_padded // block_q
  order = block_order(n_q, prob.info.causal)
  kernel = functools.partial(_fwd_kernel, prob=prob, block_q=block_q,
                             block_kv=block_kv, order=order)
  q_spec = pl.BlockSpec((None, block_q, dp), lambda i, b, h: (b, order(i), h))
  kv_spec = pl.BlockSpec((None, prob.kv_len_padded, dp),
                         lambda i, b, h: (b, 0, lax.div(h, group)))
  seg_specs = [None, None]
  if prob.info.segments:
    seg_specs = [pl.BlockSpec((None, block_q), lambda i, b, h: (b, order(i))),
                 pl.BlockSpec((None, prob.kv_len_padded),
                              lambda i, b, h: (b, 0))]
  lse_spec = pl.BlockSpec((None, None, block_q),
                          lambda i, b, h: (b, h, order(i)))
  out_shape = [
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((prob.batch, prob.heads, prob.q_len_padded),
                           jnp.float32),
  ]
  out, lse = pl.pallas_call(
      kernel,
      grid=(n_q, prob.batch, prob.heads),
      in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
      out_specs=[q_spec, lse_spec],
      out_shape=out_shape,
      compiler_params=gpu_compiler_params(num_warps, num_stages, dp),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, q_seg, kv_seg)
  return out, lse

"""Public entry point: validation, padding, kernel choice and the custom VJP.

Everything that can be wrong with the arguments is checked here in Python,
on shapes and dtypes only, so a bad call fails with a ValueError that names
the argument before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform as platform_lib
from pallas_kernels import tiling
from pallas_kernels.flash_attention import backward as gpu_backward
from pallas_kernels.flash_attention import forward as gpu_forward
from pallas_kernels.flash_attention import kernel_math as km
from pallas_kernels.flash_attention import tpu_backward
from pallas_kernels.flash_attention import tpu_forward
from pallas_kernels.flash_attention.block_sizes import FlashBlockSizes
from pallas_kernels.flash_attention.validation import validate_inputs

SegmentIds = jax.Array | tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) settings of one call; the custom_vjp's nondiff arg."""
  causal: bool
  sm_scale: float
  platform: str  # kernel variant: 'gpu' (Triton, CPU interpreter) or 'tpu'
  interpret: Any
  blocks: FlashBlockSizes


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    causal: bool = True,
                    segment_ids: SegmentIds | None = None,
                    sm_scale: float | None = None,
                    block_sizes: FlashBlockSizes | None = None,
                    interpret: Any = None,
                    platform: str | None = None) -> jax.Array:
  """Memory-efficient exact attention as Pallas kernels, differentiable.

  A pallas_call has no SPMD partitioning rule, so under a sharded jit call
  this inside shard_map with batch and heads local to each device (XLA
  would otherwise gather the operands onto every device).

  Args:
    q: [batch, q_len, heads, head_dim], float32/bfloat16/float16.
    k: [batch, kv_len, kv_heads, head_dim], q's dtype; heads must be a
      multiple of kv_heads (GQA/MQA: query head h uses kv head
      h // (heads // kv_heads)).
    v: like k.
    causal: causal mask, aligned bottom-right when q_len != kv_len (query i
      sees key j iff j <= i + kv_len - q_len).
    segment_ids: optional int [batch, seq] for packed sequences (needs
      q_len == kv_len): a query attends only to keys with the same id. A
      pair (q_ids [batch, q_len], kv_ids [batch, kv_len]) is also accepted.
      Not differentiated.
    sm_scale: logit scale, default 1/sqrt(head_dim); a Python number.
    block_sizes: tile sizes; None picks FlashBlockSizes.get_default(platform).
    interpret: None interprets on CPU and compiles elsewhere; True/False
      force it; a pallas TPU InterpretParams selects the TPU interpreter.
    platform: kernel variant, 'gpu' (Triton, also used by the CPU
      interpreter) or 'tpu' (Mosaic); None picks by q's device when q is
      concrete and by the platform lowered for under jit ('tpu' on TPU,
      else 'gpu').

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. Query rows that see no key
    (possible with segment pairs or q_len > kv_len) are zero.

  Raises:
    ValueError: on any malformed argument, naming it and the fix.
  """
  q_seg, kv_seg = validate_inputs(q, k, v, causal=causal,
                                  segment_ids=segment_ids, sm_scale=sm_scale,
                                  block_sizes=block_sizes)
  platform_lib.check(interpret, platform)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  variant = functools.partial(_variant, causal=bool(causal),
                              sm_scale=float(sm_scale),
                              block_sizes=block_sizes)
  return platform_lib.dispatch(
      variant, (q, k, v, q_seg, kv_seg), interpret=interpret,
      platform=platform, anchors=(q,),
      refused=_refused(block_sizes, platform))


def _refused(block_sizes: FlashBlockSizes | None,
             platform: str | None) -> dict[str, str]:
  """Variant -> why the caller's block sizes cannot lower for it.

  Explicit sizes often suit one variant only (64 is a Triton tile, not a
  Mosaic one); the call goes ahead and only lowering for the other variant's
  platform raises.
  """
  if block_sizes is None:
    return {}
  refused = {}
  for p in (platform,) if platform else platform_lib.PLATFORMS:
    try:
      block_sizes.check_for_platform(p)
    except ValueError as e:
      refused[p] = str(e)
  return refused


def _variant(q, k, v, q_seg, kv_seg, *, interpret, platform, causal,
             sm_scale, block_sizes):
  """One kernel variant, complete with its own block sizes and VJP."""
  if block_sizes is None:
    block_sizes = FlashBlockSizes.get_default(platform)
  block_sizes.check_for_platform(platform)
  cfg = _Config(causal=causal, sm_scale=sm_scale, platform=platform,
                interpret=interpret, blocks=block_sizes)
  return _flash_jit(q, k, v, q_seg, kv_seg, cfg)


def _plan(q_shape, k_shape, segments: bool, cfg: _Config):
  """Effective block sizes and padded shapes for one call."""
  batch, q_len, heads, head_dim = q_shape
  kv_len, kv_heads = k_shape[1], k_shape[2]
  if cfg.platform == "tpu":
    # Mosaic tiles are lane-dense: head_dim and kv blocks in whole 128s.
    fit = lambda blk, n: min(blk, tiling.round_up(n, tiling.LANES))
    dp = tiling.round_up(head_dim, tiling.LANES)
  else:
    # Triton shapes are powers of two >= 16; the clamp keeps a short
    # sequence from being padded up to a large default block.
    min_tile = tiling.TRITON_MIN_TILE
    fit = lambda blk, n: min(blk, max(min_tile, tiling.next_pow2(n)))
    dp = max(min_tile, tiling.next_pow2(head_dim))
  b = cfg.blocks
  qb = [fit(x, q_len) for x in b.q_blocks]
  kb = [fit(x, kv_len) for x in b.kv_blocks]
  blocks = dict(block_q=qb[0], block_kv=kb[0], block_q_dkv=qb[1],
                block_kv_dkv=kb[1], block_q_dq=qb[2], block_kv_dq=kb[2])
  q_len_p = tiling.round_up(q_len, math.lcm(*qb))
  kv_len_p = tiling.round_up(kv_len, math.lcm(*kb))
  info = km.MaskInfo(causal=cfg.causal, q_len=q_len, kv_len=kv_len,
                     kv_padded=kv_len_p > kv_len, segments=segments)
  prob = km.Problem(info=info, batch=batch, heads=heads, kv_heads=kv_heads,
                    head_dim=dp, q_len_padded=q_len_p, kv_len_padded=kv_len_p,
                    sm_scale=cfg.sm_scale)
  return prob, blocks


def _pad_flat(x: jax.Array, seq_p: int, dp: int) -> jax.Array:
  """[b, s, h, d] -> zero-padded [b, seq_p, h * dp] (heads as column blocks)."""
  b, s, h, d = x.shape
  if (s, d) != (seq_p, dp):
    x = jnp.pad(x, ((0, 0), (0, seq_p - s), (0, 0), (0, dp - d)))
  return x.reshape(b, seq_p, h * dp)


def _unflat(x: jax.Array, shape) -> jax.Array:
  """Inverse of _pad_flat: slice the padding off again."""
  b, s, h, d = shape
  x = x.reshape(b, x.shape[1], h, x.shape[2] // h)
  return x[:, :s, :, :d]


def _pad_seg(seg: jax.Array | None, seq_p: int) -> jax.Array | None:
  if seg is None or seg.shape[1] == seq_p:
    return seg
  # The pad value is irrelevant: padded keys are masked by position, and
  # padded query rows are sliced off (and get zero cotangent).
  return jnp.pad(seg, ((0, 0), (0, seq_p - seg.shape[1])))


def _forward(q, k, v, q_seg, kv_seg, cfg: _Config):
  prob, blocks = _plan(q.shape, k.shape, q_seg is not None, cfg)
  args = (_pad_flat(q, prob.q_len_padded, prob.head_dim),
          _pad_flat(k, prob.kv_len_padded, prob.head_dim),
          _pad_flat(v, prob.kv_len_padded, prob.head_dim),
          _pad_seg(q_seg, prob.q_len_padded),
          _pad_seg(kv_seg, prob.kv_len_padded))
  if cfg.platform == "tpu":
    out, lse = tpu_forward.forward(
        *args, prob=prob, block_q=blocks["block_q"],
        block_kv=blocks["block_kv"], interpret=cfg.interpret)
  else:
    out, lse = gpu_forward.forward(
        *args, prob=prob, block_q=blocks["block_q"],
        block_kv=blocks["block_kv"], num_warps=cfg.blocks.num_warps,
        num_stages=cfg.blocks.num_stages, interpret=cfg.interpret)
  return _unflat(out, q.shape), lse


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg: _Config):
  prob, blocks = _plan(q.shape, k.shape, q_seg is not None, cfg)
  do = do.astype(q.dtype)
  # delta_i = sum_d dO_id O_id; padded rows get 0 (their dO is 0 too), so
  # they add nothing to dK/dV.
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32),
                     do.astype(jnp.float32))
  delta = jnp.pad(delta, ((0, 0), (0, 0),
                          (0, prob.q_len_padded - q.shape[1])))
  args = (_pad_flat(q, prob.q_len_padded, prob.head_dim),
          _pad_flat(k, prob.kv_len_padded, prob.head_dim),
          _pad_flat(v, prob.kv_len_padded, prob.head_dim),
          _pad_flat(do, prob.q_len_padded, prob.head_dim),
          lse, delta,
          _pad_seg(q_seg, prob.q_len_padded),
          _pad_seg(kv_seg, prob.kv_len_padded))
  bwd_blocks = {name: blocks[name] for name in
                ("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")}
  if cfg.platform == "tpu":
    dq, dk, dv = tpu_backward.backward(*args, prob=prob, **bwd_blocks,
                                       interpret=cfg.interpret)
  else:
    dq, dk, dv = gpu_backward.backward(
        *args, prob=prob, **bwd_blocks, num_warps=cfg.blocks.num_warps,
        num_stages=cfg.blocks.num_stages, interpret=cfg.interpret)
  return _unflat(dq, q.shape), _unflat(dk, k.shape), _unflat(dv, v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg: _Config):
  return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg: _Config):
  out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
  # Residuals are the unpadded inputs plus out and the (padded, small) lse;
  # the padded copies are rebuilt in the backward rather than kept alive.
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg)
  return dq, dk, dv, _int_cotangent(q_seg), _int_cotangent(kv_seg)


def _int_cotangent(seg):
  """Integer inputs take a float0 zero cotangent."""
  if seg is None:
    return None
  return np.zeros(seg.shape, dtype=jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_jit = jax.jit(_flash, static_argnums=(5,))

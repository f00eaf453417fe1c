"""Public decode-attention entry points (forward only: inference kernels)."""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import platform as platform_lib
from pallas_kernels.decode_attention import kernel_gpu
from pallas_kernels.decode_attention import kernel_tpu
from pallas_kernels.decode_attention import validation
from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes

_ATTEND = {"gpu": kernel_gpu.attend, "tpu": kernel_tpu.attend}


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "block_sizes", "interpret", "platform"))
def _decode(q, k_cache, v_cache, lengths, *, sm_scale, block_sizes, interpret,
            platform):
  batch, t, heads, d = q.shape
  kv_heads = k_cache.shape[2]
  group = heads // kv_heads
  # Rows of one kv head: (new token, head in group) -> t * group + g.
  rows = q.reshape(batch, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4)
  rows = rows.reshape(batch, kv_heads, t * group, d)
  # Lengths past the cache cannot be honoured; clamp rather than read OOB.
  kv_lens = jnp.clip(lengths.astype(jnp.int32), 0, k_cache.shape[1])
  out, lse = _ATTEND[platform](
      rows, k_cache, v_cache, kv_lens, num_new=t, group=group,
      sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  out = out.reshape(batch, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(batch, kv_heads, t, group).transpose(0, 2, 1, 3)
  return (out.reshape(batch, t, heads, d).astype(q.dtype),
          lse.reshape(batch, t, heads))


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     lengths: jax.Array, *, sm_scale: float | None = None,
                     block_sizes: DecodeBlockSizes | None = None,
                     interpret: Any = None,
                     platform: str | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Attention of a few new tokens per sequence over its KV cache.

  Forward only (inference); there is no VJP. Split over the key axis
  (flash-decoding) on GPU so long caches fill the device; key blocks past a
  sequence's length are neither read nor computed.

  Args:
    q: [batch, T, heads, head_dim] queries of the T newest tokens (T = 1 for
      plain decoding, a few for speculative drafts).
    k_cache: [batch, max_len, kv_heads, head_dim]; heads % kv_heads == 0
      (GQA/MQA: query head j uses kv head j // (heads // kv_heads)).
    v_cache: same shape as k_cache.
    lengths: int32 [batch] valid cache entries per sequence INCLUDING the T
      new tokens, which sit at positions lengths - T .. lengths - 1. Query t
      sees positions < lengths - T + t + 1; positions >= lengths are ignored
      whatever they hold. Length 0 gives out 0 and lse -inf. Values are
      clamped to [0, max_len].
    sm_scale: softmax scale; default 1 / sqrt(head_dim).
    block_sizes: tiling; default DecodeBlockSizes().
    interpret: None = interpreter on CPU, compiled on GPU (Triton) / TPU;
      True/False force it; a pallas InterpretParams picks that interpreter.
    platform: None = the variant for the operands' device, or under jit for
      the platform lowered for ('tpu' on TPU, else 'gpu'); 'gpu' or 'tpu'
      picks the Triton- or Mosaic-shaped variant (e.g. to test it in the
      interpreter).

  Returns:
    (out [batch, T, heads, head_dim] in q's dtype, lse f32 [batch, T, heads]:
    natural-log log-sum-exp of the scaled scores).

  Raises:
    ValueError: on bad shapes, dtypes or options, before anything compiles.
  """
  validation.check_decode(q, k_cache, v_cache, lengths)
  validation.check_common(sm_scale, block_sizes)
  platform_lib.check(interpret, platform)
  sm_scale = float(1.0 / math.sqrt(q.shape[-1]) if sm_scale is None
                   else sm_scale)
  variant = functools.partial(_decode, sm_scale=sm_scale,
                              block_sizes=block_sizes or DecodeBlockSizes())
  return platform_lib.dispatch(
      variant, (q, k_cache, v_cache, lengths), interpret=interpret,
      platform=platform, anchors=(q, k_cache))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "block_sizes", "interpret", "platform"))
def _prefix(q, prefix_k, prefix_v, prefix_length, *, sm_scale, block_sizes,
            interpret, platform):
  batch, t, heads, d = q.shape
  prefix_len, kv_heads, _ = prefix_k.shape
  group = heads // kv_heads
  # Stack every sequence's queries of a kv head into one matrix so the prefix
  # is read once per row block and the work is matrix-matrix.
  rows = q.reshape(batch, t, kv_heads, group, d).transpose(2, 0, 1, 3, 4)
  rows = rows.reshape(1, kv_heads, batch * t * group, d)
  kv_lens = jnp.clip(jnp.reshape(prefix_length, (1,)).astype(jnp.int32), 0,
                     prefix_len)
  out, lse = _ATTEND[platform](
      rows, prefix_k[None], prefix_v[None], kv_lens, num_new=1, group=group,
      sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  out = out.reshape(kv_heads, batch, t, group, d).transpose(1, 2, 0, 3, 4)
  lse = lse.reshape(kv_heads, batch, t, group).transpose(1, 2, 0, 3)
  return (out.reshape(batch, t, heads, d).astype(q.dtype),
          lse.reshape(batch, t, heads))


def shared_prefix_attention(q: jax.Array, prefix_k: jax.Array,
                            prefix_v: jax.Array, *,
                            prefix_length: jax.Array | int | None = None,
                            sm_scale: float | None = None,
                            block_sizes: DecodeBlockSizes | None = None,
                            interpret: Any = None,
                            platform: str | None = None
                            ) -> tuple[jax.Array, jax.Array]:
  """Hydragen prefix part: every query of the batch over one shared prefix.

  Forward only (inference). No mask: each query sees the whole prefix.
  Queries of all sequences that share a kv head are stacked into one
  [batch * T * heads_per_kv_head, head_dim] matrix, so the prefix KV is read
  once per kv head and row block and the work is matrix-matrix instead of a
  matrix-vector product per sequence. Merge with the per-sequence suffix
  part through `combine_attention`.

  Args:
    q: [batch, T, heads, head_dim].
    prefix_k: [prefix_len, kv_heads, head_dim], shared by the batch.
    prefix_v: same shape as prefix_k.
    prefix_length: int32 scalar (traced or not): only the first
      prefix_length entries are the prefix, the rest is ignored whatever it
      holds (a prefix read from fixed-size cache pages); default prefix_len.
      Clamped to [0, prefix_len]; 0 gives out 0 and lse -inf.
    sm_scale: softmax scale; default 1 / sqrt(head_dim).
    block_sizes: tiling (block_rows sets the stacked rows per program).
    interpret: None = interpreter on CPU, compiled on GPU / TPU.
    platform: None, 'gpu' or 'tpu' (see decode_attention).

  Returns:
    (out [batch, T, heads, head_dim] in q's dtype, lse f32 [batch, T, heads]).
    An empty prefix gives out 0 and lse -inf.

  Raises:
    ValueError: on bad shapes, dtypes or options, before anything compiles.
  """
  validation.check_prefix(q, prefix_k, prefix_v, prefix_length)
  validation.check_common(sm_scale, block_sizes)
  platform_lib.check(interpret, platform)
  if prefix_k.shape[0] == 0:
    return (jnp.zeros_like(q),
            jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
  sm_scale = float(1.0 / math.sqrt(q.shape[-1]) if sm_scale is None
                   else sm_scale)
  variant = functools.partial(_prefix, sm_scale=sm_scale,
                              block_sizes=block_sizes or DecodeBlockSizes())
  if prefix_length is None:
    prefix_length = prefix_k.shape[0]
  prefix_length = jnp.asarray(prefix_length, jnp.int32)
  return platform_lib.dispatch(
      variant, (q, prefix_k, prefix_v, prefix_length), interpret=interpret,
      platform=platform, anchors=(q, prefix_k))

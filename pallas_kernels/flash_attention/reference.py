"""Plain-jnp attention: the ground truth the Pallas kernels are tested against.

It materialises the full [q_len, kv_len] score matrix, so it is only for
tests, small shapes and the XLA baseline of the benchmark.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so a fully masked row softmaxes to a uniform row (later zeroed)
# instead of NaN, and its gradient stays finite too.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

SegmentIds = jax.Array | tuple[jax.Array, jax.Array]


def attention_mask(q_len: int, kv_len: int, *, causal: bool,
                   segment_ids: SegmentIds | None) -> jax.Array | None:
  """Boolean [batch or 1, q_len, kv_len] mask, True where a query may attend.

  Causal masking is aligned bottom-right: query i sees key j iff
  j <= i + (kv_len - q_len), which is the usual rule when q_len == kv_len and
  the chunked-prefill rule when the queries are the last q_len positions.

  Args:
    q_len: number of queries.
    kv_len: number of keys.
    causal: apply the causal rule.
    segment_ids: int [batch, seq] shared by queries and keys (needs
      q_len == kv_len), or a pair (q_ids [batch, q_len], kv_ids
      [batch, kv_len]); a query sees only keys with an equal id.

  Returns:
    The mask, or None when nothing is masked.
  """
  mask = None
  if causal:
    rows = jnp.arange(q_len)[:, None]
    cols = jnp.arange(kv_len)[None, :]
    mask = (cols <= rows + (kv_len - q_len))[None]
  if segment_ids is not None:
    q_ids, kv_ids = (segment_ids if isinstance(segment_ids, tuple)
                     else (segment_ids, segment_ids))
    seg = q_ids[:, :, None] == kv_ids[:, None, :]
    mask = seg if mask is None else jnp.logical_and(mask, seg)
  return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        causal: bool = True,
                        segment_ids: SegmentIds | None = None,
                        sm_scale: float | None = None) -> jax.Array:
  """softmax(q k^T * sm_scale + mask) v with an f32 softmax.

  Args:
    q: [batch, q_len, heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0 (GQA/MQA:
      query head h uses kv head h // (heads // kv_heads)).
    v: [batch, kv_len, kv_heads, head_dim].
    causal: bottom-right aligned causal mask (see `attention_mask`).
    segment_ids: see `attention_mask`.
    sm_scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; rows that may attend to
    no key are exactly zero.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  # Query head h = kv_head * group + g, matching the kernels' GQA mapping.
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                      preferred_element_type=jnp.float32) * sm_scale
  mask = attention_mask(q_len, kv_len, causal=causal, segment_ids=segment_ids)
  if mask is not None:
    mask = mask[:, None, None]  # [batch, 1, 1, q_len, kv_len]
    logits = jnp.where(mask, logits, _MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
  return out.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)

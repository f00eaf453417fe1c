"""Pure-jnp references for the decode kernels: mask spelled out, f32 softmax.

Scores are accumulated in f32 and the softmax is f32. The weights are cast to
the value dtype for the p @ v product (as the kernels do), so the reference
stays lean enough to serve as the XLA baseline at serving sizes; feed it f32
inputs for a gold-standard answer. GQA is an einsum over a [kv_heads, group]
split of the query heads, never a repeat of the cache.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _softmax_with_lse(scores: jax.Array, mask: jax.Array):
  """Masked softmax weights and lse over the last axis.

  Rows with no visible key give weights 0 and lse -inf.
  """
  scores = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(scores - m), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  weights = e / jnp.where(total > 0, total, 1.0)
  lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)),
                  -jnp.inf)
  return weights, lse[..., 0]


def decode_attention_reference(q: jax.Array, k_cache: jax.Array,
                               v_cache: jax.Array, lengths: jax.Array, *,
                               sm_scale: float | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """Reference for `decode_attention` (same arguments and results).

  Query t of sequence b sees cache position p iff
  p < lengths[b] - T + t + 1 (so never p >= lengths[b]).
  """
  batch, t, heads, d = q.shape
  max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = heads // kv_heads
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  qg = q.reshape(batch, t, kv_heads, group, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache,
                      preferred_element_type=jnp.float32) * sm_scale
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_len)
  pos = jnp.arange(max_len)
  limit = lengths[:, None] - t + 1 + jnp.arange(t)[None, :]       # [B, T]
  mask = pos[None, None, :] < limit[:, :, None]                    # [B, T, S]
  weights, lse = _softmax_with_lse(scores, mask[:, None, None])
  # Weights are exactly 0 past the length, but 0 * NaN garbage is NaN.
  valid = (pos[None, :] < lengths[:, None])[:, :, None, None]
  v = jnp.where(valid, v_cache, jnp.zeros((), v_cache.dtype))
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out.reshape(batch, t, heads, d).astype(q.dtype),
          lse.transpose(0, 3, 1, 2).reshape(batch, t, heads))


def shared_prefix_attention_reference(q: jax.Array, prefix_k: jax.Array,
                                      prefix_v: jax.Array, *,
                                      prefix_length=None,
                                      sm_scale: float | None = None
                                      ) -> tuple[jax.Array, jax.Array]:
  """Reference for `shared_prefix_attention`: every query sees the first
  prefix_length (default: all) prefix entries."""
  batch, t, heads, d = q.shape
  kv_heads = prefix_k.shape[1]
  group = heads // kv_heads
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  qg = q.reshape(batch, t, kv_heads, group, d)
  scores = jnp.einsum("btkgd,skd->bkgts", qg, prefix_k,
                      preferred_element_type=jnp.float32) * sm_scale
  size = prefix_k.shape[0]
  length = size if prefix_length is None else jnp.clip(prefix_length, 0, size)
  visible = jnp.arange(size) < length
  weights, lse = _softmax_with_lse(scores, visible)
  v = jnp.where(visible[:, None, None], prefix_v, jnp.zeros((), prefix_v.dtype))
  out = jnp.einsum("bkgts,skd->btkgd", weights.astype(v.dtype),
                   v, preferred_element_type=jnp.float32)
  return (out.reshape(batch, t, heads, d).astype(q.dtype),
          lse.transpose(0, 3, 1, 2).reshape(batch, t, heads))

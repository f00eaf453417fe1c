"""Up-front argument checks: each bad input is one ValueError naming the fix."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes


def _check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}.")


def _check_heads(q_heads: int, kv_heads: int, kv_name: str) -> None:
  if kv_heads < 1 or q_heads % kv_heads:
    raise ValueError(
        f"q heads ({q_heads}) must be a multiple of {kv_name} kv_heads "
        f"({kv_heads}) for GQA/MQA; use kv_heads that divide the query heads.")


def check_common(sm_scale, block_sizes) -> None:
  if sm_scale is not None and not isinstance(sm_scale, (int, float)):
    raise ValueError(
        f"sm_scale must be None or a Python float, got {type(sm_scale)}.")
  if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
    raise ValueError(
        "block_sizes must be None or DecodeBlockSizes, got "
        f"{type(block_sizes)}.")


def check_decode(q, k_cache, v_cache, lengths) -> None:
  """Validates decode_attention's arrays (shapes and dtypes only)."""
  if q.ndim != 4:
    raise ValueError(
        f"q must be [batch, T, heads, head_dim], got shape {q.shape}.")
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must be [batch, max_len, kv_heads, head_dim], got shape "
          f"{x.shape}.")
  if k_cache.shape != v_cache.shape:
    raise ValueError(
        f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the "
        "same shape.")
  batch, t, heads, head_dim = q.shape
  if k_cache.shape[0] != batch:
    raise ValueError(
        f"k_cache batch ({k_cache.shape[0]}) must equal q batch ({batch}).")
  if k_cache.shape[3] != head_dim:
    raise ValueError(
        f"k_cache head_dim ({k_cache.shape[3]}) must equal q head_dim "
        f"({head_dim}).")
  if t < 1 or heads < 1 or head_dim < 1:
    raise ValueError(f"q dims must be >= 1, got shape {q.shape}.")
  if t > k_cache.shape[1]:
    raise ValueError(
        f"q has T={t} new tokens but the cache holds max_len="
        f"{k_cache.shape[1]} positions; the new tokens must fit in the cache "
        "(T <= max_len).")
  _check_heads(heads, k_cache.shape[2], "k_cache")
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
    _check_float(name, x)
  if not (q.dtype == k_cache.dtype == v_cache.dtype):
    raise ValueError(
        f"q ({q.dtype}), k_cache ({k_cache.dtype}) and v_cache "
        f"({v_cache.dtype}) must share a dtype; cast q to the cache dtype.")
  if getattr(lengths, "ndim", None) != 1 or lengths.shape[0] != batch:
    raise ValueError(
        f"lengths must be an int32 array of shape [batch]=({batch},), got "
        f"{getattr(lengths, 'shape', type(lengths))}.")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
        f"lengths must be int32 (valid cache entries per sequence), got dtype "
        f"{lengths.dtype}.")


def check_prefix(q, prefix_k, prefix_v) -> None:
  """Validates shared_prefix_attention's arrays."""
  if q.ndim != 4:
    raise ValueError(
        f"q must be [batch, T, heads, head_dim], got shape {q.shape}.")
  for name, x in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
    if x.ndim != 3:
      raise ValueError(
          f"{name} must be [prefix_len, kv_heads, head_dim] (one prefix shared "
          f"by the batch, no batch dim), got shape {x.shape}.")
  if prefix_k.shape != prefix_v.shape:
    raise ValueError(
        f"prefix_k {prefix_k.shape} and prefix_v {prefix_v.shape} must have "
        "the same shape.")
  if prefix_k.shape[2] != q.shape[3]:
    raise ValueError(
        f"prefix_k head_dim ({prefix_k.shape[2]}) must equal q head_dim "
        f"({q.shape[3]}).")
  if min(q.shape) < 1:
    raise ValueError(f"q dims must be >= 1, got shape {q.shape}.")
  _check_heads(q.shape[2], prefix_k.shape[1], "prefix_k")
  for name, x in (("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
    _check_float(name, x)
  if not (q.dtype == prefix_k.dtype == prefix_v.dtype):
    raise ValueError(
        f"q ({q.dtype}), prefix_k ({prefix_k.dtype}) and prefix_v "
        f"({prefix_v.dtype}) must share a dtype; cast q to the prefix dtype.")

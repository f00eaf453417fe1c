"""Up-front argument checks: each bad input is one ValueError naming the fix."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import validation
from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes


def check_common(sm_scale, block_sizes) -> None:
  validation.check_sm_scale(sm_scale)
  validation.check_block_sizes(block_sizes, DecodeBlockSizes)


def _check_attention_arrays(q, k, v, *, k_name: str, v_name: str,
                            kv_rank: int, kv_layout: str, kv_hint: str = "",
                            cast_to: str) -> None:
  """Checks that decode and prefix attention share.

  q is [batch, T, heads, head_dim]; k and v have kv_rank dims, the kv heads
  and head_dim last.
  """
  validation.check_rank("q", q, 4, "[batch, T, heads, head_dim]")
  for name, x in ((k_name, k), (v_name, v)):
    validation.check_rank(name, x, kv_rank, kv_layout, kv_hint)
  validation.check_same_shape(k_name, k, v_name, v)
  if k.shape[-1] != q.shape[3]:
    raise ValueError(
        f"{k_name} head_dim ({k.shape[-1]}) must equal q head_dim "
        f"({q.shape[3]}).")
  validation.check_gqa_heads(q.shape[2], k.shape[-2], f"{k_name} kv_heads")
  for name, x in (("q", q), (k_name, k), (v_name, v)):
    validation.check_float(name, x)
  validation.check_same_dtype({"q": q, k_name: k, v_name: v},
                              fix=f"cast q to the {cast_to} dtype")


def check_decode(q, k_cache, v_cache, lengths) -> None:
  """Validates decode_attention's arrays (shapes and dtypes only)."""
  _check_attention_arrays(q, k_cache, v_cache, k_name="k_cache",
                          v_name="v_cache", kv_rank=4,
                          kv_layout="[batch, max_len, kv_heads, head_dim]",
                          cast_to="cache")
  batch, t, heads, head_dim = q.shape
  if k_cache.shape[0] != batch:
    raise ValueError(
        f"k_cache batch ({k_cache.shape[0]}) must equal q batch ({batch}).")
  if t < 1 or heads < 1 or head_dim < 1:
    raise ValueError(f"q dims must be >= 1, got shape {q.shape}.")
  if t > k_cache.shape[1]:
    raise ValueError(
        f"q has T={t} new tokens but the cache holds max_len="
        f"{k_cache.shape[1]} positions; the new tokens must fit in the cache "
        "(T <= max_len).")
  validation.check_int_vector("lengths", lengths,
                              f"of shape [batch]=({batch},)",
                              "valid cache entries per sequence", size=batch)


def check_prefix(q, prefix_k, prefix_v, prefix_length=None) -> None:
  """Validates shared_prefix_attention's arrays."""
  _check_attention_arrays(q, prefix_k, prefix_v, k_name="prefix_k",
                          v_name="prefix_v", kv_rank=3,
                          kv_layout="[prefix_len, kv_heads, head_dim]",
                          kv_hint=" (one prefix shared by the batch, no "
                          "batch dim)",
                          cast_to="prefix")
  if min(q.shape) < 1:
    raise ValueError(f"q dims must be >= 1, got shape {q.shape}.")
  if prefix_length is not None:
    shape = getattr(prefix_length, "shape", ())
    dtype = getattr(prefix_length, "dtype", None)
    if shape != () or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(
          f"prefix_length must be an integer scalar, got shape {shape} and "
          f"dtype {dtype}.")

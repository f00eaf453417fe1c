"""Argument checks for flash_attention, run on shapes and dtypes only.

Each message names the argument, what was received and how to fix it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import validation
from pallas_kernels.flash_attention.block_sizes import FlashBlockSizes

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_array(name: str, x, layout: str) -> None:
  validation.check_rank(name, x, 4, layout,
                        "; add a batch or heads axis of size 1 if needed")
  if 0 in x.shape:
    raise ValueError(f"{name} has an empty axis: shape {tuple(x.shape)}.")
  validation.check_float(name, x, _FLOAT_DTYPES)


def _check_segments(name: str, seg, batch: int, length: int,
                    what: str) -> jax.Array:
  if not hasattr(seg, "shape") or not hasattr(seg, "dtype"):
    raise ValueError(f"{name} must be an int array [batch, {what}], got "
                     f"{type(seg)}.")
  if tuple(seg.shape) != (batch, length):
    raise ValueError(
        f"{name} must have shape [batch, {what}] = {(batch, length)}, got "
        f"{tuple(seg.shape)}.")
  if not jnp.issubdtype(seg.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype "
                     f"{seg.dtype}; use e.g. segment_ids.astype(jnp.int32).")
  return jnp.asarray(seg).astype(jnp.int32)


def validate_inputs(q, k, v, *, causal, segment_ids, sm_scale, block_sizes):
  """Checks flash_attention's arguments (platform.check checks the rest).

  Returns:
    (q_segment_ids, kv_segment_ids) as int32 arrays, or (None, None).

  Raises:
    ValueError: naming the first bad argument and the fix.
  """
  _check_array("q", q, "[batch, q_len, heads, head_dim]")
  _check_array("k", k, "[batch, kv_len, kv_heads, head_dim]")
  _check_array("v", v, "[batch, kv_len, kv_heads, head_dim]")
  batch, q_len, heads, head_dim = q.shape
  validation.check_same_shape("k", k, "v", v)
  if k.shape[0] != batch:
    raise ValueError(f"k/v batch {k.shape[0]} != q batch {batch}; pass "
                     "the same batch size for q, k and v.")
  if k.shape[3] != head_dim:
    raise ValueError(f"k/v head_dim {k.shape[3]} != q head_dim {head_dim}; "
                     "q, k and v must share head_dim.")
  validation.check_gqa_heads(heads, k.shape[2], "k/v heads")
  validation.check_same_dtype({"q": q, "k": k, "v": v},
                              fix="cast k and v to q.dtype")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool, got {causal!r}.")
  validation.check_sm_scale(sm_scale)
  validation.check_block_sizes(block_sizes, FlashBlockSizes)

  kv_len = k.shape[1]
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids as a sequence must be the pair "
                       "(q_segment_ids, kv_segment_ids).")
    return (_check_segments("segment_ids[0] (query ids)", segment_ids[0],
                            batch, q_len, "q_len"),
            _check_segments("segment_ids[1] (key ids)", segment_ids[1],
                            batch, kv_len, "kv_len"))
  if q_len != kv_len:
    raise ValueError(
        f"segment_ids as one array needs q_len == kv_len, got {q_len} and "
        f"{kv_len}; pass a pair (q_segment_ids, kv_segment_ids) instead.")
  seg = _check_segments("segment_ids", segment_ids, batch, q_len, "seq")
  return seg, seg

"""Operand layout that the GPU and TPU decode kernels share.

Queries arrive as [NB, KVH, R, D] (R rows per kv head), keys and values as
[NB, L, KVH, D], kv_lens as [NB]. NB is the batch for decode and 1 for a
shared prefix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_and_flatten(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    head_dim: int, rows: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pads to the kernel's tile sizes and views each kv head as a column block.

  Args:
    q: [NB, KVH, R, D] query rows.
    k: [NB, L, KVH, D] keys.
    v: like k.
    head_dim: padded head dim (>= D); zeros in the extra features change no
      score and give output columns that are sliced off.
    rows: padded rows per kv head (>= R); padded rows are sliced off.

  Returns:
    q [NB, KVH, rows, head_dim], and k and v as [NB, L, KVH * head_dim] (a
    free reshape).
  """
  nb, kvh, r, d = q.shape
  length = k.shape[1]
  if head_dim != d:
    pad = [(0, 0)] * 3 + [(0, head_dim - d)]
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  if rows != r:
    q = jnp.pad(q, [(0, 0), (0, 0), (0, rows - r), (0, 0)])
  k = k.reshape(nb, length, kvh * head_dim)
  v = v.reshape(nb, length, kvh * head_dim)
  return q, k, v

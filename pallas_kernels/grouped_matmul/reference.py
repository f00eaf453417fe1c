"""Explicit pure-jnp references for the grouped matmul kernels.

Written with per-group row masks rather than jax.lax.ragged_dot so the
tests can cross-check ragged_dot itself (G dense matmuls: test sizes only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_row_masks(group_sizes: jax.Array, m: int) -> jax.Array:
  """bool [G, M]: row r belongs to group g (sizes clipped at M)."""
  ends = jnp.clip(jnp.cumsum(jnp.maximum(group_sizes, 0)), 0, m)
  starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
  rows = jnp.arange(m)[None, :]
  return (rows >= starts[:, None]) & (rows < ends[:, None])


def grouped_matmul_reference(x: jax.Array, w: jax.Array,
                             group_sizes: jax.Array,
                             preferred_element_type=None) -> jax.Array:
  """out[r] = x[r] @ w[group of r] in f32; rows past the groups give 0."""
  masks = group_row_masks(group_sizes, x.shape[0]).astype(jnp.float32)
  per_group = jnp.einsum("mk,gkn->gmn", x.astype(jnp.float32),
                         w.astype(jnp.float32))
  out = jnp.einsum("gm,gmn->mn", masks, per_group)
  dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
  return out.astype(dtype)


def transposed_grouped_matmul_reference(x: jax.Array, dy: jax.Array,
                                        group_sizes: jax.Array,
                                        preferred_element_type=None
                                        ) -> jax.Array:
  """dw[g] = x_g^T @ dy_g -> [G, K, N]; empty groups give 0; f32 maths."""
  masks = group_row_masks(group_sizes, x.shape[0]).astype(jnp.float32)
  out = jnp.einsum("gm,mk,mn->gkn", masks, x.astype(jnp.float32),
                   dy.astype(jnp.float32))
  dtype = preferred_element_type or jnp.result_type(x.dtype, dy.dtype)
  return out.astype(dtype)

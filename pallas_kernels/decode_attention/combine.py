"""Exact merge of attention results computed over disjoint key sets."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge_stacked(out: jax.Array, lse: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Merges P partial results stacked on axis 0.

  Each part i is a softmax-normalised output O_i over its own keys with
  log-sum-exp lse_i. With m = max_i lse_i and w_i = e^(lse_i - m):
  O = sum_i w_i O_i / sum_i w_i and lse = m + log(sum_i w_i). Parts with
  lse = -inf (no keys) get weight 0; if every part is empty the result is
  0 with lse = -inf, never NaN.

  Args:
    out: [P, ..., D] partial outputs.
    lse: [P, ...] f32 partial log-sum-exps.

  Returns:
    (out [..., D] in out's dtype, lse [...] f32).
  """
  lse = lse.astype(jnp.float32)
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weight = jnp.exp(lse - m_safe)  # exactly 0 where lse = -inf
  total = jnp.sum(weight, axis=0)
  seen = total > 0.0
  # An empty part's output is ignored even if it holds NaN.
  parts = jnp.where((weight > 0.0)[..., None], out.astype(jnp.float32), 0.0)
  merged = jnp.sum(parts * weight[..., None], axis=0)
  merged = merged / jnp.where(seen, total, 1.0)[..., None]
  merged_lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, total, 1.0)),
                         -jnp.inf)
  return merged.astype(out.dtype), merged_lse


def combine_attention(parts: Sequence[tuple[jax.Array, jax.Array]]
                      ) -> tuple[jax.Array, jax.Array]:
  """Exactly merges attention over disjoint key sets (e.g. prefix + suffix).

  Pure jnp; differentiable by ordinary autodiff.

  Args:
    parts: a non-empty sequence of (out [..., heads, head_dim],
      lse [..., heads]) pairs, one per key set, all of equal shapes.

  Returns:
    (out, lse): out in the first part's dtype, lse f32; equal to attention
    over the union of the key sets.
  """
  parts = list(parts)
  if not parts:
    raise ValueError("combine_attention: parts must hold at least one "
                     "(out, lse) pair.")
  for i, part in enumerate(parts):
    if not isinstance(part, (tuple, list)) or len(part) != 2:
      raise ValueError(f"combine_attention: parts[{i}] must be an (out, lse) "
                       "pair.")
  out0, lse0 = parts[0]
  for i, (out, lse) in enumerate(parts):
    if out.shape != out0.shape or lse.shape != lse0.shape:
      raise ValueError(
          f"combine_attention: parts[{i}] has out {out.shape} / lse "
          f"{lse.shape}, expected {out0.shape} / {lse0.shape} like parts[0].")
    if out.shape[:-1] != lse.shape:
      raise ValueError(
          f"combine_attention: parts[{i}] lse shape {lse.shape} must equal "
          f"out.shape[:-1] = {out.shape[:-1]}.")
  out = jnp.stack([o.astype(out0.dtype) for o, _ in parts])
  lse = jnp.stack([l for _, l in parts])
  return merge_stacked(out, lse)

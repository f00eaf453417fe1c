"""Maths shared by the GPU (Triton) and TPU (Mosaic) flash-attention kernels.

Every function here acts on values already loaded from refs, so both kernel
variants (and the CPU interpreter) run the very same softmax, masking and
block-skipping arithmetic; the variants differ only in how they tile.

Conventions:
  * Logits are kept in base 2: s = q.k * sm_scale * log2(e), so the kernels
    call exp2 (one multiply cheaper than exp on GPUs) and the saved
    log-sum-exp is base 2 as well.
  * Row statistics (max, sum, lse) are 2-D [rows, L]. The GPU variant uses
    L == 1; the TPU variant keeps them lane-replicated (L == 128) because
    Mosaic stores [rows, 1] vectors badly. `expand_cols` hides the difference.
  * Masked logits are -inf. A row with no visible key ends with l == 0: its
    output is 0 and its lse is +inf, which makes every backward probability
    exp2(s - lse) exactly 0 instead of NaN.
  * Causal masking is aligned bottom-right: query row r sees key column c iff
    c <= r + (kv_len - q_len). Rows and columns index the unpadded sequence.
"""
from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """Static description of which (query, key) pairs are visible.

  Attributes:
    causal: apply the bottom-right causal rule.
    q_len: true (unpadded) number of queries.
    kv_len: true (unpadded) number of keys.
    kv_padded: keys were padded past kv_len, so those columns are masked.
    segments: segment ids are given, so every block must be masked.
  """
  causal: bool
  q_len: int
  kv_len: int
  kv_padded: bool
  segments: bool

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def needs_mask(self) -> bool:
    return self.causal or self.kv_padded or self.segments


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static shapes of one (padded) attention call, shared by all kernels.

  Attributes:
    info: which (query, key) pairs are visible.
    batch: batch size.
    heads: query heads.
    kv_heads: key/value heads (heads % kv_heads == 0).
    head_dim: padded head dim (the kernels' tile width).
    q_len_padded: query rows after padding to the q blocks.
    kv_len_padded: key rows after padding to the kv blocks.
    sm_scale: natural-log logit scale.
  """
  info: MaskInfo
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  q_len_padded: int
  kv_len_padded: int
  sm_scale: float

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def scale_log2(self) -> float:
    return self.sm_scale * LOG2E


def cdiv(x, b: int):
  """Ceil division for x >= 0 (Python int or int32 scalar)."""
  if isinstance(x, int):
    return -(-x // b)
  return lax.div(x + (b - 1), jnp.int32(b))


def floordiv(x, b: int):
  """Floor division for x >= 0; lax.div truncates, equal for x >= 0."""
  if isinstance(x, int):
    return x // b
  return lax.div(x, jnp.int32(b))


def _clip(x, lo: int, hi: int):
  if isinstance(x, int):
    return min(max(x, lo), hi)
  return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(info: MaskInfo, q_block, block_q: int, block_kv: int):
  """KV blocks that a query block must visit.

  Args:
    info: the masking problem.
    q_block: index of the query block (int or int32 scalar).
    block_q: query rows per block.
    block_kv: key rows per block.

  Returns:
    (n_full, n_any): blocks [0, n_full) need no mask, blocks
    [n_full, n_any) need the mask, blocks >= n_any are skipped.
  """
  if info.causal:
    q0 = q_block * block_q
    # Keys visible to the block's last row, and to its first row.
    any_keys = _clip(q0 + block_q + info.offset, 0, info.kv_len)
    all_keys = _clip(q0 + 1 + info.offset, 0, info.kv_len)
  else:
    any_keys = all_keys = info.kv_len
  n_any = cdiv(any_keys, block_kv)
  n_full = 0 if info.segments else floordiv(all_keys, block_kv)
  return n_full, n_any


def q_block_range(info: MaskInfo, kv_block, block_q: int, block_kv: int):
  """Query blocks that see a KV block (used by the dK/dV kernels).

  Args:
    info: the masking problem.
    kv_block: index of the key block (int or int32 scalar).
    block_q: query rows per block.
    block_kv: key rows per block.

  Returns:
    (lo, lo_full, hi): blocks [lo, lo_full) need the mask, blocks
    [lo_full, hi) need none, all others are skipped. Padded query rows past
    q_len are never visited.
  """
  n_q = cdiv(info.q_len, block_q)
  k0 = kv_block * block_kv
  if info.causal:
    # Row r sees the block's first key iff r >= k0 - offset, and the block's
    # last key iff r >= k0 + block_kv - 1 - offset.
    lo = jnp.minimum(floordiv(jnp.maximum(k0 - info.offset, 0), block_q), n_q)
    lo_full = jnp.minimum(
        cdiv(jnp.maximum(k0 + block_kv - 1 - info.offset, 0), block_q), n_q)
  else:
    lo = jnp.int32(0)
    lo_full = jnp.int32(0)
  if info.segments:
    lo_full = jnp.int32(n_q)
  elif info.kv_padded:
    lo_full = jnp.where(k0 + block_kv > info.kv_len, n_q, lo_full)
  if info.kv_padded:
    lo = jnp.where(k0 >= info.kv_len, n_q, lo)  # all-padding block
  lo_full = jnp.maximum(lo_full, lo)
  return lo, lo_full, n_q


def block_mask(info: MaskInfo, q_start, kv_start, shape: tuple[int, int],
               q_seg: jax.Array | None = None,
               kv_seg: jax.Array | None = None) -> jax.Array | None:
  """Boolean [block_q, block_kv] visibility of one tile.

  Args:
    info: the masking problem.
    q_start: first query row of the tile.
    kv_start: first key column of the tile.
    shape: (block_q, block_kv).
    q_seg: query segment ids, broadcastable to `shape` ([block_q, 1] or
      [block_q, block_kv]); required when info.segments.
    kv_seg: key segment ids, broadcastable to `shape` ([1, block_kv]).

  Returns:
    The mask, or None if the tile needs none.
  """
  mask = None

  def _and(m, new):
    return new if m is None else jnp.logical_and(m, new)

  cols = lax.broadcasted_iota(jnp.int32, shape, 1) + kv_start
  if info.causal:
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + q_start
    mask = _and(mask, cols - rows <= info.offset)
  if info.kv_padded:
    mask = _and(mask, cols < info.kv_len)
  if info.segments:
    mask = _and(mask, q_seg == kv_seg)
  return mask


def expand_cols(x: jax.Array, n: int) -> jax.Array:
  """Broadcasts row statistics [rows, L] against a [rows, n] tile."""
  cols = x.shape[-1]
  if cols in (1, n):
    return x
  # Lane-replicated TPU statistics: tiling is a cheap vreg copy in Mosaic.
  return jnp.tile(x, (1, n // cols))


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, k] @ b[n, k]^T in f32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [k, m]^T @ b [k, n] in f32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, k] @ b [k, n] in f32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def logits(q: jax.Array, k: jax.Array, scale_log2: float,
           mask: jax.Array | None) -> jax.Array:
  """Base-2 logits of one tile, -inf where masked."""
  s = dot_nt(q, k) * scale_log2
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


def init_stats(rows: int, lanes: int, head_dim: int):
  """Initial (max, sum, accumulator) of the online softmax."""
  return (jnp.full((rows, lanes), -jnp.inf, jnp.float32),
          jnp.zeros((rows, lanes), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))


def softmax_step(stats, s: jax.Array, v: jax.Array):
  """One online-softmax update with a tile of logits s and values v.

  Args:
    stats: (m, l, acc): running base-2 row max [rows, L], running row sum
      [rows, L] scaled by 2^-m, running output [rows, head_dim] scaled alike.
    s: base-2 logits [rows, block_kv], -inf where masked.
    v: values [block_kv, head_dim].

  Returns:
    The updated (m, l, acc).
  """
  m_prev, l_prev, acc_prev = stats
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  # A row that has seen only masked keys keeps m == -inf; shifting by 0
  # instead keeps exp2(-inf - -inf) = NaN out of p and alpha.
  m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  alpha = jnp.exp2(m_prev - m_shift)
  p = jnp.exp2(s - expand_cols(m_shift, s.shape[1]))
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_next = (expand_cols(alpha, acc_prev.shape[1]) * acc_prev
              + dot_nn(p.astype(v.dtype), v))
  return m_next, l_next, acc_next


def finalize(stats):
  """Normalised output [rows, head_dim] and base-2 lse [rows, L]."""
  m, l, acc = stats
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  out = acc * expand_cols(inv, acc.shape[1])
  lse = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
  return out, lse


def probabilities(s: jax.Array, lse: jax.Array) -> jax.Array:
  """Softmax probabilities of a tile recomputed from the saved lse."""
  return jnp.exp2(s - expand_cols(lse, s.shape[1]))


def score_grad(p: jax.Array, do: jax.Array, v: jax.Array,
               delta: jax.Array) -> jax.Array:
  """dL/d(logits) of a tile in the natural-log domain, before sm_scale.

  With dp = dO v^T and delta = rowsum(dO * O): ds = p * (dp - delta).
  """
  dp = dot_nt(do, v)
  return p * (dp - expand_cols(delta, dp.shape[1]))

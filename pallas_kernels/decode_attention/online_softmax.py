"""Online-softmax maths shared by the GPU and TPU kernel bodies.

Everything is 2-D ([rows, keys] and [rows, 1] columns) because Mosaic wants
2-D vectors and Triton accepts them; nothing here touches a ref, so both
lowerings trace the same code.
"""
from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

# Contract the last dim of both operands: q [R, D] x k [C, D] -> [R, C].
_NT_DIMS = (((1,), (1,)), ((), ()))


def visible(pos: jax.Array, row: jax.Array, kv_len: jax.Array, num_new: int,
            group: int) -> jax.Array:
  """Which (query row, key position) pairs may attend.

  Rows are ordered (new token t, head in group g) -> t * group + g. The T new
  tokens sit at positions kv_len - T .. kv_len - 1, so token t sees positions
  < kv_len - T + t + 1. Rows past T * group (padding) behave like the last
  token. t is counted with T - 1 compares instead of an integer division,
  which neither Triton nor Mosaic needs to lower then.

  Args:
    pos: int32 key positions, broadcastable against `row`.
    row: int32 query row indices.
    kv_len: int32 scalar, valid keys of this sequence (new tokens included).
    num_new: static T; 1 means no causal structure (plain length mask).
    group: static query heads per kv head.

  Returns:
    Boolean mask of the broadcast shape.
  """
  token = jnp.zeros_like(row)
  for t in range(1, num_new):
    token = token + (row >= t * group).astype(jnp.int32)
  return pos < kv_len - (num_new - 1) + token


def init_state(rows: int, head_dim: int):
  """(running max, running sum, unnormalised output) before any key."""
  return (jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))


def update(state, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           sm_scale: float):
  """Folds one key block into the running softmax state.

  Masked scores become -inf before the max, and the max is replaced by 0 while
  a row has seen nothing, so fully masked rows and blocks give exact zeros and
  never exp(-inf - -inf) = NaN. The caller must zero `v` rows that may hold
  garbage: p = 0 times NaN is still NaN.

  Args:
    state: (m [R,1], l [R,1], acc [R,D]) in f32.
    q: [R, D] queries.
    k: [C, D] keys, same dtype as q.
    v: [C, D] values.
    mask: [R, C] booleans, True where the score counts.
    sm_scale: softmax scale applied to q.k.

  Returns:
    The new state.
  """
  m_prev, l_prev, acc_prev = state
  s = lax.dot_general(q, k, _NT_DIMS, preferred_element_type=jnp.float32)
  s = jnp.where(mask, s * sm_scale, -jnp.inf)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return m_new, l_new, alpha * acc_prev + pv


def finalize(state):
  """Normalised output [R, D] and natural-log lse [R, 1].

  Rows that saw no key give 0 and -inf.
  """
  m, l, acc = state
  seen = l > 0.0
  out = acc / jnp.where(seen, l, 1.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  return jnp.where(seen, out, 0.0), lse

"""`dense(x, w)`: the one contraction every weight matmul of the models goes through, with its own backward.

x [*tokens, *in] times w [*in, *out] -> [*tokens, *out]. The forward is a plain dot_general. The backward is
written out because of what XLA's CPU backend does with the autodiff one: the weight gradient contracts the token
dims of x and dy, which are the major dims of both, and XLA chose to transpose dy, usually the larger operand, and
fused that transpose into the elementwise backward that produces dy (for SwiGLU: the silu and gating terms),
giving a loop that reads every input with a stride of d_ff floats: those fusions took a quarter of the thread
time in a profile of lm_small's CPU step. Here the smaller of x and dy is transposed on its own, and the gradient
is a plain [in, tokens] x [tokens, out] product: lm_small's SwiGLU forward and backward went from 50 to 69
GFLOP/s on the 2-core benchmark machine (README, "Where the CPU step's time went"). On GPU and TPU a transpose
feeding a matmul folds into it, so there the program does the same work as before.

`stacked` says what `dense` becomes when it is vmapped with both x and w batched (the diagonal ARMT executor's
cells: each cell times its own layer's weights): 'batched' (vmap's batched matmul, the default), or one grouped
matmul over the rows of all the cells with one weight per cell, through `jax.lax.ragged_dot` or
`pallas_kernels.grouped_matmul` (its kernel backward too). The forward and the backward each carry a custom vmap
rule for it (jax.custom_batching.custom_vmap), so the layers that call `dense` do not change; any other vmap of
`dense` (x batched and w shared, or the reverse) is the plain batched contraction.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def _contract(a, b, a_dims, b_dims, out_dtype):
  return lax.dot_general(a, b, ((tuple(a_dims), tuple(b_dims)), ((), ())),
                         preferred_element_type=out_dtype)


STACKED_IMPLS = ('batched', 'ragged_dot', 'pallas')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, w, n_in, out_dtype, stacked):
  return _forward(n_in, out_dtype, stacked)(x, w)


def _dense_fwd(x, w, n_in, out_dtype, stacked):
  return _dense(x, w, n_in, out_dtype, stacked), (x, w)


def _plain_forward(x, w, n_in, out_dtype):
  return _contract(x, w, range(x.ndim - n_in, x.ndim), range(n_in), out_dtype)


def _weight_grad(x, dy, n_in):
  """sum over tokens of x (x) dy -> [*in, *out], transposing whichever of x and dy is smaller."""
  n_tok = x.ndim - n_in
  n_out = dy.ndim - n_tok
  tokens = tuple(range(n_tok))
  if x.size <= dy.size:
    xt = jnp.transpose(x, tuple(range(n_tok, x.ndim)) + tokens)  # [*in, *tokens]
    return _contract(xt, dy, range(n_in, xt.ndim), tokens, jnp.float32)
  dyt = jnp.transpose(dy, tuple(range(n_tok, dy.ndim)) + tokens)  # [*out, *tokens]
  grad_t = _contract(dyt, x, range(n_out, dyt.ndim), tokens, jnp.float32)  # [*out, *in]
  return jnp.transpose(grad_t, tuple(range(n_out, n_out + n_in)) + tuple(range(n_out)))


def _plain_backward(x, w, dy, n_in):
  n_tok = x.ndim - n_in
  dx = _contract(dy.astype(w.dtype), w, range(n_tok, dy.ndim), range(n_in, w.ndim), jnp.float32)
  dw = _weight_grad(x, dy.astype(x.dtype), n_in)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _dense_bwd(n_in, out_dtype, stacked, residuals, dy):
  del out_dtype
  return _backward(n_in, stacked)(*residuals, dy)


def _grouped(impl, x, w, n_in, out_dtype):
  """x [C, *tokens, *in] times w [C, *in, *out], cell c's rows by weight c: one grouped matmul over C groups."""
  c, n_tok = x.shape[0], x.ndim - 1 - n_in
  tokens, outs = x.shape[1:1 + n_tok], w.shape[1 + n_in:]
  rows, size_in = math.prod(tokens), math.prod(w.shape[1:1 + n_in])
  xs = x.reshape(c * rows, size_in)
  ws = w.reshape(c, size_in, math.prod(outs))
  sizes = jnp.full((c,), rows, jnp.int32)
  if impl == 'ragged_dot':
    y = jax.lax.ragged_dot(xs, ws, sizes, preferred_element_type=out_dtype)
  else:
    import pallas_kernels  # pylint: disable=g-import-not-at-top  (kernels load only when asked for)
    y = pallas_kernels.grouped_matmul(xs, ws, sizes, preferred_element_type=out_dtype)
  return y.reshape(c, *tokens, *outs).astype(out_dtype)


def _unbatched_axes(in_batched):
  return tuple(0 if b else None for b in in_batched)


@functools.cache
def _forward(n_in, out_dtype, stacked):
  plain = functools.partial(_plain_forward, n_in=n_in, out_dtype=out_dtype)
  if stacked == 'batched':
    return plain
  fn = jax.custom_batching.custom_vmap(plain)

  @fn.def_vmap
  def rule(axis_size, in_batched, x, w):
    del axis_size
    if not all(in_batched):
      return jax.vmap(plain, in_axes=_unbatched_axes(in_batched))(x, w), True
    return _grouped(stacked, x, w, n_in, out_dtype), True
  return fn


@functools.cache
def _backward(n_in, stacked):
  plain = functools.partial(_plain_backward, n_in=n_in)
  if stacked == 'batched':
    return plain
  fn = jax.custom_batching.custom_vmap(plain)

  @fn.def_vmap
  def rule(axis_size, in_batched, x, w, dy):
    del axis_size
    if not all(in_batched):
      return jax.vmap(plain, in_axes=_unbatched_axes(in_batched))(x, w, dy), (True, True)
    _, pull = jax.vjp(lambda x, w: _grouped(stacked, x, w, n_in, jnp.float32), x, w)
    dx, dw = pull(dy.astype(jnp.float32))
    return (dx.astype(x.dtype), dw.astype(w.dtype)), (True, True)
  return fn


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None, stacked: str = 'batched') -> jax.Array:
  """Contracts the last `n_in` dims of x with the first `n_in` dims of w (e.g. x [b, s, d], w [d, h, k]).

  out_dtype: the result's dtype (default x's; e.g. f32 logits from bf16 activations). stacked: what a vmap over
  both x and w runs (module docstring; one of STACKED_IMPLS).
  """
  if x.shape[x.ndim - n_in:] != w.shape[:n_in]:
    raise ValueError(f'dense: x {x.shape} and w {w.shape} do not share {n_in} contracted dims')
  if stacked not in STACKED_IMPLS:
    raise ValueError(f'dense: stacked={stacked!r} is not one of {STACKED_IMPLS}')
  return _dense(x, w, n_in, jnp.dtype(out_dtype or x.dtype), stacked)

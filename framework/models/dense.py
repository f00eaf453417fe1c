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
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _contract(a, b, a_dims, b_dims, out_dtype):
  return lax.dot_general(a, b, ((tuple(a_dims), tuple(b_dims)), ((), ())),
                         preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, n_in, out_dtype):
  return _contract(x, w, range(x.ndim - n_in, x.ndim), range(n_in), out_dtype)


def _dense_fwd(x, w, n_in, out_dtype):
  return _dense(x, w, n_in, out_dtype), (x, w)


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


def _dense_bwd(n_in, out_dtype, residuals, dy):
  del out_dtype
  x, w = residuals
  n_tok = x.ndim - n_in
  dx = _contract(dy.astype(w.dtype), w, range(n_tok, dy.ndim), range(n_in, w.ndim), jnp.float32)
  dw = _weight_grad(x, dy.astype(x.dtype), n_in)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
  """Contracts the last `n_in` dims of x with the first `n_in` dims of w (e.g. x [b, s, d], w [d, h, k]).

  out_dtype: the result's dtype (default x's; e.g. f32 logits from bf16 activations).
  """
  if x.shape[x.ndim - n_in:] != w.shape[:n_in]:
    raise ValueError(f'dense: x {x.shape} and w {w.shape} do not share {n_in} contracted dims')
  return _dense(x, w, n_in, jnp.dtype(out_dtype or x.dtype))

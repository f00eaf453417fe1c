"""framework.models.dense: its hand-written backward against JAX's autodiff of the same contraction as an einsum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.models.dense import dense


def _normal(seed, shape, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


@pytest.mark.parametrize('x_shape, w_shape, n_in, spec', [
    ((3, 5, 4), (4, 16), 1, 'bsd,df->bsf'),        # x smaller than dy: x is the one transposed
    ((3, 5, 16), (16, 4), 1, 'bsf,fd->bsd'),       # dy smaller: dy is transposed
    ((3, 5, 8), (8, 2, 3), 1, 'bsd,dhk->bshk'),    # attention projections
    ((3, 5, 2, 3), (2, 3, 8), 2, 'bshk,hkd->bsd'),  # the output projection contracts two dims
    ((7, 6), (6, 6), 1, 'td,de->te'),              # equal sizes, one token dim
])
def test_forward_and_gradients_match_einsum_autodiff(x_shape, w_shape, n_in, spec):
  x, w = _normal(0, x_shape), _normal(1, w_shape)
  out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
  dy = _normal(2, out_shape)
  got, got_vjp = jax.vjp(lambda a, b: dense(a, b, n_in=n_in), x, w)
  want, want_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, g, r in zip(('dx', 'dw'), got_vjp(dy), want_vjp(dy)):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)


def test_out_dtype_and_16_bit_gradients_keep_their_dtypes():
  x = _normal(0, (2, 3, 8)).astype(jnp.bfloat16)
  w = _normal(1, (8, 16)).astype(jnp.bfloat16)
  logits, vjp = jax.vjp(lambda a, b: dense(a, b, out_dtype=jnp.float32), x, w)
  assert logits.dtype == jnp.float32
  want = jnp.einsum('bsd,dv->bsv', x, w, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(logits, want, rtol=1e-2, atol=1e-2)
  dx, dw = vjp(jnp.ones_like(logits))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(
      jnp.einsum('bsd,bsv->dv', x.astype(jnp.float32), jnp.ones((2, 3, 16))), np.float32), rtol=2e-2)


def test_mismatched_contraction_is_refused():
  with pytest.raises(ValueError, match='do not share 1 contracted dims'):
    dense(jnp.ones((2, 3)), jnp.ones((4, 5)))


@pytest.mark.parametrize('stacked', ['ragged_dot', 'pallas'])
@pytest.mark.parametrize('in_axes', [(0, 0), (0, None), (None, 0)])
def test_stacked_vmap_rule_matches_the_per_cell_einsum(stacked, in_axes):
  """vmap over cells with both x and w batched runs one grouped matmul (each cell's rows by its own weight);
  any other vmap the plain contraction. Forward and both gradients against a per-cell einsum."""
  cells = 3
  x = _normal(0, (cells, 2, 5, 8) if in_axes[0] == 0 else (2, 5, 8))
  w = _normal(1, (cells, 8, 2, 3) if in_axes[1] == 0 else (8, 2, 3))
  dy = _normal(2, (cells, 2, 5, 2, 3))
  f = jax.vmap(lambda a, b: dense(a, b, stacked=stacked), in_axes=in_axes)
  g = jax.vmap(lambda a, b: jnp.einsum('bsd,dhk->bshk', a, b), in_axes=in_axes)
  got, got_vjp = jax.vjp(f, x, w)
  want, want_vjp = jax.vjp(g, x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(('dx', 'dw'), got_vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  grouped = 'ragged_dot_general' if stacked == 'ragged_dot' else 'pallas_call'
  assert (grouped in str(jax.make_jaxpr(lambda a, b: jax.vjp(f, a, b)[1](dy))(x, w))) == (in_axes == (0, 0))


def test_unknown_stacked_impl_is_refused():
  with pytest.raises(ValueError, match='stacked'):
    dense(jnp.ones((2, 3)), jnp.ones((3, 4)), stacked='grouped')

"""The kernel variant follows the platform being lowered for, not the host's default backend: one jitted
function, traced on this CPU host with no platform passed, lowers to Mosaic for TPU and Triton for CUDA."""
import functools

import jax
import jax.numpy as jnp
import pytest

from lowering import lower_for
from pallas_kernels import decode_attention, flash_attention, grouped_matmul

MOSAIC, TRITON = 'tpu_custom_call', '__gpu$xla.gpu.triton'
EXPECTED = {'tpu': (MOSAIC, TRITON), 'cuda': (TRITON, MOSAIC)}


def _flash_fwd_bwd(q, k, v):
  out, vjp = jax.vjp(functools.partial(flash_attention, causal=True), q, k, v)
  return out, vjp(out)


def _gmm_grad(x, w, gs):
  return jax.grad(lambda x, w: grouped_matmul(x, w, gs).sum(), argnums=(0, 1))(x, w)


def _decode(q, cache, lengths):
  return decode_attention(q, cache, cache, lengths)


CASES = {
    'flash': (_flash_fwd_bwd, (jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16))),
    'grouped_matmul': (_gmm_grad, (jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
                                   jax.ShapeDtypeStruct((2, 128, 128), jnp.bfloat16),
                                   jax.ShapeDtypeStruct((2,), jnp.int32))),
    'decode': (_decode, (jax.ShapeDtypeStruct((2, 1, 4, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((2, 256, 1, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((2,), jnp.int32))),
}


@pytest.mark.parametrize('target', ['tpu', 'cuda'])
@pytest.mark.parametrize('kernel', sorted(CASES))
def test_variant_follows_lowering_platform(kernel, target):
  assert jax.default_backend() == 'cpu'  # the point: the host is not the target
  fn, args = CASES[kernel]
  text = lower_for(target, fn, *args)
  wanted, unwanted = EXPECTED[target]
  assert wanted in text
  # Only the target's branch is lowered: the other variant's kernel must not ride along.
  assert unwanted not in text


def test_cpu_lowering_interprets():
  """Lowered for the host itself, the default branch runs the interpreter: no kernel custom call at all."""
  fn, args = CASES['flash']
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cpu',)).as_text()
  assert MOSAIC not in text and TRITON not in text


def test_block_sizes_only_one_variant_takes_refuse_only_that_platform():
  """Triton tiles of 64 are no Mosaic tiles: a call with them still lowers for CUDA, and lowering it for TPU
  fails, also under grad (not a silent fall-back to the interpreter, nor a pruned branch with zero gradient)."""
  from pallas_kernels import FlashBlockSizes
  blocks = FlashBlockSizes(64, 64, 64, 64, 64, 64)
  fn = lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks)
  grad = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum())
  args = CASES['flash'][1]
  assert TRITON in lower_for('cuda', fn, *args)
  for f in (fn, grad):
    with pytest.raises(NotImplementedError, match="platform_index.*not found for platform tpu"):
      lower_for('tpu', f, *args)


def test_without_triton_tpu_lowering_still_works(monkeypatch):
  """A jax without the Pallas Triton backend must still compile for TPU: the Triton variant is not traced."""
  from pallas_kernels import platform
  monkeypatch.setattr(platform, 'plgpu', None)
  fn, args = CASES['grouped_matmul']
  text = lower_for('tpu', fn, *args)
  assert MOSAIC in text and TRITON not in text

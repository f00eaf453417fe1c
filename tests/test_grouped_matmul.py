"""Grouped matmul kernels against jax.lax.ragged_dot and explicit references.

Every kernel case runs in the Pallas interpreter on CPU for both the GPU
(Triton-shaped: per-tile group loop, masked loads) and TPU (Mosaic-shaped:
megablox-style tile visits) variants, with small tiles so group boundaries
fall inside tiles and M, K, N do not divide the tiles.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lower_for
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import (
    GroupedMatmulBlockSizes, grouped_matmul, transposed_grouped_matmul)
from pallas_kernels.grouped_matmul import reference

# Jitted so each reference is one compile, not dozens of eager op compiles.
gmm_reference = jax.jit(reference.grouped_matmul_reference,
                        static_argnames="preferred_element_type")
tgmm_reference = jax.jit(reference.transposed_grouped_matmul_reference,
                         static_argnames="preferred_element_type")
ragged_dot = jax.jit(jax.lax.ragged_dot)

# |kernel - reference| per input dtype; values are O(sqrt(K)) ~ 10.
F32_TOL = dict(atol=1e-4, rtol=1e-5)
BF16_TOL = dict(atol=1e-1, rtol=2e-2)   # outputs rounded to bf16 (2^-8)
TOL = {jnp.float32: F32_TOL, jnp.bfloat16: BF16_TOL}

PLATFORMS = ("gpu", "tpu")
SMALL = GroupedMatmulBlockSizes(tm=16, tk=16, tn=16)

# (M, K, N, group_sizes, dtype)
CASES = [
    # Empty groups, boundaries inside tiles, sum 62 < M = 70.
    (70, 40, 24, (5, 0, 17, 30, 0, 10), jnp.float32),
    # K, N past one TPU lane tile (128) so both variants see K/N remainders.
    (50, 200, 136, (0, 3, 47), jnp.bfloat16),
    # Every group empty: all zeros.
    (24, 16, 16, (0, 0), jnp.float32),
]


def _random(seed, shape, dtype):
  # NumPy draws: eager jax.random would compile a kernel per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)


def _inputs(m, k, n, group_sizes, dtype):
  g = len(group_sizes)
  return (_random(0, (m, k), dtype), _random(1, (g, k, n), dtype),
          jnp.asarray(group_sizes, jnp.int32))


def _close(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32),
                             np.asarray(expected, np.float32), **TOL[dtype])


def test_explicit_reference_matches_ragged_dot():
  x, w, gs = _inputs(70, 40, 24, (5, 0, 17, 30, 0, 10), jnp.float32)
  _close(gmm_reference(x, w, gs), ragged_dot(x, w, gs), jnp.float32)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("m,k,n,group_sizes,dtype", CASES)
def test_forward_matches_ragged_dot(platform, m, k, n, group_sizes, dtype):
  x, w, gs = _inputs(m, k, n, group_sizes, dtype)
  out = grouped_matmul(x, w, gs, block_sizes=SMALL, interpret=True,
                       platform=platform)
  assert out.shape == (m, n) and out.dtype == dtype
  _close(out, gmm_reference(x, w, gs), dtype)
  _close(out, ragged_dot(x, w, gs), dtype)
  past_sum = int(np.sum(group_sizes))
  assert (out[past_sum:] == 0).all()


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("m,k,n,group_sizes,dtype", CASES[:2])
def test_gradients_match_ragged_dot(platform, m, k, n, group_sizes, dtype):
  x, w, gs = _inputs(m, k, n, group_sizes, dtype)
  dy = _random(2, (m, n), dtype)

  def loss(fn):
    return lambda x, w: jnp.sum((fn(x, w) * dy).astype(jnp.float32))

  kernel = loss(lambda x, w: grouped_matmul(
      x, w, gs, block_sizes=SMALL, interpret=True, platform=platform))
  dx, dw = jax.jit(jax.grad(kernel, argnums=(0, 1)))(x, w)
  ref_dx, ref_dw = jax.jit(jax.grad(
      loss(lambda x, w: jax.lax.ragged_dot(x, w, gs)), argnums=(0, 1)))(x, w)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype
  _close(dx, ref_dx, dtype)
  _close(dw, ref_dw, dtype)
  # Empty groups get exactly zero weight gradient.
  for g, size in enumerate(group_sizes):
    if size == 0:
      assert (dw[g] == 0).all()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_transposed_grouped_matmul(platform):
  group_sizes = (0, 9, 0, 20, 1)   # sum 30 < M, empty first group
  x = _random(0, (37, 24), jnp.float32)
  dy = _random(1, (37, 40), jnp.float32)
  gs = jnp.asarray(group_sizes, jnp.int32)
  dw = transposed_grouped_matmul(x, dy, gs, block_sizes=SMALL,
                                 interpret=True, platform=platform)
  assert dw.shape == (5, 24, 40)
  _close(dw, tgmm_reference(x, dy, gs), jnp.float32)
  assert (dw[0] == 0).all() and (dw[2] == 0).all()


def test_preferred_element_type_and_default_blocks():
  x, w, gs = _inputs(40, 24, 24, (13, 27), jnp.bfloat16)
  out = grouped_matmul(x, w, gs, interpret=True,
                       preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  ref = gmm_reference(x, w, gs, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-5)


def test_tpu_variant_in_tpu_interpret_mode():
  """The Mosaic variant under the TPU-semantics interpreter (DMA, SMEM)."""
  x, w, gs = _inputs(40, 136, 24, (7, 0, 20), jnp.float32)
  dy = _random(2, (40, 24), jnp.float32)
  with pltpu.force_tpu_interpret_mode():
    out = grouped_matmul(x, w, gs, block_sizes=SMALL, interpret=False,
                         platform="tpu")
    dw = transposed_grouped_matmul(x, dy, gs, block_sizes=SMALL,
                                   interpret=False, platform="tpu")
  _close(out, gmm_reference(x, w, gs), jnp.float32)
  _close(dw, tgmm_reference(x, dy, gs), jnp.float32)


@pytest.mark.parametrize("args,match", [
    (dict(x=jnp.zeros((4, 8, 1))), "x must be 2-D"),
    (dict(w=jnp.zeros((8, 4))), "w must be 3-D"),
    (dict(w=jnp.zeros((2, 6, 4))), "K"),
    (dict(group_sizes=jnp.array([[1, 2]], jnp.int32)), "group_sizes"),
    (dict(group_sizes=jnp.array([1.0, 2.0])), "group_sizes"),
    (dict(group_sizes=jnp.array([1, 2, 1], jnp.int32)), "groups"),
    (dict(x=jnp.zeros((4, 8), jnp.int32)), "x must be a float"),
    (dict(preferred_element_type=jnp.int8), "preferred_element_type"),
    (dict(block_sizes=(16, 16, 16)), "block_sizes"),
    (dict(platform="cuda"), "platform"),
])
def test_rejects_bad_inputs(args, match):
  call = dict(x=jnp.zeros((4, 8)), w=jnp.zeros((2, 8, 4)),
              group_sizes=jnp.array([1, 3], jnp.int32))
  call.update(args)
  with pytest.raises(ValueError, match=match):
    grouped_matmul(call.pop("x"), call.pop("w"), call.pop("group_sizes"),
                   interpret=True, **call)


def test_rejects_bad_block_sizes_and_tgmm_inputs():
  with pytest.raises(ValueError, match="tm"):
    GroupedMatmulBlockSizes(tm=24)
  with pytest.raises(ValueError, match="tk"):
    GroupedMatmulBlockSizes(tk=4)
  with pytest.raises(ValueError, match="dy"):
    transposed_grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((5, 3)),
                              jnp.array([4], jnp.int32))


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_forward_and_backward_lower_for_gpu_and_tpu(target):
  platform = "gpu" if target == "cuda" else "tpu"
  spec = jax.ShapeDtypeStruct
  x = spec((1000, 200), jnp.bfloat16)
  w = spec((5, 200, 300), jnp.bfloat16)
  gs = spec((5,), jnp.int32)

  def loss(x, w, gs):
    out = grouped_matmul(x, w, gs, interpret=False, platform=platform)
    return out.astype(jnp.float32).sum()

  text = lower_for(target, jax.grad(loss, argnums=(0, 1)), x, w, gs)
  assert ("tpu_custom_call" if target == "tpu" else "triton") in text
  # The forward / dx kernel and the dw (transposed) kernel, both lowered.
  assert re.search(f"(?<!transposed_)grouped_matmul_{platform}", text)
  assert f"transposed_grouped_matmul_{platform}" in text

"""Decode / shared-prefix attention kernels against pure-jnp references.

Every kernel case runs in the Pallas interpreter on CPU, for both the GPU
(Triton-shaped, masked loads, split-K) and TPU (Mosaic-shaped, scalar
prefetch, sequential keys) variants, with small blocks so grids have several
blocks. The lowering tests also lower both variants for 'cuda' and 'tpu'
without hardware, which runs the Triton and Mosaic Python lowerings.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lower_for
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import (
    DecodeBlockSizes, combine_attention, decode_attention,
    shared_prefix_attention)
from pallas_kernels.decode_attention import reference

# Jitted so each reference is one compile, not dozens of eager op compiles.
decode_attention_reference = jax.jit(
    reference.decode_attention_reference, static_argnames="sm_scale")
shared_prefix_attention_reference = jax.jit(
    reference.shared_prefix_attention_reference, static_argnames="sm_scale")

# Tolerances per input dtype: |kernel - f32 reference on the same inputs|.
F32_TOL = dict(atol=2e-5, rtol=2e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)   # p is rounded to bf16 before p @ v
LSE_TOL = dict(atol=1e-4, rtol=1e-5)    # scores are exact products in f32
TOL = {jnp.float32: F32_TOL, jnp.bfloat16: BF16_TOL}

PLATFORMS = ("gpu", "tpu")
SMALL = DecodeBlockSizes(block_kv=8, block_rows=8)


def _random(seed, shape, dtype):
  # NumPy draws: eager jax.random would compile a kernel per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)


def _cache_with_garbage(seed, batch, max_len, kv_heads, d, lengths, dtype):
  """Caches whose entries at positions >= length are NaN / huge."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((batch, max_len, kv_heads, d))
  v = rng.standard_normal((batch, max_len, kv_heads, d))
  past = np.arange(max_len)[None, :] >= np.asarray(lengths)[:, None]
  k[past] = np.nan
  v[past] = 3e38 if dtype == jnp.float32 else np.inf
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _f32(*arrays):
  return [a.astype(jnp.float32) for a in arrays]


def _assert_close(out, lse, ref_out, ref_lse, dtype):
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(ref_out, np.float32), **TOL[dtype])
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_allclose(np.asarray(lse)[finite],
                             np.asarray(ref_lse)[finite], **LSE_TOL)


# (T, heads, kv_heads, head_dim, max_len, dtype)
DECODE_CASES = [
    (1, 4, 4, 64, 37, jnp.float32),    # MHA, odd cache length
    (3, 8, 2, 40, 50, jnp.float32),    # GQA, speculative T=3, odd head_dim
    (1, 4, 1, 128, 33, jnp.bfloat16),  # MQA
    (3, 4, 1, 32, 24, jnp.bfloat16),   # MQA, T=3
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("t,heads,kv_heads,d,max_len,dtype", DECODE_CASES)
def test_decode_matches_reference(platform, t, heads, kv_heads, d, max_len,
                                  dtype):
  lengths = jnp.array([0, t, 13, max_len], jnp.int32)  # empty, min, odd, max
  k, v = _cache_with_garbage(1, 4, max_len, kv_heads, d, lengths, dtype)
  q = _random(0, (4, t, heads, d), dtype)
  out, lse = decode_attention(q, k, v, lengths, block_sizes=SMALL,
                              interpret=True, platform=platform)
  ref_out, ref_lse = decode_attention_reference(*_f32(q, k, v), lengths)
  _assert_close(out, lse, ref_out, ref_lse, dtype)
  assert (out[0] == 0).all() and jnp.isneginf(lse[0]).all()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_split_k_and_scale(platform):
  # Several blocks per split, lengths ending mid-split and mid-block.
  lengths = jnp.array([45, 7, 64], jnp.int32)
  k, v = _cache_with_garbage(3, 3, 64, 2, 32, lengths, jnp.float32)
  q = _random(2, (3, 2, 4, 32), jnp.float32)
  sizes = DecodeBlockSizes(block_kv=8, num_splits=3)
  out, lse = decode_attention(q, k, v, lengths, sm_scale=0.3,
                              block_sizes=sizes, interpret=True,
                              platform=platform)
  ref_out, ref_lse = decode_attention_reference(q, k, v, lengths,
                                                sm_scale=0.3)
  _assert_close(out, lse, ref_out, ref_lse, jnp.float32)


def test_decode_default_blocks_under_jit():
  lengths = jnp.array([1, 200], jnp.int32)
  k, v = _cache_with_garbage(5, 2, 200, 2, 64, lengths, jnp.float32)
  q = _random(4, (2, 1, 4, 64), jnp.float32)
  fn = jax.jit(lambda *a: decode_attention(*a, interpret=True))
  out, lse = fn(q, k, v, lengths)
  _assert_close(out, lse, *decode_attention_reference(q, k, v, lengths),
                jnp.float32)


# (batch, T, heads, kv_heads, head_dim, prefix_len, dtype)
PREFIX_CASES = [
    (5, 2, 4, 2, 64, 45, jnp.float32),  # 20 stacked rows: 2 row blocks
    (3, 1, 8, 1, 48, 30, jnp.bfloat16),  # MQA, 24 rows
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("batch,t,heads,kv_heads,d,prefix_len,dtype",
                         PREFIX_CASES)
def test_shared_prefix_matches_reference(platform, batch, t, heads, kv_heads,
                                         d, prefix_len, dtype):
  q = _random(0, (batch, t, heads, d), dtype)
  pk = _random(1, (prefix_len, kv_heads, d), dtype)
  pv = _random(2, (prefix_len, kv_heads, d), dtype)
  sizes = DecodeBlockSizes(block_kv=16, block_rows=16)
  out, lse = shared_prefix_attention(q, pk, pv, block_sizes=sizes,
                                     interpret=True, platform=platform)
  ref_out, ref_lse = shared_prefix_attention_reference(*_f32(q, pk, pv))
  _assert_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("length", [0, 1, 13, 40])
def test_shared_prefix_length_ignores_the_rest(platform, length):
  """A prefix read from fixed-size pages: entries past prefix_length (NaN
  here) are ignored; the result equals the reference on the sliced prefix."""
  q = _random(0, (3, 1, 4, 16), jnp.float32)
  pk = np.asarray(_random(1, (40, 2, 16), jnp.float32)).copy()
  pv = np.asarray(_random(2, (40, 2, 16), jnp.float32)).copy()
  pk[length:], pv[length:] = np.nan, np.inf
  out, lse = shared_prefix_attention(
      q, jnp.asarray(pk), jnp.asarray(pv), prefix_length=jnp.int32(length),
      block_sizes=SMALL, interpret=True, platform=platform)
  if length == 0:
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert np.all(np.isneginf(np.asarray(lse)))
    return
  ref_out, ref_lse = shared_prefix_attention_reference(
      q, jnp.asarray(pk[:length]), jnp.asarray(pv[:length]))
  _assert_close(out, lse, ref_out, ref_lse, jnp.float32)
  masked = reference.shared_prefix_attention_reference(
      q, jnp.asarray(pk), jnp.asarray(pv), prefix_length=length)
  _assert_close(*masked, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefix_plus_suffix_equals_full_attention(platform, dtype):
  """Hydragen: combine(prefix part, own-suffix part) == attention over both."""
  batch, t, heads, kv_heads, d = 3, 2, 4, 2, 32
  prefix_len, suffix_len = 29, 20
  suffix_lengths = jnp.array([t, 11, suffix_len], jnp.int32)
  q = _random(0, (batch, t, heads, d), dtype)
  pk = _random(1, (prefix_len, kv_heads, d), dtype)
  pv = _random(2, (prefix_len, kv_heads, d), dtype)
  sk, sv = _cache_with_garbage(3, batch, suffix_len, kv_heads, d,
                               suffix_lengths, dtype)
  prefix = shared_prefix_attention(q, pk, pv, block_sizes=SMALL,
                                   interpret=True, platform=platform)
  suffix = decode_attention(q, sk, sv, suffix_lengths, block_sizes=SMALL,
                            interpret=True, platform=platform)
  out, lse = combine_attention([prefix, suffix])
  # Plain reference over [shared prefix; own suffix] per sequence.
  full_k = jnp.concatenate(
      [jnp.broadcast_to(pk, (batch, *pk.shape)), sk], axis=1)
  full_v = jnp.concatenate(
      [jnp.broadcast_to(pv, (batch, *pv.shape)), sv], axis=1)
  full_lengths = prefix_len + suffix_lengths
  ref_out, ref_lse = decode_attention_reference(*_f32(q, full_k, full_v),
                                                full_lengths)
  _assert_close(out, lse, ref_out, ref_lse, dtype)


def test_combine_attention_exact_and_empty_parts():
  q = _random(0, (2, 1, 4, 16), jnp.float32)
  k = _random(1, (2, 24, 4, 16), jnp.float32)
  v = _random(2, (2, 24, 4, 16), jnp.float32)
  full = decode_attention_reference(q, k, v, jnp.array([24, 24], jnp.int32))
  lo = decode_attention_reference(q, k[:, :10], v[:, :10],
                                  jnp.array([10, 10], jnp.int32))
  hi = decode_attention_reference(q, k[:, 10:], v[:, 10:],
                                  jnp.array([14, 14], jnp.int32))
  empty = (jnp.full_like(q, jnp.nan), jnp.full(q.shape[:3], -jnp.inf))
  combine = jax.jit(combine_attention)
  out, lse = combine([lo, empty, hi])
  np.testing.assert_allclose(out, full[0], **F32_TOL)
  np.testing.assert_allclose(lse, full[1], **F32_TOL)
  out, lse = combine([empty, empty])
  assert (out == 0).all() and jnp.isneginf(lse).all()
  with pytest.raises(ValueError, match="parts"):
    combine_attention([])


def _decode_args(**overrides):
  args = dict(q=jnp.zeros((2, 1, 4, 16)), k_cache=jnp.zeros((2, 8, 2, 16)),
              v_cache=jnp.zeros((2, 8, 2, 16)),
              lengths=jnp.array([1, 8], jnp.int32))
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides,match", [
    (dict(q=jnp.zeros((2, 4, 16))), "q must be"),
    (dict(k_cache=jnp.zeros((2, 8, 32))), "k_cache must be"),
    (dict(v_cache=jnp.zeros((2, 8, 2, 8))), "v_cache"),
    (dict(k_cache=jnp.zeros((2, 8, 2, 8)), v_cache=jnp.zeros((2, 8, 2, 8))),
     "head_dim"),
    (dict(k_cache=jnp.zeros((2, 8, 3, 16)), v_cache=jnp.zeros((2, 8, 3, 16))),
     "kv_heads"),
    (dict(k_cache=jnp.zeros((3, 8, 2, 16)), v_cache=jnp.zeros((3, 8, 2, 16))),
     "batch"),
    (dict(lengths=jnp.array([1, 2, 3], jnp.int32)), "lengths"),
    (dict(lengths=jnp.array([1.0, 2.0])), "lengths"),
    (dict(q=jnp.zeros((2, 9, 4, 16))), "max_len"),
    (dict(q=jnp.zeros((2, 1, 4, 16), jnp.bfloat16)), "dtype"),
])
def test_decode_rejects_bad_inputs(overrides, match):
  with pytest.raises(ValueError, match=match):
    decode_attention(**_decode_args(**overrides), interpret=True)


def test_bad_options_and_prefix_inputs():
  args = _decode_args()
  with pytest.raises(ValueError, match="platform"):
    decode_attention(**args, platform="cuda")
  with pytest.raises(ValueError, match="block_sizes"):
    decode_attention(**args, block_sizes=(8, 8))
  with pytest.raises(ValueError, match="block_kv"):
    DecodeBlockSizes(block_kv=12)
  with pytest.raises(ValueError, match="num_splits"):
    DecodeBlockSizes(num_splits=0)
  q = jnp.zeros((2, 1, 4, 16))
  with pytest.raises(ValueError, match="prefix_k must be"):
    shared_prefix_attention(q, jnp.zeros((1, 8, 2, 16)), jnp.zeros((8, 2, 16)))
  with pytest.raises(ValueError, match="head_dim"):
    shared_prefix_attention(q, jnp.zeros((8, 2, 8)), jnp.zeros((8, 2, 8)))
  with pytest.raises(ValueError, match="kv_heads"):
    shared_prefix_attention(q, jnp.zeros((8, 3, 16)), jnp.zeros((8, 3, 16)))


def test_tpu_variant_in_tpu_interpret_mode():
  """The Mosaic variant under the TPU-semantics interpreter (DMA, SMEM)."""
  lengths = jnp.array([7, 40], jnp.int32)
  k, v = _cache_with_garbage(1, 2, 40, 2, 128, lengths, jnp.float32)
  q = _random(0, (2, 3, 4, 128), jnp.float32)
  pk, pv = k[1, :29], v[1, :29]  # sequence 1 is valid everywhere
  with pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(q, k, v, lengths, block_sizes=SMALL,
                                interpret=False, platform="tpu")
    p_out, p_lse = shared_prefix_attention(q, pk, pv, block_sizes=SMALL,
                                           interpret=False, platform="tpu")
  _assert_close(out, lse, *decode_attention_reference(q, k, v, lengths),
                jnp.float32)
  _assert_close(p_out, p_lse, *shared_prefix_attention_reference(q, pk, pv),
                jnp.float32)


@pytest.mark.parametrize("target", ["cuda", "tpu"])
@pytest.mark.parametrize("d", [128, 96])
def test_kernels_lower_for_gpu_and_tpu(target, d):
  platform = "gpu" if target == "cuda" else "tpu"
  spec = jax.ShapeDtypeStruct
  bf16 = jnp.bfloat16
  q = spec((4, 2, 8, d), bf16)
  cache = spec((4, 300, 2, d), bf16)
  prefix = spec((1000, 2, d), bf16)
  lengths = spec((4,), jnp.int32)
  text = lower_for(target, lambda *a: decode_attention(
      *a, interpret=False, platform=platform), q, cache, cache, lengths)
  text += lower_for(target, lambda *a: shared_prefix_attention(
      *a, interpret=False, platform=platform), q, prefix, prefix)
  assert ("tpu_custom_call" if target == "tpu" else "triton") in text
  assert f"decode_attention_{platform}" in text  # the kernel, by its name


def test_default_scale_is_inverse_sqrt_head_dim():
  lengths = jnp.array([5], jnp.int32)
  q = _random(0, (1, 1, 2, 16), jnp.float32)
  k = _random(1, (1, 8, 2, 16), jnp.float32)
  v = _random(2, (1, 8, 2, 16), jnp.float32)
  out, lse = decode_attention(q, k, v, lengths, interpret=True)
  _assert_close(out, lse, *decode_attention_reference(
      q, k, v, lengths, sm_scale=1 / math.sqrt(16)), jnp.float32)


def _loop_attention(q, k, v, visible):
  """float64 loops: query (b, t, h) attends to the keys p with
  visible(b, t, p), through kv head h // (heads / kv_heads)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, t_len, heads, d = q.shape
  group = heads // k.shape[2]
  out = np.zeros(q.shape)
  lse = np.full((batch, t_len, heads), -np.inf)
  for b in range(batch):
    for t in range(t_len):
      keys = [p for p in range(k.shape[1]) if visible(b, t, p)]
      if not keys:
        continue
      for h in range(heads):
        s = np.array([q[b, t, h] @ k[b, p, h // group] for p in keys])
        s /= math.sqrt(d)
        lse[b, t, h] = s.max() + math.log(np.exp(s - s.max()).sum())
        out[b, t, h] = np.exp(s - lse[b, t, h]) @ v[b, keys, h // group]
  return out, lse


def test_references_against_loops():
  """The ground truth itself: the speculative causal limit (query t of T
  sees positions < length - T + t + 1), GQA, empty sequences, the prefix."""
  t_len, heads, kv_heads, d, max_len = 3, 4, 2, 8, 11
  lengths = np.array([0, 2, 7, 11])  # empty, shorter than T, odd, full
  q = _random(0, (4, t_len, heads, d), jnp.float32)
  k = _random(1, (4, max_len, kv_heads, d), jnp.float32)
  v = _random(2, (4, max_len, kv_heads, d), jnp.float32)
  out, lse = decode_attention_reference(q, k, v, jnp.asarray(lengths))
  expected = _loop_attention(
      q, k, v, lambda b, t, p: p < lengths[b] - t_len + t + 1)
  np.testing.assert_allclose(out, expected[0], **F32_TOL)
  assert lse.shape == (4, t_len, heads) and lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected[1]))
  finite = np.isfinite(expected[1])
  np.testing.assert_allclose(np.asarray(lse)[finite], expected[1][finite],
                             **LSE_TOL)
  # Sequence 1 (length 2 < T = 3): its first query sees nothing.
  assert np.isneginf(expected[1][1, 0]).all() and np.isfinite(
      expected[1][1, 1:]).all()
  # The shared prefix: every query sees every prefix position.
  p_out, p_lse = shared_prefix_attention_reference(q, k[3], v[3])
  batch_k = np.broadcast_to(np.asarray(k[3]), k.shape)
  batch_v = np.broadcast_to(np.asarray(v[3]), v.shape)
  p_expected = _loop_attention(q, batch_k, batch_v, lambda b, t, p: True)
  np.testing.assert_allclose(p_out, p_expected[0], **F32_TOL)
  np.testing.assert_allclose(p_lse, p_expected[1], **LSE_TOL)

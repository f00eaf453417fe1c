"""Flash attention kernels (interpret mode on CPU) against the jnp reference.

Every case runs the Pallas forward and backward kernels with small blocks so
the grid has several blocks per axis, and compares the output and dq, dk, dv
with the reference and jax.vjp of it.
"""
import functools
import math

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import lower_for
from pallas_kernels.flash_attention import attention_reference
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import FlashBlockSizes

# f32: the kernels and the reference do the same f32 maths in a different
# order (online softmax, exp2); observed errors are ~1e-6 on O(1) values.
F32_ATOL = 1e-4
F32_RTOL = 1e-4
# bf16: the kernel rounds its probabilities to bf16 before the P.V and
# dS.K products and returns bf16 (8-bit mantissa, eps 2^-8 ~ 4e-3); the
# reference runs in f32 on the same bf16 inputs. Observed errors are ~1e-2.
BF16_ATOL = 5e-2
BF16_RTOL = 5e-2

# Several blocks per axis even at these short lengths.
SMALL_BLOCKS = FlashBlockSizes(block_q=32, block_kv=16, block_q_dkv=16,
                               block_kv_dkv=32, block_q_dq=16, block_kv_dq=16)
TINY_BLOCKS = FlashBlockSizes(16, 16, 16, 16, 16, 16)


def _tolerances(dtype):
  return ((F32_ATOL, F32_RTOL) if dtype == jnp.float32
          else (BF16_ATOL, BF16_RTOL))


def _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=0):
  # numpy draws: eager jax.random would compile a kernel per shape.
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(
      rng.standard_normal(shape, np.float32).astype(dtype))
  return (draw(batch, q_len, heads, head_dim),
          draw(batch, kv_len, kv_heads, head_dim),
          draw(batch, kv_len, kv_heads, head_dim),
          draw(batch, q_len, heads, head_dim))


def _packed_ids(batch, seq):
  """Packed documents of uneven lengths and a trailing padding segment 0."""
  ids = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    cuts = sorted({seq // 5 + b, seq // 2, (3 * seq) // 4})
    for i, (start, end) in enumerate(zip([0] + cuts[:-1], cuts)):
      ids[b, start:end] = i + 1
    # Positions past the last cut keep id 0: padding is an ordinary id.
  return jnp.asarray(ids)


def _assert_close(name, actual, expected, dtype):
  atol, rtol = _tolerances(dtype)
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), f"{name} has non-finite values"
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                             err_msg=name)


@functools.partial(jax.jit, static_argnums=0)
def _reference_vjp(ref, q, k, v, do):
  # Jitted: op-by-op eager vjp of the reference costs seconds per case.
  f32 = lambda x: x.astype(jnp.float32)
  out, vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
  return out, vjp(f32(do))


def _run_and_compare(q, k, v, do, *, causal, segment_ids=None, sm_scale=None,
                     block_sizes=SMALL_BLOCKS, platform=None):
  """Checks out, dq, dk, dv of the kernel against the f32 reference."""
  kernel = functools.partial(flash_attention, causal=causal,
                             segment_ids=segment_ids, sm_scale=sm_scale,
                             block_sizes=block_sizes, platform=platform)
  ref = functools.partial(attention_reference, causal=causal,
                          segment_ids=segment_ids, sm_scale=sm_scale)
  out, vjp = jax.vjp(kernel, q, k, v)
  grads = vjp(do)
  ref_out, ref_grads = _reference_vjp(ref, q, k, v, do)
  assert out.shape == q.shape and out.dtype == q.dtype
  _assert_close("out", out, ref_out, q.dtype)
  for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    _assert_close(name, g, rg, q.dtype)
  return out, grads


# (batch, seq, heads, kv_heads, head_dim, causal, sm_scale)
SHAPES = [
    (1, 1, 2, 1, 32, True, None),     # a single token, MQA
    (2, 7, 2, 2, 48, False, 0.3),     # shorter than a block; 48 -> 64 pad
    (1, 100, 4, 2, 64, True, None),   # GQA, ragged last block
    (1, 130, 2, 1, 80, False, None),  # MQA, 80 -> 128 pad, 2 rows past 128
]


@pytest.mark.parametrize(
    "batch,seq,heads,kv_heads,head_dim,causal,sm_scale", SHAPES)
def test_matches_reference_f32(batch, seq, heads, kv_heads, head_dim, causal,
                               sm_scale):
  q, k, v, do = _inputs(batch, seq, seq, heads, kv_heads, head_dim,
                        jnp.float32)
  _run_and_compare(q, k, v, do, causal=causal, sm_scale=sm_scale)


def test_bf16_gqa_causal_tiny_blocks():
  q, k, v, do = _inputs(1, 100, 100, 4, 2, 64, jnp.bfloat16, seed=1)
  _run_and_compare(q, k, v, do, causal=True, block_sizes=TINY_BLOCKS)


@pytest.mark.parametrize("causal,dtype", [(True, jnp.float32),
                                          (False, jnp.bfloat16)])
def test_packed_segments(causal, dtype):
  q, k, v, do = _inputs(2, 90, 90, 4, 2, 32, dtype, seed=2)
  ids = _packed_ids(2, 90)
  out, _ = _run_and_compare(q, k, v, do, causal=causal, segment_ids=ids)
  # Documents are independent: changing another one leaves doc 1 unchanged.
  doc = np.asarray(ids) == 1
  k2 = jnp.asarray(np.where(doc[:, :, None, None], np.asarray(k),
                            -np.asarray(k)))
  out2 = flash_attention(q, k2, v, causal=causal, segment_ids=ids,
                         block_sizes=SMALL_BLOCKS)
  np.testing.assert_array_equal(np.asarray(out2)[doc], np.asarray(out)[doc])


@pytest.mark.parametrize("q_len,kv_len", [(24, 70), (70, 24)])
def test_different_lengths_bottom_right_causal(q_len, kv_len):
  q, k, v, do = _inputs(1, q_len, kv_len, 2, 1, 32, jnp.float32, seed=4)
  out, grads = _run_and_compare(q, k, v, do, causal=True)
  if q_len > kv_len:
    # Query i sees keys j <= i - (q_len - kv_len): the first rows see none.
    empty = q_len - kv_len
    assert np.all(np.asarray(out)[:, :empty] == 0.0)
    assert np.all(np.asarray(grads[0])[:, :empty] == 0.0)


def test_fully_masked_rows_are_zero():
  q, k, v, do = _inputs(2, 40, 40, 2, 2, 32, jnp.float32, seed=5)
  q_ids = np.ones((2, 40), np.int32)
  q_ids[:, 10:17] = 7  # id 7 appears in no key: those rows see nothing
  kv_ids = np.ones((2, 40), np.int32)
  segs = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
  out, grads = _run_and_compare(q, k, v, do, causal=True, segment_ids=segs)
  assert np.all(np.asarray(out)[:, 10:17] == 0.0)
  assert np.all(np.asarray(grads[0])[:, 10:17] == 0.0)


def test_under_jit_matches_reference():
  """Forward and backward traced under one jit (tracer operands: the
  platform comes from the default backend) against the reference."""
  q, k, v, do = _inputs(1, 33, 33, 2, 1, 32, jnp.float32, seed=6)
  fn = functools.partial(flash_attention, causal=True,
                         block_sizes=SMALL_BLOCKS)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  out, grads = fwd_bwd(q, k, v, do)
  ref = functools.partial(attention_reference, causal=True)
  ref_out, ref_grads = _reference_vjp(ref, q, k, v, do)
  _assert_close("out", out, ref_out, jnp.float32)
  for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(name, g, rg, jnp.float32)


def test_reference_against_loops():
  """The ground truth itself, against per-head numpy loops (GQA mapping)."""
  q, k, v, _ = _inputs(2, 9, 11, 4, 2, 8, jnp.float32, seed=7)
  ids = (jnp.asarray(np.array([[1] * 5 + [2] * 4] * 2, np.int32)),
         jnp.asarray(np.array([[1] * 6 + [2] * 5] * 2, np.int32)))
  ref = jax.jit(functools.partial(attention_reference, causal=True))
  out = np.asarray(ref(q, k, v, segment_ids=ids))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  qi, ki = (np.asarray(x) for x in ids)
  expected = np.zeros_like(qn)
  for b in range(2):
    for h in range(4):
      kv_h = h // 2
      for i in range(9):
        keys = [j for j in range(11) if j <= i + 2 and ki[b, j] == qi[b, i]]
        if not keys:
          continue
        s = np.array([qn[b, i, h] @ kn[b, j, kv_h] for j in keys]) / np.sqrt(8)
        w = np.exp(s - s.max())
        w /= w.sum()
        expected[b, i, h] = w @ vn[b, keys, kv_h]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_tpu_variant_in_tpu_interpret_mode():
  """The Mosaic variant's logic, run by the TPU interpreter on CPU (every
  supported jax, >= 0.10, has it: no skip)."""
  q, k, v, do = _inputs(1, 200, 200, 2, 1, 64, jnp.float32, seed=8)
  ids = _packed_ids(1, 200)
  blocks = FlashBlockSizes.get_default("tpu")
  with pltpu.force_tpu_interpret_mode():
    _run_and_compare(q, k, v, do, causal=True, segment_ids=ids,
                     block_sizes=blocks, platform="tpu")


@pytest.mark.parametrize("platform,target", [("gpu", "cuda"),
                                             ("tpu", "tpu")])
def test_lowers_for_accelerators(platform, target):
  """Forward and backward lower to Triton / Mosaic IR (no device needed)."""
  q = jax.ShapeDtypeStruct((2, 300, 4, 80), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 300, 2, 80), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def fwd_bwd(q, k, v, ids):
    fn = functools.partial(flash_attention, causal=True, segment_ids=ids,
                           platform=platform, interpret=False)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  module = lower_for(target, fwd_bwd, q, kv, kv, ids)
  call = "__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call"
  assert call in module
  suffix = "" if platform == "gpu" else "_tpu"
  for name in ("fwd", "bwd_dkv", "bwd_dq"):
    assert f"flash_attention_{name}{suffix}" in module


def _bad_call(**overrides):
  q, k, v, _ = _inputs(1, 16, 16, 2, 1, 32, jnp.float32)
  args = dict(q=q, k=k, v=v)
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return flash_attention(q, k, v, **args)


@pytest.mark.parametrize("overrides,match", [
    (dict(q=jnp.zeros((16, 2, 32))), r"^q must be 4-D"),
    (dict(k=jnp.zeros((2, 16, 1, 32)), v=jnp.zeros((2, 16, 1, 32))),
     r"k/v batch"),
    (dict(k=jnp.zeros((1, 16, 1, 16)), v=jnp.zeros((1, 16, 1, 16))),
     r"head_dim"),
    (dict(q=jnp.zeros((1, 16, 3, 32)), k=jnp.zeros((1, 16, 2, 32)),
          v=jnp.zeros((1, 16, 2, 32))), r"q heads \(3\).*k/v heads \(2\)"),
    (dict(q=jnp.zeros((1, 16, 2, 32), jnp.int32)), r"q must be a float32"),
    (dict(k=jnp.zeros((1, 16, 1, 32), jnp.bfloat16),
          v=jnp.zeros((1, 16, 1, 32), jnp.bfloat16)), r"cast k and v"),
    (dict(v=jnp.zeros((1, 17, 1, 32))), r"k and v must have the same shape"),
    (dict(segment_ids=jnp.zeros((1, 17), jnp.int32)), r"segment_ids"),
    (dict(segment_ids=jnp.zeros((1, 16), jnp.float32)),
     r"segment_ids must be an integer"),
    (dict(k=jnp.zeros((1, 20, 1, 32)), v=jnp.zeros((1, 20, 1, 32)),
          segment_ids=jnp.zeros((1, 16), jnp.int32)),
     r"segment_ids as one array needs q_len == kv_len"),
    (dict(segment_ids=(jnp.zeros((1, 16), jnp.int32),)), r"segment_ids"),
    (dict(causal="yes"), r"causal"),
    (dict(sm_scale=jnp.float32(0.5) * jnp.ones(())), r"sm_scale"),
    (dict(sm_scale=math.inf), r"sm_scale"),
    (dict(block_sizes={"block_q": 16}), r"block_sizes"),
    (dict(block_sizes=FlashBlockSizes(block_q=24)), r"block_q=24"),
    (dict(block_sizes=FlashBlockSizes(block_kv=64), platform="tpu"),
     r"block_kv=64: TPU blocks must be multiples of 128"),
    (dict(platform="cuda"), r"platform"),
    (dict(interpret="yes"), r"interpret"),
])
def test_bad_inputs_raise_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    _bad_call(**overrides)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), r"block_q"),
    (dict(block_kv_dq=-16), r"block_kv_dq"),
    (dict(block_kv=16.0), r"block_kv"),
    (dict(num_warps=0), r"num_warps"),
])
def test_block_sizes_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    FlashBlockSizes(**kwargs)


def test_default_block_sizes():
  gpu, tpu = FlashBlockSizes.get_default("gpu"), FlashBlockSizes.get_default(
      "tpu")
  gpu.check_for_platform("gpu")
  tpu.check_for_platform("tpu")
  assert all(b % 128 == 0 for b in tpu.q_blocks + tpu.kv_blocks)
  with pytest.raises(ValueError, match="platform"):
    FlashBlockSizes.get_default("cuda")

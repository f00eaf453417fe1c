"""Decode-attention benchmarks: plain decode and Hydragen shared-prefix decode.

`run(backend, quick)` returns one row per (kernel, case, baseline):
- decode_attention vs the jitted XLA reference. throughput = GB/s of valid
  K/V bytes (what a decode step must read).
- hydragen (shared_prefix_attention over the one prefix + decode_attention
  over each sequence's own suffix + combine_attention) vs (a) per-sequence
  decode_attention over caches that hold a private copy of the prefix and
  (b) the XLA reference over those caches. throughput = "effective" GB/s:
  the K/V bytes the per-sequence method attends over (B * (prefix + suffix)),
  divided by the time, so impl and baseline figures compare directly and
  Hydragen may exceed the HBM bandwidth.
- shared_prefix_attention alone vs the XLA prefix reference (also a
  matrix-matrix einsum), GB/s of the prefix K/V read once.
On CPU, or with quick=True, one tiny shape per kernel (interpreter on CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from launch.timing import time_fn
from pallas_kernels.decode_attention import DecodeBlockSizes
from pallas_kernels.decode_attention import combine_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention import shared_prefix_attention
from pallas_kernels.decode_attention import reference

# (heads, kv_heads, head_dim): Llama-3-8B-like attention, and a smoke shape.
FULL_HEADS = (32, 8, 128)
TINY_HEADS = (4, 2, 64)
SUFFIX_LEN = 256  # each sequence's own tokens so far


def _row(kernel, case, time_s, throughput, unit, baseline, base_s):
  return {"kernel": kernel, "case": case, "impl": "pallas",
          "time_ms": time_s * 1e3, "throughput": throughput, "unit": unit,
          "baseline": baseline, "baseline_time_ms": base_s * 1e3,
          "vs_baseline": base_s / time_s}


def _kv_bytes(tokens: int, heads, dtype) -> float:
  _, kv_heads, head_dim = heads
  return 2.0 * tokens * kv_heads * head_dim * jnp.dtype(dtype).itemsize


def _head_text(heads) -> str:
  return f"H={heads[0]}/{heads[1]} D={heads[2]}"


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _bench_decode(batch, max_len, heads, dtype, kw, timing):
  n_heads, kv_heads, d = heads
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = _normal(keys[0], (batch, 1, n_heads, d), dtype)
  k = _normal(keys[1], (batch, max_len, kv_heads, d), dtype)
  v = _normal(keys[2], (batch, max_len, kv_heads, d), dtype)
  lengths = jnp.asarray(np.random.default_rng(0).integers(
      max_len // 2, max_len + 1, batch), jnp.int32)
  impl = jax.jit(lambda *a: decode_attention(*a, **kw))
  xla = jax.jit(reference.decode_attention_reference)
  t_impl = time_fn(impl, q, k, v, lengths, **timing)
  t_xla = time_fn(xla, q, k, v, lengths, **timing)
  gbs = _kv_bytes(int(lengths.sum()), heads, dtype) / t_impl / 1e9
  case = (f"B={batch} L={max_len} {_head_text(heads)} T=1 "
          f"{jnp.dtype(dtype).name}")
  return [_row("decode_attention", case, t_impl, gbs, "GB/s", "xla_reference",
               t_xla)]


def _bench_hydragen(batch, prefix_len, heads, dtype, kw, timing):
  n_heads, kv_heads, d = heads
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  q = _normal(keys[0], (batch, 1, n_heads, d), dtype)
  pk = _normal(keys[1], (prefix_len, kv_heads, d), dtype)
  pv = _normal(keys[2], (prefix_len, kv_heads, d), dtype)
  suffix_len = min(SUFFIX_LEN, prefix_len)
  sk = _normal(keys[3], (batch, suffix_len, kv_heads, d), dtype)
  sv = _normal(keys[4], (batch, suffix_len, kv_heads, d), dtype)
  slen = jnp.asarray(np.random.default_rng(1).integers(
      1, suffix_len + 1, batch), jnp.int32)

  @jax.jit
  def hydragen(q, pk, pv, sk, sv, slen):
    prefix = shared_prefix_attention(q, pk, pv, **kw)
    suffix = decode_attention(q, sk, sv, slen, **kw)
    return combine_attention([prefix, suffix])

  t_hyd = time_fn(hydragen, q, pk, pv, sk, sv, slen, **timing)
  t_pre = time_fn(jax.jit(lambda *a: shared_prefix_attention(*a, **kw)),
                  q, pk, pv, **timing)
  t_pre_xla = time_fn(jax.jit(reference.shared_prefix_attention_reference),
                      q, pk, pv, **timing)
  # Per-sequence baseline: every cache holds its own copy of the prefix.
  full_k = jnp.concatenate([jnp.broadcast_to(pk, (batch, *pk.shape)), sk], 1)
  full_v = jnp.concatenate([jnp.broadcast_to(pv, (batch, *pv.shape)), sv], 1)
  del sk, sv
  full_len = prefix_len + slen
  t_seq = time_fn(jax.jit(lambda *a: decode_attention(*a, **kw)),
                  q, full_k, full_v, full_len, **timing)
  t_xla = time_fn(jax.jit(reference.decode_attention_reference),
                  q, full_k, full_v, full_len, **timing)
  attended = _kv_bytes(int(full_len.sum()), heads, dtype)
  case = (f"B={batch} prefix={prefix_len} suffix<={suffix_len} "
          f"{_head_text(heads)} {jnp.dtype(dtype).name}")
  return [
      _row("hydragen_decode", case, t_hyd, attended / t_hyd / 1e9, "GB/s",
           "pallas_decode_per_sequence", t_seq),
      _row("hydragen_decode", case, t_hyd, attended / t_hyd / 1e9, "GB/s",
           "xla_reference_per_sequence", t_xla),
      _row("shared_prefix_attention", case, t_pre,
           _kv_bytes(prefix_len, heads, dtype) / t_pre / 1e9, "GB/s",
           "xla_prefix_reference", t_pre_xla),
  ]


def run(backend: str, quick: bool) -> list[dict]:
  """Benchmarks the decode kernels; see the module docstring for the rows.

  Args:
    backend: 'cpu', 'gpu' or 'tpu' (the device the caller runs on).
    quick: one tiny smoke shape per kernel instead of the full sweep.

  Returns:
    A list of row dicts.
  """
  if backend == "cpu":
    kw = dict(interpret=True, block_sizes=DecodeBlockSizes(block_kv=16,
                                                           block_rows=16))
    timing = dict(warmup=1, iters=2)
  else:
    kw = dict(interpret=False)
    timing = dict(warmup=2, iters=10)
  if quick or backend == "cpu":
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    return (_bench_decode(2, 64, TINY_HEADS, dtype, kw, timing) +
            _bench_hydragen(2, 64, TINY_HEADS, dtype, kw, timing))
  rows = []
  for batch in (64, 256):
    rows += _bench_decode(batch, 4096, FULL_HEADS, jnp.bfloat16, kw, timing)
  for batch in (64, 256):
    for prefix_len in (1024, 4096, 16384):
      rows += _bench_hydragen(batch, prefix_len, FULL_HEADS, jnp.bfloat16, kw,
                              timing)
  return rows


if __name__ == "__main__":
  for r in run(jax.default_backend(), quick=False):
    print(r)

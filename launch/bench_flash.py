"""Flash-attention benchmark: the Pallas kernel against baselines timed in the same run.

Baselines: the XLA reference (jitted pallas_kernels.flash_attention.reference) everywhere, and cuDNN
(jax.nn.dot_product_attention(implementation='cudnn')) on GPU. Used by `python -m launch.bench --suite=kernels`;
runnable alone as `python -m launch.bench_flash [--quick]`.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from launch.timing import time_fn
from pallas_kernels.flash_attention import attention_reference, flash_attention

_GPU_SEQS = (1024, 2048, 4096, 8192, 16384)
# Constant tokens per batch (16k) and head count as in the FlashAttention-2 paper's sweeps.
_TOKENS = 16384
_HEADS = 16
_HEAD_DIM = 128


def _cases(backend: str, quick: bool):
  """(batch, seq, heads, head_dim, dtype) tuples to time."""
  if quick or backend == 'cpu':
    # CPU runs the Pallas interpreter: a smoke shape that proves the path works, not a speed.
    return [(1, 128, 2, 64, jnp.float32)]
  return [(max(1, _TOKENS // s), s, _HEADS, _HEAD_DIM, jnp.bfloat16) for s in _GPU_SEQS]


def _flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool, with_backward: bool) -> float:
  fwd = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
  return fwd * (3.5 if with_backward else 1.0)  # the backward costs 2.5x the forward


def _fwd_bwd(attn):
  def fn(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return jax.jit(fn)


def _cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def _short(err: Exception) -> str:
  line = (str(err).strip().splitlines() or [type(err).__name__])[0]
  return f'{type(err).__name__}: {line}'[:160]


def _time(fn, args, quick_timing: bool):
  warmup, iters = (1, 3) if quick_timing else (2, 10)
  return time_fn(fn, *args, warmup=warmup, iters=iters)


def run(backend: str, quick: bool) -> list[dict]:
  """Times forward and forward+backward of causal attention.

  Args:
    backend: 'cpu', 'gpu' or 'tpu' (jax.default_backend()); on CPU the kernel runs in interpret mode.
    quick: one small shape only (always so on CPU).

  Returns:
    One row per (case, baseline) with the keys kernel, case, impl, time_ms, throughput, unit, baseline,
    baseline_time_ms, vs_baseline and note. A baseline (or the kernel) that fails gives NaN times and the
    error in `note` instead of stopping the run.
  """
  rows = []
  quick_timing = quick or backend == 'cpu'
  rng = np.random.default_rng(0)
  for batch, seq, heads, head_dim, dtype in _cases(backend, quick):
    shape = (batch, seq, heads, head_dim)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(4))
    pallas = functools.partial(flash_attention, causal=True)
    reference = functools.partial(attention_reference, causal=True)
    baselines = [('xla_reference', reference)]
    if backend == 'gpu':
      baselines.append(('cudnn', _cudnn))
    dtype_name = jnp.dtype(dtype).name.replace('float', 'f')  # f32, bf16
    for mode, with_backward in (('fwd', False), ('fwd+bwd', True)):
      args = (q, k, v, do) if with_backward else (q, k, v)
      wrap = _fwd_bwd if with_backward else jax.jit
      flops = _flops(batch, seq, heads, head_dim, True, with_backward)
      case = f'{mode} b{batch} s{seq} h{heads} d{head_dim} {dtype_name}'
      note = ''
      try:
        impl_s = _time(wrap(pallas), args, quick_timing)
      except Exception as err:  # pylint: disable=broad-except
        impl_s, note = float('nan'), f'pallas failed: {_short(err)}'
        print(f'[bench_flash] {case}: {note}', file=sys.stderr)
      for name, fn in baselines:
        row_note = note
        try:
          base_s = _time(wrap(fn), args, quick_timing)
        except Exception as err:  # pylint: disable=broad-except
          base_s = float('nan')
          row_note = '; '.join(filter(None, [note, f'{name} unavailable: {_short(err)}']))
          name = f'{name} (unavailable)'
        rows.append({
            'kernel': 'flash_attention',
            'case': case,
            'impl': 'pallas',
            'time_ms': 1e3 * impl_s,
            'throughput': flops / impl_s / 1e12,
            'unit': 'TFLOP/s',
            'baseline': name,
            'baseline_time_ms': 1e3 * base_s,
            'vs_baseline': base_s / impl_s,
            'note': row_note,
        })
  return rows


if __name__ == '__main__':
  for r in run(jax.default_backend(), quick='--quick' in sys.argv):
    print(r)

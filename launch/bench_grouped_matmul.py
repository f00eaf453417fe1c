"""Grouped matmul benchmarks against jax.lax.ragged_dot.

`run(backend, quick)` returns, per case, a forward row and a forward+backward
row (grad of sum(out * dy) in x and w), each timed against ragged_dot in the
same run. throughput = TFLOP/s of the useful work: 2*M*K*N forward, three
times that forward+backward. Group sizes are a random split of M with
boundaries that do not align to tiles. On GPU the forward is also timed at a
second tiling, so one run gives a first tuning hint. On CPU, or with
quick=True, one tiny shape (interpreter on CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from launch.timing import time_fn
from pallas_kernels.grouped_matmul import GroupedMatmulBlockSizes
from pallas_kernels.grouped_matmul import grouped_matmul

# Extra GPU tilings timed (forward only) besides the default.
GPU_ALT_TILINGS = (GroupedMatmulBlockSizes(tm=128, tk=32, tn=128, num_warps=4,
                                           num_stages=4),
                   GroupedMatmulBlockSizes(tm=128, tk=64, tn=256, num_warps=8,
                                           num_stages=3))


def _row(kernel, case, time_s, flops, baseline, base_s):
  return {"kernel": kernel, "case": case, "impl": "pallas",
          "time_ms": time_s * 1e3, "throughput": flops / time_s / 1e12,
          "unit": "TFLOP/s", "baseline": baseline,
          "baseline_time_ms": base_s * 1e3, "vs_baseline": base_s / time_s}


def _group_sizes(m: int, groups: int, seed: int = 0) -> jax.Array:
  """Random sizes summing to m (some may be 0 when groups is large)."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(0, m + 1, groups - 1))
  return jnp.asarray(np.diff(np.concatenate([[0], cuts, [m]])), jnp.int32)


def _tiles_text(bs: GroupedMatmulBlockSizes) -> str:
  return f"tiles={bs.tm}x{bs.tk}x{bs.tn} w{bs.num_warps}s{bs.num_stages}"


def _bench_case(m, k, n, groups, dtype, kw, timing, alt_tilings=()):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  w = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) /
       np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
  gs = _group_sizes(m, groups)
  bs = kw.get("block_sizes") or GroupedMatmulBlockSizes()
  case = f"M={m} K={k} N={n} G={groups} {jnp.dtype(dtype).name}"
  flops = 2.0 * m * k * n

  def fwd(block_sizes):
    opts = dict(kw, block_sizes=block_sizes)
    return jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, **opts))

  def fwd_bwd(matmul):
    def loss(x, w, gs):
      return jnp.sum((matmul(x, w, gs) * dy).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  ragged = jax.jit(jax.lax.ragged_dot)
  t_ref = time_fn(ragged, x, w, gs, **timing)
  rows = []
  for tiling in (bs, *alt_tilings):
    t = time_fn(fwd(tiling), x, w, gs, **timing)
    rows.append(_row("grouped_matmul_fwd", f"{case} {_tiles_text(tiling)}",
                     t, flops, "ragged_dot_fwd", t_ref))
  t_ref = time_fn(fwd_bwd(jax.lax.ragged_dot), x, w, gs, **timing)
  t = time_fn(fwd_bwd(lambda x, w, gs: grouped_matmul(x, w, gs, **kw)),
              x, w, gs, **timing)
  rows.append(_row("grouped_matmul_fwd_bwd", f"{case} {_tiles_text(bs)}", t,
                   3 * flops, "ragged_dot_fwd_bwd", t_ref))
  return rows


def run(backend: str, quick: bool) -> list[dict]:
  """Benchmarks grouped_matmul; see the module docstring for the rows.

  Args:
    backend: 'cpu', 'gpu' or 'tpu' (the device the caller runs on).
    quick: one tiny smoke shape instead of the full sweep.

  Returns:
    A list of row dicts.
  """
  if backend == "cpu":
    kw = dict(interpret=True,
              block_sizes=GroupedMatmulBlockSizes(tm=16, tk=16, tn=16))
    return _bench_case(64, 32, 32, 3, jnp.float32, kw,
                       dict(warmup=1, iters=2))
  kw = dict(interpret=False)
  timing = dict(warmup=2, iters=10)
  if quick:
    return _bench_case(512, 256, 256, 4, jnp.bfloat16, kw, timing)
  alt = GPU_ALT_TILINGS if backend == "gpu" else ()
  rows = []
  for groups in (8, 64):
    rows += _bench_case(8192, 4096, 4096, groups, jnp.bfloat16, kw, timing,
                        alt)
  return rows


if __name__ == "__main__":
  for r in run(jax.default_backend(), quick=False):
    print(r)

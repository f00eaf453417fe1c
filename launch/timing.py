"""Wall-clock timing of jitted functions for the benchmark scripts."""
import statistics
import time

import jax


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median seconds per call of `fn(*args)`, compile and warm-up excluded."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)

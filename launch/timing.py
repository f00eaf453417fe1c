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


def time_interleaved(runs: dict, n: int) -> dict[str, float]:
  """Median seconds per step for each {name: (step, state, batch)}, alternating between them step by step so
  that a change in machine load hits every variant alike. Steps may donate their state: each call's output
  feeds the next."""
  states = {name: state for name, (_, state, _) in runs.items()}
  times = {name: [] for name in runs}
  for i in range(n + 2):  # the first two rounds warm up (compile, allocator)
    for name, (step, _, batch) in runs.items():
      start = time.perf_counter()
      states[name] = jax.block_until_ready(step(states[name], batch))
      if i >= 2:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}

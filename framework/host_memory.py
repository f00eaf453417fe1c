"""Host memory policy for training: keep freed memory in the process instead of handing it back to the kernel
each step.

XLA:CPU allocates a step's temporaries as one block (2.2 GB for lm_small's train step) through malloc on a worker
thread. glibc serves a block that large from a fresh mmap when the thread has its own arena, so every step faulted
in ~550k zeroed pages and unmapped them again: ~1 s of kernel time in a 3.7 s step, and up to 4 s right after
another library (PyTorch) had churned memory. One arena that never mmaps nor trims reuses the same pages every
step: no faults, the step 3.7 -> 3.2 s on the 2-core CPU machine. The cost is that the process keeps its
high-water mark of host memory; `release_free_memory()` returns the free part (tests call it between modules).

Not for serving: the inference engine's many mid-size buffers freed into the one arena made continuous batching
~18% slower (static 428 -> 352 tokens/s, launch.bench_inference's workload), so the launchers apply it to training
only (launch/runtime_flags.py: --host_memory=auto). It must come before jax starts its CPU client, so that the
client's threads share the one arena. glibc (Linux) only; elsewhere, and under another allocator (LD_PRELOAD
tcmalloc or jemalloc), nothing changes.
"""
import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _glibc():
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """Sets the policy above; True if it is in force."""
  libc = _glibc()
  if libc is None:
    return False
  # mallopt returns 1 on success; -1 as a size means "never" for the trim threshold.
  return all(libc.mallopt(param, value) == 1
             for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def release_free_memory() -> None:
  """Returns the free pages of the heap to the kernel (malloc_trim), e.g. between unrelated workloads."""
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)

"""Every test runs on 8 fake CPU devices so sharding is exercised without hardware."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (must follow the flag above)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same small programs (the same toy model in a fresh Trainer, a run and its resume): a
# persistent compilation cache for this session turns the repeats into cache reads (the suite runs ~2x faster).
# XLA keys an entry on the program and its compile options, so a hit is the same executable.
_MIN_COMPILE_SECS = 0.5
_CACHE_DIR = tempfile.mkdtemp(prefix="batchax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _cache_writes(request):
  """Modules marked no_cache_writes compile without writing the persistent cache. Late in the full suite (never
  in a module run alone), XLA:CPU segfaulted serializing the inference engine's step for the cache (inside
  jax's put_executable_and_time); the engine's steps are shared in-process (forward.make_step), so the cache
  saves them nothing."""
  if request.node.get_closest_marker('no_cache_writes') is None:
    yield
    return
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)

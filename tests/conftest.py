"""Every test runs on 8 fake CPU devices so sharding is exercised without hardware."""
import atexit
import gc
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
_CACHE_DIR = tempfile.mkdtemp(prefix="batchax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Drops the compiled programs after each test module. Every XLA:CPU executable maps its code into the
  process, and the full suite in one process ran past Linux's default of 65,530 memory maps
  (vm.max_map_count): XLA then segfaulted compiling or serializing the next program (reproduced by taking 62,000
  maps before one test). Freed executables unmap; the persistent cache above turns the recompiles into reads.
  The heap keeps what it frees (framework/host_memory.py), so its free pages go back too."""
  yield
  jax.clear_caches()
  gc.collect()
  from framework import host_memory
  host_memory.release_free_memory()

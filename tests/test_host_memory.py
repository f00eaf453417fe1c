"""The host allocator policy of framework/host_memory.py: a large block freed on a worker thread is reused, not
unmapped and faulted in again. Each case runs in a fresh interpreter, since the policy is per process."""
import subprocess
import sys

import pytest

from framework import host_memory

# A worker thread (as XLA:CPU's are) mallocs, touches and frees 256 MiB twice; prints the minor page faults of the
# second round. Under glibc's defaults the block is a fresh mmap each time: 65,536 faults of 4 KiB pages.
_PROBE = """
import ctypes, resource, threading
import framework
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, out = 256 << 20, []
def work():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(out[1])
"""


def _second_round_faults(policy: str) -> int:
  env = {'BATCHAX_HOST_MALLOC': policy, 'PATH': '/usr/bin:/bin'}
  done = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, timeout=120,
                        check=True)
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason='the policy is glibc-only')  # pylint: disable=protected-access
def test_freed_block_is_reused_not_refaulted():
  pages = (256 << 20) // 4096
  assert _second_round_faults('system') > pages // 2  # the default really does refault (the probe can see it)
  assert _second_round_faults('keep') < pages // 100


def test_bad_policy_warns_and_changes_nothing(monkeypatch):
  monkeypatch.setenv('BATCHAX_HOST_MALLOC', 'tcmalloc')
  with pytest.warns(UserWarning, match='BATCHAX_HOST_MALLOC.*keep.*system'):
    assert not host_memory.keep_freed_memory()
